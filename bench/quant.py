"""Post-training quantization: expertkit's GPTQ and RTN against auto-round and optimum-quanto, in one run.

    flock /tmp/expertkit-bench.lock .venv/bin/python bench/quant.py [--model smollm2-135m | --tiny] \\
        [--bits 4 3] [--tools gptq rtn auto-round quanto gptq-clip rtn-clip gptq-stream] [--group-size 64] [--calib-blocks 32] \\
        [--seq-len 128] [--ppl-blocks 32] [--ar-iters 200] [--json OUT]

Same model (``--model``: a bundled name or folder; ``--tiny``: a tiny random Llama with the
character tokenizer, for smoke tests), same bits, group size (``--group-size``, default 64: it
divides SmolLM2-135M's widths 576 and 1536, which 128 does not) and symmetric grids wherever the
tool lets one say so (optimum-quanto's int4/int2 groups are its own 128), same calibration data:
``--calib-blocks`` blocks of ``--seq-len`` tokens of
BBC News validation text (:func:`expertkit.quant.data.calibration_batches`; auto-round gets the
same blocks decoded to text, and tokenizes them itself), and the quality check on other text: the
perplexity of every result on ``--ppl-blocks`` blocks of BBC News *test* text
(:mod:`expertkit.tasks.perplexity`), beside the unquantized model's, so speed is not bought with
quality. Only the decoder's linear layers are quantized (expertkit's targets; the peers are told to
leave ``lm_head`` alone).

* ``gptq`` / ``rtn``: :func:`expertkit.quant.quantize_model` (uniform policy); the time includes
  GPTQ's calibration pass (the Hessians). ``gptq-clip`` / ``rtn-clip``: the same with the scales'
  clipping search (``clip_grid`` 20: each group's range tried shrunk down to 40%, least squared error kept).
  ``gptq-stream``: GPTQ with ``layers_per_pass: 1``, the Hessians of one layer at a time, each gathered on the
  model whose earlier layers are already quantized (each layer sees its inputs' quantization error); measured
  on SmolLM2-135M in docs/benchmarks.md (0.62-0.69x gptq's peak at 2.9-3.3x its time).
* ``auto-round`` (0.16.1): ``AutoRound(model, tokenizer, bits, group_size, sym=True, dataset=texts,
  nsamples, seqlen, iters=--ar-iters, device_map="cpu").quantize()`` (SignRound; its default 200
  iterations per block; ``--ar-iters 0`` is its RTN mode).
* ``quanto`` (optimum-quanto 0.2.7): ``quantize(model, weights=qint<bits>, exclude="lm_head")`` then
  ``freeze`` (round to nearest on quanto's grid; it has qint2, qint4 and qint8 only, so 3 bits fails).

Each (tool, bits) is a fresh child process: it loads the model, then is timed (wall and CPU) and its
peak RSS above the loaded model's RSS is measured (``VmHWM`` after a reset), then the perplexity is
computed. A tool that fails prints its last error line in the table and the run goes on. "time /
gptq" and "ppl / unquantized" are the ratios to the same run's expertkit GPTQ at the same bits and to
the unquantized model. The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = ["gptq", "rtn", "auto-round", "quanto"]
CLIP_GRID = 20  # ranges tried per group by the -clip variants (QuantizeConfig.clip_grid)


# ------------------------------------------------------------------------------------------ children
def _tiny(work: Path) -> str:
    from expertkit.models.tiny import tiny_model, tiny_tokenizer

    path = work / "tiny-llama"
    tiny_model("llama", 0).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def _quantize(tool: str, bits: int, loaded, args: argparse.Namespace) -> None:
    """Quantize ``loaded.model`` in place with ``tool``."""
    from expertkit.quant.data import calibration_batches

    if tool == "none":
        return
    batches = calibration_batches(loaded.tokenizer, text_blocks=args.calib_blocks, seq_len=args.seq_len)
    if tool in ("gptq", "rtn", "gptq-clip", "rtn-clip", "gptq-stream"):
        from expertkit.quant.config import QuantizeConfig
        from expertkit.quant.run import quantize_model

        config = QuantizeConfig.model_validate({
            "model": args.model, "method": tool.removesuffix("-clip").removesuffix("-stream"),
            "group_size": args.group_size, "symmetric": True, "clip_grid": CLIP_GRID if tool.endswith("-clip") else 0,
            "policy": {"kind": "uniform", "bits": bits},
            "calibration": {"text_blocks": args.calib_blocks, "seq_len": args.seq_len, "min_tokens_per_expert": 0,
                            "layers_per_pass": 1 if tool.endswith("-stream") else 0}})
        quantize_model(config, loaded, batches=batches)
    elif tool == "auto-round":
        from auto_round import AutoRound

        texts = [loaded.tokenizer.decode(row) for ids, _ in batches for row in ids]
        ar = AutoRound(loaded.model, tokenizer=loaded.tokenizer, bits=bits, group_size=args.group_size, sym=True,
                       dataset=texts, nsamples=len(texts), seqlen=args.seq_len, iters=args.ar_iters, device_map="cpu",
                       layer_config={"lm_head": {"bits": 16}})
        ar.quantize()
    elif tool == "quanto":
        import optimum.quanto as quanto

        qtype = getattr(quanto, f"qint{bits}", None)
        if qtype is None:
            raise ValueError(f"optimum-quanto has no {bits}-bit weight type (qint2, qint4, qint8)")
        quanto.quantize(loaded.model, weights=qtype, exclude="lm_head")
        quanto.freeze(loaded.model)
    else:
        raise ValueError(f"unknown tool {tool}")


def _child(args: argparse.Namespace) -> dict:
    import resource

    import torch

    from expertkit.models import load_model
    from expertkit.procmem import reset_peak, status
    from expertkit.progress import set_quiet
    from expertkit.tasks.perplexity import block_nll, heldout_blocks, perplexity

    set_quiet(True)
    loaded = load_model(args.model)
    held = heldout_blocks(loaded.tokenizer, split="test", seq_len=args.seq_len, n_blocks=args.ppl_blocks)
    tool, bits = args.child, args.child_bits
    hwm_reset = reset_peak()
    baseline = status("VmRSS")
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    try:
        _quantize(tool, bits, loaded, args)
    except Exception as exc:  # a peer that fails is reported, not fatal
        last = (str(exc).strip().splitlines() or [""])[-1]
        return {"tool": tool, "bits": bits, "error": f"{type(exc).__name__}: {last}"[:200]}
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = status("VmHWM") if hwm_reset else cpu1.ru_maxrss * 1024
    with torch.no_grad():
        ppl = perplexity(block_nll(loaded.model, held))
    return {"tool": tool, "bits": bits, "wall_s": wall, "cpu_s": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime
            - cpu0.ru_stime, "peak_above_loaded": peak - baseline, "ppl": ppl}


# -------------------------------------------------------------------------------------------- parent
def _run(args: argparse.Namespace, tool: str, bits: int) -> dict:
    cmd = [sys.executable, __file__, "--child", tool, "--child-bits", str(bits), "--model", args.model,
           "--group-size", str(args.group_size), "--calib-blocks", str(args.calib_blocks),
           "--seq-len", str(args.seq_len),
           "--ppl-blocks", str(args.ppl_blocks), "--ar-iters", str(args.ar_iters)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"tool": tool, "bits": bits, "error": f"exit {proc.returncode}: {last}"[:200]}
    return json.loads(lines[-1])


def main() -> None:
    """Parse arguments, run every (tool, bits) in a fresh process, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama (smoke test)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--tools", nargs="+", default=TOOLS, choices=[*TOOLS, "gptq-clip", "rtn-clip", "gptq-stream"])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-blocks", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--ppl-blocks", type=int, default=32)
    ap.add_argument("--ar-iters", type=int, default=200)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-bits", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "tiny":
        print(json.dumps({"model": _tiny(Path(args.model))}))
        return
    if args.child:
        print(json.dumps(_child(args)))
        return
    before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="quant-bench-"))
    try:
        if args.tiny:
            proc = subprocess.run([sys.executable, __file__, "--child", "tiny", "--model", str(work)],
                                  capture_output=True, text=True, check=True)
            args.model = json.loads(proc.stdout.strip().splitlines()[-1])["model"]
        rows = [_run(args, "none", 0)]  # the unquantized model: its perplexity
        rows += [_run(args, tool, bits) for bits in args.bits for tool in args.tools]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    after = os.getloadavg()
    _report(args, rows, before, after)


