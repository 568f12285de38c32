"""Zeroth-order memory and time benchmark: every method x scheme beside inference and first-order.

    .venv/bin/python bench/zo_memory.py [--schemes lora,full,prefix,prompt] [--methods ...]
                                        [--short prefix,prompt] [--batch 8] [--steps 2]
                                        [--task family_relation] [--seq 64]
                                        [--no-warmup] [--json out.json]

On the bundled SmolLM2-135M-Instruct (fp32) and one fixed batch of ``--task`` training
examples (prompts cut to their last ``--seq`` tokens; ``bbc_topic`` prompts are long news
articles, so ``--task bbc_topic --seq 128`` gives rows of about 128 tokens), each configuration runs in a **fresh child process** (the parent never
imports torch): load the model, wrap it for the scheme, build the optimizer, run one
untimed warm-up step (unless ``--no-warmup``), reset the kernel's peak-RSS mark (``VmHWM`` via
``/proc/self/clear_refs``; ``ru_maxrss`` when that is not permitted), then ``--steps`` times:
one timed step, one timed plain forward pass of the same batch (``torch.no_grad``); read the
peak. Times are the medians; step and forward alternate so that a change of the shared
machine's load affects both. Reported:

* peak RSS of the whole process during the steps, and its ratio to the inference row's
  (the same model running forward passes only, measured the same way);
* seconds per step and its ratio to a forward pass of the same batch **in the same child**
  (the machine is shared; both figures see the same load). Two forwards is ZO-SGD's floor.

First-order rows (``sgd``, ``adamw``) back-propagate. ZO rows use the per-scheme defaults
(``expertkit.optim.zo.zo_defaults``); ``zo-sgd*`` is ZO-SGD with ``exact_restore=False``
(MeZO's in-place arithmetic restore, no patches).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from expertkit.procmem import reset_peak, status

METHODS = ("zo-sgd", "zo-sgd*", "zo-sgd-sign", "zo-sgd-scalar-sign", "zo-sgd-mmt", "zo-sgd-cons", "zo-adam",
           "forward-grad", "sgd", "adamw")
SCHEMES = ("lora", "full", "prefix", "prompt")


def child(spec: dict) -> dict:
    """Run one configuration; return its figures (called in a fresh process)."""
    import resource

    import torch

    from expertkit.models import load_model
    from expertkit.progress import set_quiet
    from expertkit.tasks import get_task
    from expertkit.train import LoraTrainConfig, build_optimizer
    from expertkit.train.data import encode_examples, make_loss_fn
    from expertkit.train.schemes import wrap

    set_quiet(True)
    torch.manual_seed(0)
    lm = load_model("smollm2-135m")
    task = get_task(spec.get("task", "family_relation"))
    rows = encode_examples(lm.tokenizer, task, task.examples("train", spec["batch"], 0), spec.get("seq", 64))
    method, scheme = spec["method"], spec["scheme"]
    model = lm.model
    opt, lr = None, 1e-3
    if method != "inference":
        cfg = LoraTrainConfig(scheme=scheme, num_virtual_tokens=10)
        model, _ = wrap(lm.model, cfg, lm.path)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        hp: dict = {}
        name = method
        if method == "zo-sgd*":
            name, hp = "zo-sgd", {"exact_restore": False}
        from expertkit.train.optimizers import optimizer_entry

        if optimizer_entry(name).extra.get("zo"):
            from expertkit.optim.zo import zo_defaults

            d = zo_defaults(scheme)
            lr, hp = d["lr"], {"eps": d["eps"], **hp}
        opt = build_optimizer(name, [p for _, p in named], lr=lr, steps=10, seed=0, hparams=hp,
                              names=[n for n, _ in named], model=model)
    loss_fn = make_loss_fn(model, lm.tokenizer, rows)

    def forward() -> None:
        with torch.no_grad():
            loss_fn()

    def step() -> None:
        if opt is None:
            forward()
        else:
            opt.step(loss_fn, lr)

    if spec["warmup"]:
        step()  # first-call overheads; optimizer state already allocated when the peak is read
    rss0 = status("VmRSS")
    exact = reset_peak()  # from here: the step's own peak (its optimizer state included)
    step_t, fwd_t = [], []
    for _ in range(spec["steps"]):  # interleaved, so a change of the shared machine's load hits both
        t0 = time.perf_counter()
        step()
        step_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        forward()
        fwd_t.append(time.perf_counter() - t0)
    peak = status("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step_s, fwd_s = statistics.median(step_t), statistics.median(fwd_t)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if opt is not None else 0
    return {**spec, "peak": peak, "rss_before": rss0, "step_s": step_s, "fwd_s": fwd_s, "hwm_reset": exact,
            "step_times": step_t, "fwd_times": fwd_t,
            "trainable": trainable, "tokens": sum(len(p) + len(t) for p, t in rows),
            "width": max(len(p) + len(t) for p, t in rows), "threads": torch.get_num_threads()}


def run_child(spec: dict) -> dict:
    """Run :func:`child` in a fresh interpreter and parse its JSON line."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {**spec, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


