"""Streaming MoE compression: time and peak memory per method, against limits measured in the same run.

    flock /tmp/expertkit-bench.lock .venv/bin/python bench/moe_compress.py [--model FOLDER | --tiny] \\
        [--methods msmoe average hcsmoe prune_frequency reap] [--experts-per-layer 4] [--lowrank KEEP] \\
        [--repeats 3] [--json OUT] [--profile METHOD]

Subject: ``--model`` (an MoE folder), else the MoE of the default recipe of ``expertkit moe build``
when it is in the cache (``<cache>/moe-build/<fingerprint>/moe``; the bench never builds it: that
takes about an hour), else use ``--tiny``: a tiny random Mixtral (4 layers, 8 experts, hidden 64,
intermediate 256) written to a temporary folder, for smoke tests.

What is timed is :func:`expertkit.moe.compress.compress_checkpoint`, the streaming pass (one new
expert in memory at a time, the output written as it goes, the stock transformers form beside it
unless ``--no-stock``), for each method with its default parameters at the same expert budget.
The calibration it needs (routing statistics and REAP scores of the subject's own build tasks,
:func:`expertkit.moe.compress.calibrate`, cached) runs once before, in its own process, and is
reported apart; ``--tiny`` uses synthetic statistics of the right shapes instead (the pass's cost
does not depend on their values).

Two limits, measured in the same run, make the figures ratios:

* time: a plain streamed copy of the same checkpoint through the weights engine
  (``Checkpoint.iter_tensors`` -> ``ShardedWriter``, with its fsync): "time / copy" is the
  compression's wall time over it (the compression writes the model once, plus its stock form);
* memory: the largest MoE layer's experts in float32 plus the statistics: "peak / limit" is the
  pass's peak RSS above its import baseline (expertkit, torch, and the scipy modules the methods
  use) over that (goal, issue 13: at most 1). The pass holds one new expert and its members' matrices
  one at a time, so it can stay below one layer.

``--profile METHOD`` runs one pass of that method instead, with the resident set sampled every 2 ms
in a thread and each sample labelled by the pass's phase (the alignment's anchor and matching, the
C step's factorisation, the writer, the rest of ``write_layer``, the planning before it): the table
gives each phase's peak above the import baseline, split into anonymous and file-backed pages (code
pages of libraries loaded on first use show as file-backed). That is how the peaks in
docs/benchmarks.md were placed.

Every measured step is a fresh child process (the parent never imports torch, so a child's
``ru_maxrss`` starts low); its peak is ``VmHWM`` after a reset (``/proc/self/clear_refs``) minus
its RSS after imports and loading the statistics. The steps run ``--repeats`` times in
alternating order; medians are shown with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ["msmoe", "average", "hcsmoe", "prune_frequency", "reap"]
TINY = {"num_local_experts": 8, "num_hidden_layers": 4, "intermediate_size": 256}


# ------------------------------------------------------------------------------------------ children
def _default_moe() -> Path:
    """The cached MoE of the default build recipe (no build: that takes about an hour)."""
    from expertkit.models.bundled import cache_root
    from expertkit.moe import MoeBuildConfig

    want = json.loads(json.dumps(MoeBuildConfig().fingerprint_fields()))
    for meta in sorted((cache_root() / "moe-build").glob("*/moe/moe_build.json")):
        if json.loads(meta.read_text()).get("recipe") == want:
            return meta.parent
    sys.exit("the default MoE is not in the cache: build it (`expertkit moe build`, about an hour on 2 cores), "
             "give --model FOLDER, or pass --tiny for a smoke test.")


def _tiny(work: Path) -> dict:
    from expertkit.models.tiny import tiny_model, tiny_tokenizer

    path = work / "tiny-mixtral"
    tiny_model("mixtral", 0, **TINY).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return {"model": str(path)}


def _prepare(model: str, work: Path, epl: float, synthetic: bool) -> dict:
    """Statistics and expert counts for every method (saved to ``work``), and the memory limit."""
    import numpy as np

    from expertkit.moe.compress import CompressConfig, LayerStats, calibrate, keep_per_layer
    from expertkit.moe.compress.layers import MoeCheckpoint
    from expertkit.weights import Checkpoint

    folder = Path(model) if model else _default_moe()
    with Checkpoint(folder) as ckpt:
        moe = MoeCheckpoint(ckpt)
        layer_bytes = max(sum(4 * _numel(moe.shapes[n]) for p in names.experts.values() for n in p.values())
                          for names in moe.layers.values())
        model_bytes = sum(i.nbytes for i in ckpt.infos())
        n_layers, n_experts = len(moe.layers), moe.num_experts
        hidden = moe.shapes[next(iter(moe.layers.values())).experts[0]["gate"]][1]
        layers = [str(k[1]) for k in moe.layers]
    t0 = time.perf_counter()
    if synthetic:  # the pass's cost does not depend on the values: right shapes, seeded
        rng = np.random.default_rng(0)
        sim = rng.uniform(-1, 1, (n_layers, n_experts, n_experts))
        stats = LayerStats(rng.dirichlet(np.ones(n_experts), n_layers), (sim + sim.transpose(0, 2, 1)) / 2,
                           rng.normal(size=(n_layers, n_experts, hidden)), rng.uniform(size=(n_layers, n_experts)),
                           layers)
        keep = [max(1, round(epl))] * n_layers
    else:
        config = CompressConfig(model=str(folder), method="reap", experts_per_layer=epl)
        routing, reap = calibrate(config, folder)
        stats, keep = LayerStats.from_routing(routing, reap), keep_per_layer(config, routing)
    arrays = {"frequencies": stats.frequencies, "logit_similarity": stats.logit_similarity}
    arrays.update({k: getattr(stats, k) for k in ("output_mean", "reap") if getattr(stats, k) is not None})
    np.savez(work / "stats.npz", **arrays)
    (work / "stats.json").write_text(json.dumps({"layers": stats.layers, "keep": keep}))
    return {"model": str(folder), "calibration_s": time.perf_counter() - t0, "synthetic": synthetic,
            "layer_expert_bytes": layer_bytes, "stats_bytes": sum(a.nbytes for a in arrays.values()),
            "model_bytes": model_bytes, "layers": n_layers, "experts": n_experts, "keep": keep}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _measured(kind: str, model: str, work: Path, lowrank: float | None, stock: bool) -> dict:
    """One timed step in this (fresh) process: ``copy`` or a method's compression pass."""
    import resource

    import numpy as np

    from expertkit.procmem import reset_peak, status
    from expertkit.progress import set_quiet
    from expertkit.weights import Checkpoint, ShardedWriter

    set_quiet(True)
    profile, kind = kind.startswith("profile:"), kind.removeprefix("profile:")
    out = work / f"out-{kind}"
    if kind != "copy":
        from expertkit.moe.compress import CompressConfig, LayerStats, compress_checkpoint

        meta = json.loads((work / "stats.json").read_text())
        with np.load(work / "stats.npz") as z:
            arrays = {k: z[k] for k in z.files}
        stats = LayerStats(arrays["frequencies"], arrays["logit_similarity"], arrays.get("output_mean"),
                           arrays.get("reap"), meta["layers"])
        params = CompressConfig(model=model, method=kind).method_params()
        # the methods' libraries (assignment, clustering) are part of the import baseline, not the pass
        import scipy.cluster.hierarchy  # noqa: F401
        import scipy.optimize  # noqa: F401
    phases = _phase_sampler() if profile else None
    hwm_reset = reset_peak()
    baseline = status("VmRSS")
    if phases is not None:
        phases.start(status("RssAnon"), status("RssFile"))
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if kind == "copy":
        with Checkpoint(Path(model)) as ckpt, ShardedWriter(out, layout=ckpt.infos(), max_shard_size="2GB") as w:
            for name, t in ckpt.iter_tensors(reuse_buffer=True):
                w.add(name, t)
    else:
        compress_checkpoint(model, out, method=kind, params=params, stats=stats, keep=meta["keep"],
                            lowrank=(lowrank, 0.2) if lowrank else None, stock=stock, seed=0)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = status("VmHWM") if hwm_reset else cpu1.ru_maxrss * 1024
    shutil.rmtree(out, ignore_errors=True)
    if phases is not None:
        return {"kind": kind, "wall_s": wall, "peak_above_baseline": peak - baseline, "phases": phases.stop()}
    return {"kind": kind, "wall_s": wall, "cpu_s": cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
            "baseline_rss": baseline, "peak_above_baseline": peak - baseline}