def _report(args: argparse.Namespace, rows: list[dict], before: tuple, after: tuple) -> None:
    base = rows[0].get("ppl")
    gptq = {r["bits"]: r["wall_s"] for r in rows if r["tool"] == "gptq" and "wall_s" in r}
    print(f"model {args.model}; calibration {args.calib_blocks} x {args.seq_len} tokens (BBC validation); "
          f"perplexity on {args.ppl_blocks} x {args.seq_len} tokens (BBC test); unquantized perplexity "
          f"{base if base is None else round(base, 3)}")
    print("| tool | bits | quantize wall | CPU s | peak above loaded model | time / gptq | perplexity | "
          "ppl / unquantized |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows[1:]:
        if "error" in r:
            print(f"| {r['tool']} | {r['bits']} | failed: {r['error']} | | | | | |")
            continue
        ratio = f"{r['wall_s'] / gptq[r['bits']]:.2f}x" if r["bits"] in gptq else "-"
        rel = f"{r['ppl'] / base:.3f}x" if base else "-"
        print(f"| {r['tool']} | {r['bits']} | {r['wall_s']:.2f} s | {r['cpu_s']:.2f} | "
              f"{r['peak_above_loaded'] / 1e6:.1f} MB | {ratio} | {r['ppl']:.3f} | {rel} |")
    print(f"load average {before[0]:.2f} {before[1]:.2f} {before[2]:.2f} before, "
          f"{after[0]:.2f} {after[1]:.2f} {after[2]:.2f} after")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "load_before": before, "load_after": after}, indent=1))


if __name__ == "__main__":
    main()