def table(results: list[dict]) -> str:
    """The markdown table of results (ratios to the inference row)."""
    inf = next(r for r in results if r["method"] == "inference")
    out = ["| scheme | method | trainable | peak RSS | peak / inference | s / step | step / forward |",
           "|---|---|---:|---:|---:|---:|---:|",
           f"| - | inference (forward only) | 0 | {inf['peak'] / 2**20:.0f} MiB | 1.00x | "
           f"{inf['step_s']:.2f} | {inf['step_s'] / inf['fwd_s']:.2f}x |"]
    for r in results:
        if r["method"] == "inference":
            continue
        if "error" in r:
            out.append(f"| {r['scheme']} | {r['method']} | - | error: {r['error'][:80]} | | | |")
            continue
        out.append(f"| {r['scheme']} | {r['method']} | {r['trainable']:,} | {r['peak'] / 2**20:.0f} MiB | "
                   f"{r['peak'] / inf['peak']:.2f}x | {r['step_s']:.2f} | {r['step_s'] / r['fwd_s']:.2f}x |")
    return "\n".join(out)


def main() -> None:
    """Parse arguments; run every configuration in its own child; print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--task", default="family_relation", help="task whose training examples form the batch")
    ap.add_argument("--seq", type=int, default=64, help="prompt tokens kept per example (the last ones)")
    ap.add_argument("--no-warmup", action="store_true", help="time the first step too (saves a step per row)")
    ap.add_argument("--short", default="prefix,prompt",
                    help="schemes run with zo-sgd, zo-adam and adamw only (saves time)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    common = {"batch": args.batch, "steps": args.steps, "warmup": not args.no_warmup, "task": args.task,
              "seq": args.seq}
    short = set(args.short.split(",")) if args.short else set()
    specs = [{"method": "inference", "scheme": "-", **common}]
    specs += [{"method": m, "scheme": s, **common}
              for s in args.schemes.split(",") for m in args.methods.split(",")
              if (m != "zo-sgd*" or s == "full")  # the patches only matter for full fine-tuning
              and (s not in short or m in ("zo-sgd", "zo-adam", "adamw"))]
    results = []
    started = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        res = run_child(spec)
        results.append(res)
        shown = res.get("error") or f"peak {res['peak'] / 2**20:.0f} MiB, {res['step_s']:.2f} s/step"
        print(f"[{i}/{len(specs)}] {spec['scheme']} {spec['method']}: {shown}", file=sys.stderr, flush=True)
    print(table(results))
    inf = results[0]
    if "error" not in inf:
        print(f"\nbatch {inf['batch']} x {inf['width']} tokens ({inf['task']}, {inf['tokens']} real tokens), "
              f"{inf['threads']} threads", file=sys.stderr)
    print(f"\n{len(specs)} configurations in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