class _Phases:
    """Samples ``RssAnon`` / ``RssFile`` every 2 ms in a thread; keeps each phase's peak."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.peaks: dict[str, tuple[int, int]] = {}
        self.running = False

    def wrap(self, owner: object, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def labelled(*a: object, **k: object) -> object:
            self.stack.append(label)
            try:
                return fn(*a, **k)
            finally:
                self.stack.pop()

        setattr(owner, name, labelled)

    def start(self, anon0: int, file0: int) -> None:
        import threading

        from expertkit.procmem import status

        def sample() -> None:
            while self.running:
                phase = " / ".join(self.stack) or "planning, reading, other"
                anon, file = status("RssAnon") - anon0, status("RssFile") - file0
                if anon + file > sum(self.peaks.get(phase, (-(1 << 62), 0))):
                    self.peaks[phase] = (anon, file)
                time.sleep(0.002)

        self.running = True
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()

    def stop(self) -> dict[str, tuple[int, int]]:
        self.running = False
        self.thread.join()
        return self.peaks


def _phase_sampler() -> _Phases:
    """A sampler whose phases are the compression pass's steps (its functions wrapped in place)."""
    from expertkit.moe.compress import align, run
    from expertkit.weights import ShardedWriter

    phases = _Phases()
    phases.wrap(align.AnchorFeatures, "__init__", "alignment: anchor")
    phases.wrap(align.AnchorFeatures, "match", "alignment: match")
    phases.wrap(run, "factorize", "C: factorize")
    phases.wrap(run, "write_layer", "write_layer")
    phases.wrap(ShardedWriter, "add", "writer")
    return phases


