"""Before/after of the ZO-SGD step: a forward, the five-pass step of an older engine, the fused step.

    git show 256893c:src/expertkit/optim/zo/engine.py > /tmp/engine_old.py
    .venv/bin/python bench/zo_step_ab.py --old-engine /tmp/engine_old.py --scheme full --batches 4,16,32,64

On the bundled SmolLM2-135M-Instruct (fp32), for each batch of ``--task`` training examples
(prompts cut to their last ``--seq`` tokens), in one process: a plain forward pass, the
previous engine's ZO-SGD step (its ``ZOMethod.step`` for q = 1 replayed call for call:
perturb +εz, forward, undo, perturb -εz, forward, undo, update), and the current fused step,
each with and without the exact restore. The five timings are interleaved ``--reps`` times
after one warm-up each (the machine is shared: a change of load hits every row) and the
medians are printed with their ratio to the forward pass and the load average.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from typing import Any


def _load_engine(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("zo_engine_old", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def main() -> None:
    """Parse arguments, build the model and both engines, print one block per batch."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old-engine", required=True, help="engine.py of the version to compare with")
    ap.add_argument("--scheme", default="full", choices=("lora", "full", "prefix", "prompt"))
    ap.add_argument("--batches", default="16")
    ap.add_argument("--task", default="bbc_topic")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import torch

    from expertkit.models import load_model
    from expertkit.optim.zo import zo_defaults
    from expertkit.progress import set_quiet
    from expertkit.tasks import get_task
    from expertkit.train import LoraTrainConfig, build_optimizer
    from expertkit.train.data import encode_examples, make_loss_fn
    from expertkit.train.schemes import wrap

    set_quiet(True)
    torch.manual_seed(0)
    old = _load_engine(args.old_engine)
    lm = load_model("smollm2-135m")
    model, _ = wrap(lm.model, LoraTrainConfig(scheme=args.scheme, num_virtual_tokens=10), lm.path)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    d = zo_defaults(args.scheme)
    lr, eps = d["lr"], d["eps"]
    new = {ex: build_optimizer("zo-sgd", params, lr=lr, steps=10, seed=0, hparams={"eps": eps, "exact_restore": ex},
                               names=[n for n, _ in named], model=model) for ex in (True, False)}
    old_eng = {ex: old.ZOEngine(params, exact=ex) for ex in (True, False)}
    ids = list(range(len(params)))
    task = get_task(args.task)
    for batch in (int(b) for b in args.batches.split(",")):
        rows = encode_examples(lm.tokenizer, task, task.examples("train", batch, 0), args.seq)
        loss_fn = make_loss_fn(model, lm.tokenizer, rows)

        def loss(loss_fn: Any = loss_fn) -> float:
            with torch.no_grad():
                return float(loss_fn().mean())

        def old_step(exact: bool, loss: Any = loss) -> None:
            eng = old_eng[exact]
            p = eng.add(ids, [7], [eps], record=True)
            plus = loss()
            eng.undo(ids, [7], [eps], p)
            p = eng.add(ids, [7], [-eps], record=True)
            minus = loss()
            eng.undo(ids, [7], [-eps], p)
            g = (plus - minus) / (2 * eps)
            eng.add(ids, [7], [g], transform=lambda i, gh: gh.mul_(-lr))

        fns = {"forward": loss, "before": lambda: old_step(True), "after": lambda lf=loss_fn: new[True].step(lf, lr),
               "before plain": lambda: old_step(False), "after plain": lambda lf=loss_fn: new[False].step(lf, lr)}
        for f in fns.values():
            f()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in fns}
        load0 = open("/proc/loadavg").read().split()[:3]
        for _ in range(args.reps):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        load1 = open("/proc/loadavg").read().split()[:3]
        med = {k: statistics.median(v) for k, v in times.items()}
        width = max(len(p) + len(t) for p, t in rows)
        print(f"{args.scheme} batch {batch} x {width} tokens ({sum(len(p) + len(t) for p, t in rows)} real), "
              f"reps {args.reps}, load {' '.join(load0)} -> {' '.join(load1)}")
        print("  " + ", ".join(f"{k} {v:.3f} s" for k, v in med.items()))
        print("  step / forward: " + ", ".join(f"{k} {med[k] / med['forward']:.2f}x" for k in fns if k != "forward"),
              flush=True)


if __name__ == "__main__":
    main()
