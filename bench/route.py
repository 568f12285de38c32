"""Routing overhead per generated token against one LoRA, and the cost of writing a query's instruction.

    flock /tmp/expertkit-bench.lock .venv/bin/python bench/route.py [--experts 10] [--batch 8] [--new-tokens 32]
    .venv/bin/python bench/route.py --smoke          # a tiny random llama: checks the script

In one process, on the bundled SmolLM2-135M-Instruct (fp32) with ``--experts`` random rank-8 LoRA
experts on all seven projections (routing cost does not depend on what the experts learned):

* per generated token (batched greedy generation of ``--new-tokens`` tokens for ``--batch`` prompts):
  the base model; one LoRA adapter through PEFT (the "single merged LoRA": the experts merged into
  one adapter, applied unmerged as LoRA is served); expertkit's routed layer with fixed uniform
  weights (the mixing cost without routing decisions); Phatgoose (local, top-k); GLIDER (local +
  alpha x global, top-k). Timings are interleaved ``--reps`` times after a warm-up and medians kept;
* per query: writing the instruction (one batched greedy generation of at most 32 tokens, the cache
  off) against answering it with GLIDER.

Prints each median, its ratio to the single LoRA (and the instruction's to the routed answer) and
the load average before and after; record them in docs/benchmarks.md with this command.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Any


def _stacks(model: Any, n_experts: int, rank: int, modules: tuple[str, ...], seed: int) -> dict[str, Any]:
    import torch

    from expertkit.route.library import LoraStack

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.rsplit(".", 1)[-1] in modules:
            d_in, d_out = layer.in_features, layer.out_features
            a = torch.randn(n_experts, rank, d_in, generator=gen) / d_in**0.5  # (E, r, in)
            b = torch.randn(n_experts, d_out, rank, generator=gen) * 0.01  # (E, out, r)
            out[name] = LoraStack(a, b, torch.randn(n_experts, d_in, generator=gen))  # gates (E, in)
    return out


def _time(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:  # noqa: PLR0915 - one linear benchmark
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=10)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--queries", type=int, default=8, help="queries whose instructions are written")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny random llama, 3 experts, few tokens")
    args = ap.parse_args()
    if args.smoke:
        args.experts, args.batch, args.new_tokens, args.queries, args.reps = 3, 2, 3, 2, 1

    import torch
    from peft import LoraConfig, get_peft_model

    from expertkit.models import load_model
    from expertkit.models.loader import LoadedModel
    from expertkit.progress import set_quiet
    from expertkit.route.global_router import InstructionWriter
    from expertkit.route.layers import RouteState, attach, query_hook
    from expertkit.tasks import get_task
    from expertkit.tasks.infer import pad, pad_id_of

    set_quiet(True)
    modules = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj")
    if args.smoke:
        from expertkit.models.tiny import tiny_model, tiny_tokenizer

        loaded = LoadedModel("tiny", tiny_model("llama"), tiny_tokenizer(), None, "tiny")
        template = "Input: {query}\nTask:"
    else:
        loaded = load_model("smollm2-135m")
        template = None
    model, tok = loaded.model, loaded.tokenizer
    task = get_task("gcd")
    prompts = [task.format_prompt(e) for e in task.examples("test", max(args.batch, args.queries), 0)]
    if args.smoke:
        prompts = [p[-40:] for p in prompts]
    ids = [list(x) for x in tok(prompts[: args.batch]).input_ids]
    stacks = _stacks(model, args.experts, 8, modules, 0)
    gen = torch.Generator().manual_seed(1)
    table = {tuple(i): torch.rand(args.experts, generator=gen) for i in ids}

    x, mask = pad(ids, pad_id_of(tok), side="left")  # (B, L) each

    def generate(m: Any) -> None:
        # exactly new_tokens per row (no EOS, no line stop): every system makes the same number of tokens
        m.generate(input_ids=x, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                   do_sample=False, pad_token_id=pad_id_of(tok), eos_token_id=None)

    def run_base() -> float:
        return _time(lambda: generate(model))

    # PEFT wraps layers in place: the single LoRA gets its own copy of the base
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=list(modules),
                                                                 init_lora_weights=False))
    peft_model.eval()

    def run_lora() -> float:
        return _time(lambda: generate(peft_model))

    def routed(mode: str) -> float:
        state = RouteState(mode=mode, top_k=args.top_k, alpha=1.0, table=table,
                           weights=torch.full((args.experts,), 1 / args.experts) if mode == "fixed" else None)
        detach = attach(model, stacks, state)
        remove = query_hook(model, state)
        try:
            return _time(lambda: generate(model))
        finally:
            remove()
            detach()

    rows: dict[str, list[float]] = {k: [] for k in ("base", "lora", "uniform-mix", "phatgoose", "glider")}
    load_before = os.getloadavg()
    with torch.inference_mode():
        for rep in range(args.reps + 1):  # rep 0 warms up
            times = {"base": run_base(), "lora": run_lora(), "uniform-mix": routed("fixed"),
                     "phatgoose": routed("local"), "glider": routed("glider")}
            if rep:
                for k, v in times.items():
                    rows[k].append(v)
    writer = InstructionWriter(loaded, cache_dir=None, **({"template": template, "max_query_chars": 60} if template else {}))
    queries = prompts[: args.queries]
    writes = []
    for _ in range(args.reps):
        w = InstructionWriter(loaded, cache_dir=None, template=writer.template, max_query_chars=writer.max_query_chars)
        writes.append(_time(lambda w=w: w(queries)))
    load_after = os.getloadavg()
    tokens = args.batch * args.new_tokens
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{args.experts} experts, top-{args.top_k}, batch {args.batch} x {args.new_tokens} new tokens, "
          f"{args.reps} reps")
    for k, v in med.items():
        print(f"  {k:<12} {1000 * v / tokens:8.2f} ms/token   {v / med['lora']:.2f}x single LoRA")
    w_med = statistics.median(writes) / len(queries)
    answer = med["glider"] / args.batch
    print(f"  instruction  {w_med:8.3f} s/query ({len(queries)} queries batched)   "
          f"{w_med / answer:.2f}x answering a query with GLIDER ({args.new_tokens} tokens)")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")


if __name__ == "__main__":
    main()
