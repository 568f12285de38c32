"""Part (b) of experiments/q_newton.py: a rank-2 LoRA on the bundled SmolLM2-135M (imported by it).

**No quantum computer is used**: the quantum linear solver is a cost model, every solve runs
classically.

Newton and Q-Newton here use the generalized Gauss-Newton matrix of the answer tokens'
cross-entropy (:func:`expertkit.optim.newton.causal_lm.answer_problem`), Hessian-free over all
LoRA parameters as one system (``krylov_dim`` Lanczos products per step; κ from the Ritz values;
the quantum model's sparsity d = n), and Levenberg-Marquardt damping (λ adapted by the ratio of
actual to predicted loss reduction; no trust radius). Their two settings, the initial λ and the
Krylov dimension, are chosen on a *validation* pool (``--lora-pool`` examples of the task's
validation split, trained the same number of Newton steps): the setting with the lowest final
validation-pool loss is then run on the training pool. Test examples are used for accuracy only.
``--lora-ef-reference`` adds the previous method (empirical Fisher per tensor, fixed damping,
trust radius) as run ``newton-ef`` for a before/after comparison on the same examples.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from typing import Any

import torch

LAYERS = (28, 29)


def lora_problem(args: argparse.Namespace, run_optimizer: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """(b) the LoRA runs: selection of the Newton settings on validation, then every optimizer on train."""
    from expertkit.models import load_model
    from expertkit.optim.newton.causal_lm import answer_problem
    from expertkit.tasks import evaluate as task_eval
    from expertkit.tasks.base import get_task
    from expertkit.tasks.infer import pad_id_of
    from expertkit.train.config import LoraTrainConfig
    from expertkit.train.data import collate, encode_examples, make_loss_fn
    from expertkit.train.schemes import wrap

    loaded = load_model("smollm2-135m")
    task = get_task(args.task)
    targets = tuple(f"layers.{i}.self_attn.{m}" for i in LAYERS for m in ("q_proj", "v_proj"))
    cfg = LoraTrainConfig(rank=2, alpha=4, target_modules=targets)
    pools = {split: encode_examples(loaded.tokenizer, task, task.examples(split, args.lora_pool, 0), 96)
             for split in ("validation", "train")}
    out: dict[str, Any] = {"task": task.name, "pool": len(pools["train"]), "targets": list(targets), "rank": 2,
                           "runs": {}}
    zero = task_eval(loaded.model, loaded.tokenizer, task, split="test", n=args.n, seed=0)
    out["zero_shot"] = {"accuracy": zero.accuracy, "n": zero.n}
    newton_steps = max(1, args.lora_fo_steps // 5)

    def newton_hp(lm_init: float, krylov: int, relative: bool) -> dict[str, Any]:
        return {"curvature": "ggn", "damping_mode": "lm", "lm_init": lm_init, "krylov_dim": krylov,
                "lm_relative": relative, "block": "none",
                "exact_max": 1, "verbose": False, "flop_rate": args.flop_rate, "gate_time": args.gate_time,
                "max_step_norm": args.lora_trust}

    def train(name: str, rows: list, hp: dict[str, Any], evaluate: bool, lr: float | None = None) -> dict[str, Any]:
        torch.manual_seed(0)
        model, give_back = wrap(loaded.model, cfg, loaded.path)
        try:
            model.train()
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            params, names = [p for _, p in named], [n for n, _ in named]
            loss_fn = make_loss_fn(model, loaded.tokenizer, rows)
            problem = answer_problem(model, *collate(rows, pad_id_of(loaded.tokenizer)))

            def score(model: Any = model) -> dict[str, Any]:
                if not evaluate:
                    return {"accuracy": None, "n": 0, "correct": []}
                res = task_eval(model, loaded.tokenizer, task, split="test", n=args.n, seed=0)
                return {"accuracy": res.accuracy, "n": res.n, "correct": [e.score > 0 for e in res.examples]}

            if name == "newton-ef":  # the previous method: closure, empirical Fisher per tensor
                step = lambda opt, lr: opt.step(loss_fn, lr)  # noqa: E731
            else:
                step = lambda opt, lr: opt.step_problem(problem.model, problem.loss_func, problem.X,  # noqa: E731
                                                        problem.y, lr)
            newton = name in ("newton", "q-newton", "newton-ef")
            lr = 1.0 if lr is None else lr
            return run_optimizer(name, newton_steps if newton else args.lora_fo_steps, lr, params, names, model,
                                 lambda: loss_fn().mean(), step, score, hp)
        finally:
            give_back()

    # settings of Newton / Q-Newton chosen on the validation pool (classical Newton; Q-Newton shares them)
    grid = list(itertools.product(args.lora_lm_init, args.lora_krylov, [r == "on" for r in args.lora_lm_relative]))
    selection = []
    for lm_init, krylov, relative in grid:
        if len(grid) == 1:
            break
        rec = train("newton", pools["validation"], newton_hp(lm_init, krylov, relative), evaluate=False)
        selection.append({"lm_init": lm_init, "krylov_dim": krylov, "lm_relative": relative,
                          "validation_loss": rec["loss"] + [rec["final_loss"]], "seconds": sum(rec["seconds"])})
        print(f"lora selection (validation pool) λ0={lm_init:g} m={krylov} relative={relative}: losses "
              f"{[round(x, 3) for x in selection[-1]['validation_loss']]}", flush=True)
    best = min(selection, key=lambda r: r["validation_loss"][-1]) if selection else {
        "lm_init": grid[0][0], "krylov_dim": grid[0][1], "lm_relative": grid[0][2]}
    chosen_keys = ("lm_init", "krylov_dim", "lm_relative")
    out["selection"] = {"grid": selection, "chosen": {k: best[k] for k in chosen_keys}}
    chosen = newton_hp(*(best[k] for k in chosen_keys))
    # the first-order baselines' learning rates, chosen the same way (lowest final validation-pool loss)
    fo_lr: dict[str, float] = {}
    for name, lrs in (("sgd", args.lora_sgd_lr), ("adamw", args.lora_adamw_lr)):
        tried = []
        for lr in lrs:
            if len(lrs) == 1:
                break
            rec = train(name, pools["validation"], {}, evaluate=False, lr=lr)
            tried.append({"lr": lr, "validation_loss": rec["final_loss"]})
            print(f"lora selection (validation pool) {name} lr={lr:g}: final loss {rec['final_loss']:.3f}", flush=True)
        fo_lr[name] = min(tried, key=lambda r: r["validation_loss"])["lr"] if tried else lrs[0]
        out["selection"][name] = {"grid": tried, "chosen_lr": fo_lr[name]}
    ef = {"curvature": "fisher", "verbose": False, "flop_rate": args.flop_rate, "exact_max": 1200,
          "gate_time": args.gate_time, "damping_rel": 5e-3, "max_step_norm": 0.5}
    names = ["sgd", "adamw", "newton", "q-newton"] + (["newton-ef"] if args.lora_ef_reference else [])
    for name in names:
        hp = ef if name == "newton-ef" else dict(chosen, row_keep=args.row_keep)
        out["runs"][name] = train(name, pools["train"], hp, evaluate=True, lr=fo_lr.get(name))
        print(f"lora {name}: final loss {out['runs'][name]['final_loss']:.4f}, "
              f"test acc {out['runs'][name]['eval']['accuracy']:.3f}", flush=True)
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The LoRA part's command-line options."""
    ap.add_argument("--lora-fo-steps", type=int, default=15, help="AdamW/SGD steps on the LoRA (Newton: / 5)")
    ap.add_argument("--lora-pool", type=int, default=16, help="examples of the LoRA's full batch (train; validation)")
    ap.add_argument("--lora-lm-init", type=float, nargs="+", default=[0.1, 1.0],
                    help="initial Levenberg-Marquardt λ (fraction τ of the first λ_max) to choose from on validation")
    ap.add_argument("--lora-krylov", type=int, nargs="+", default=[10],
                    help="Krylov dimensions (GGN products per Newton step) to choose from on the validation pool")
    ap.add_argument("--lora-lm-relative", nargs="+", choices=["off", "on"], default=["off", "on"],
                    help="Levenberg-Marquardt λ rescaled by the curvature's scale at every step (choose on validation)")
    ap.add_argument("--lora-adamw-lr", type=float, nargs="+", default=[2e-3, 5e-3, 1e-2, 2e-2],
                    help="AdamW learning rates to choose from on the validation pool")
    ap.add_argument("--lora-sgd-lr", type=float, nargs="+", default=[0.05, 0.1, 0.5],
                    help="SGD learning rates to choose from on the validation pool")
    ap.add_argument("--lora-trust", type=float, default=None, help="max_step_norm of the LoRA Newton runs (None: off)")
    ap.add_argument("--lora-ef-reference", action="store_true",
                    help="also run the previous method (empirical Fisher, fixed damping, trust 0.5) as newton-ef")
