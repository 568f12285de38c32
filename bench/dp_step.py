"""Time and peak memory of a DP-SGD step against a non-private step, in one process.

    flock /tmp/expertkit-bench.lock .venv/bin/python bench/dp_step.py --scheme lora --batches 8,16 --reps 3
    .venv/bin/python bench/dp_step.py --tiny --batches 4 --reps 1     # smoke: a tiny random Llama

On the bundled SmolLM2-135M-Instruct (fp32, CPU), for each batch of ``--task`` training examples
(prompts cut to their last ``--seq`` tokens): the plain AdamW step (mean loss, backward, clip, update)
and the ``dp-adamw`` step (Opacus per-example gradients, clipping, noise, accountant, update) on the
same batch and the same trainable parameters. The two are interleaved ``--reps`` times after one
warm-up each (Opacus's hooks are switched off for the plain step), so a change of machine load hits
both; the medians, their ratio, each step's peak RSS above the RSS before it (``VmHWM`` reset before
every step) and the load average are printed. Per-example gradients cost memory in proportion to
batch x trainable parameters: small for LoRA and prefix, large for ``--scheme full``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


def measure(fn: Any) -> tuple[float, int]:
    """``(seconds, peak RSS bytes above the RSS before)`` of one call of ``fn``."""
    from expertkit.procmem import reset_peak, status

    reset_peak()
    before = status("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return seconds, max(0, status("VmHWM") - before)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Parse arguments, build the model and both optimizers, print one block per batch; return the rows."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scheme", default="lora", choices=("lora", "full", "prefix"))
    ap.add_argument("--batches", default="8,16")
    ap.add_argument("--task", default="bbc_topic")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama and the toy lo-hi task (smoke)")
    args = ap.parse_args(argv)

    import torch

    from expertkit.models import load_model
    from expertkit.models.loader import LoadedModel
    from expertkit.progress import set_quiet
    from expertkit.train import LoraTrainConfig, build_optimizer
    from expertkit.train.data import encode_examples, make_loss_fn
    from expertkit.train.schemes import wrap

    set_quiet(True)
    torch.manual_seed(0)
    if args.tiny:
        from expertkit.models.tiny import tiny_model, tiny_tokenizer
        from expertkit.tasks.toy import lohi_task

        lm, task = LoadedModel("tiny", tiny_model("llama"), tiny_tokenizer(), None, None), lohi_task()
    else:
        from expertkit.tasks import get_task

        lm, task = load_model("smollm2-135m"), get_task(args.task)
    model, give_back = wrap(lm.model, LoraTrainConfig(scheme=args.scheme, num_virtual_tokens=10), lm.path)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params, names = [p for _, p in named], [n for n, _ in named]
    n_params = sum(p.numel() for p in params)
    rows_out = []
    for batch in (int(b) for b in args.batches.split(",")):
        rows = encode_examples(lm.tokenizer, task, task.examples("train", batch, 0), args.seq)
        loss_fn = make_loss_fn(model, lm.tokenizer, rows)
        plain = build_optimizer("adamw", params, lr=1e-4, steps=10, seed=0, names=names, model=model)
        dp = build_optimizer("dp-adamw", params, lr=1e-4, steps=10, seed=0, names=names, model=model,
                             hparams={"noise_multiplier": 1.0, "delta": 1e-6}, pool_size=100 * batch, batch_size=batch)

        def plain_step(dp: Any = dp, plain: Any = plain, loss_fn: Any = loss_fn) -> None:
            dp.gsm.disable_hooks()
            try:
                plain.step(loss_fn, 1e-4)
            finally:
                dp.gsm.enable_hooks()

        def dp_step(dp: Any = dp, loss_fn: Any = loss_fn) -> None:
            dp.step(loss_fn, 1e-4)

        fns = {"plain": plain_step, "dp": dp_step}
        for f in fns.values():
            f()  # warm-up
        times: dict[str, list[float]] = {k: [] for k in fns}
        peaks: dict[str, list[int]] = {k: [] for k in fns}
        load0 = open("/proc/loadavg").read().split()[:3]
        for _ in range(args.reps):
            for k, f in fns.items():
                s, m = measure(f)
                times[k].append(s)
                peaks[k].append(m)
        load1 = open("/proc/loadavg").read().split()[:3]
        dp.close()
        med = {k: statistics.median(v) for k, v in times.items()}
        peak = {k: max(v) / 2**20 for k, v in peaks.items()}
        width = max(len(p) + len(t) for p, t in rows)
        print(f"{args.scheme} ({n_params:,} trainable), batch {batch} x {width} tokens, reps {args.reps}, "
              f"load {' '.join(load0)} -> {' '.join(load1)}")
        print(f"  step: plain {med['plain']:.3f} s, dp {med['dp']:.3f} s, dp / plain {med['dp'] / med['plain']:.2f}x; "
              f"peak RSS above start: plain {peak['plain']:.0f} MiB, dp {peak['dp']:.0f} MiB", flush=True)
        rows_out.append({"scheme": args.scheme, "batch": batch, "seconds": med, "peak_mib": peak,
                         "ratio": med["dp"] / med["plain"], "load": [load0, load1]})
    give_back()
    return rows_out


if __name__ == "__main__":
    main()