def _child(args: argparse.Namespace) -> None:
    work = Path(args.work)
    if args.child == "tiny":
        result = _tiny(work)
    elif args.child == "prepare":
        result = _prepare(args.model, work, args.experts_per_layer, args.synthetic)
    else:
        result = _measured(args.child, args.model, work, args.lowrank, not args.no_stock)
    print(json.dumps(result))


# -------------------------------------------------------------------------------------------- parent
def _run(kind: str, args: argparse.Namespace, work: Path, model: str, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--work", str(work), "--model", model,
           "--experts-per-layer", str(args.experts_per_layer), *extra]
    cmd += ["--lowrank", str(args.lowrank)] if args.lowrank else []
    cmd += ["--no-stock"] if args.no_stock else []
    os.sync()  # no step pays for another's writeback
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"step '{kind}' failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    """Parse arguments, run every step in fresh processes, print the medians and ratios."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="an MoE folder (default: the cached default-recipe MoE)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Mixtral with synthetic statistics (smoke test)")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--experts-per-layer", type=float, default=4)
    ap.add_argument("--lowrank", type=float, default=None, help="also run the C step, keeping this share")
    ap.add_argument("--no-stock", action="store_true", help="do not write the stock transformers form")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", default=None, metavar="METHOD", choices=METHODS,
                    help="one pass of METHOD with its peak memory per phase, instead of the timings")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--synthetic", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="moe-compress-bench-"))
    try:
        model = _run("tiny", args, work, "")["model"] if args.tiny else args.model
        prep = _run("prepare", args, work, model, *(["--synthetic"] if args.tiny else []))
        if args.profile:
            return _report_profile(args, prep, _run(f"profile:{args.profile}", args, work, prep["model"]))
        steps = ["copy", *args.methods]
        runs: dict[str, list[dict]] = {s: [] for s in steps}
        for r in range(args.repeats):
            for s in steps if r % 2 == 0 else steps[::-1]:
                runs[s].append(_run(s, args, work, prep["model"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    _report(args, prep, runs, load_before, load_after)


def _report(args: argparse.Namespace, prep: dict, runs: dict[str, list[dict]], before: tuple, after: tuple) -> None:
    med = {s: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s", "peak_above_baseline")}
           for s, rs in runs.items()}
    limit = prep["layer_expert_bytes"] + prep["stats_bytes"]
    print(f"subject {prep['model']}: {prep['layers']} MoE layers x {prep['experts']} experts, "
          f"{prep['model_bytes'] / 1e6:.1f} MB; keep {prep['keep']}; lowrank {args.lowrank}; "
          f"stock {'no' if args.no_stock else 'yes'}; {args.repeats} repeats")
    print(f"calibration ({'synthetic' if prep['synthetic'] else 'routing stats + REAP, cached after the first run'}): "
          f"{prep['calibration_s']:.1f} s")
    print(f"memory limit: largest layer's experts (float32) {prep['layer_expert_bytes'] / 1e6:.1f} MB "
          f"+ statistics {prep['stats_bytes'] / 1e6:.2f} MB")
    print("| step | median wall | CPU s | peak above baseline | peak / limit | time / copy |")
    print("|---|---:|---:|---:|---:|---:|")
    copy = med["copy"]["wall_s"]
    for s, m in med.items():
        print(f"| {s} | {m['wall_s']:.2f} s | {m['cpu_s']:.2f} | {m['peak_above_baseline'] / 1e6:.1f} MB | "
              f"{m['peak_above_baseline'] / limit:.2f}x | {m['wall_s'] / copy:.2f}x |")
    print(f"load average {before[0]:.2f} {before[1]:.2f} {before[2]:.2f} before, "
          f"{after[0]:.2f} {after[1]:.2f} {after[2]:.2f} after")
    if args.json:
        Path(args.json).write_text(json.dumps({"prepare": prep, "runs": runs, "load_before": before,
                                               "load_after": after}, indent=1))


def _report_profile(args: argparse.Namespace, prep: dict, run: dict) -> None:
    limit = prep["layer_expert_bytes"] + prep["stats_bytes"]
    print(f"subject {prep['model']}; method {run['kind']}; lowrank {args.lowrank}; "
          f"stock {'no' if args.no_stock else 'yes'}; one pass, {run['wall_s']:.1f} s")
    print(f"peak above baseline {run['peak_above_baseline'] / 1e6:.1f} MB = "
          f"{run['peak_above_baseline'] / limit:.2f}x the limit ({limit / 1e6:.1f} MB)")
    print("| phase (innermost last) | peak above baseline | anonymous | file-backed | peak / limit |")
    print("|---|---:|---:|---:|---:|")
    for phase, (anon, file) in sorted(run["phases"].items(), key=lambda kv: -sum(kv[1])):
        print(f"| {phase} | {(anon + file) / 1e6:.1f} MB | {anon / 1e6:.1f} MB | {file / 1e6:.1f} MB | "
              f"{(anon + file) / limit:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"prepare": prep, "profile": run}, indent=1))


if __name__ == "__main__":
    main()
