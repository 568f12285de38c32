"""Merge benchmark: expertkit's streaming executor vs mergekit, same configs, same run.

    .venv/bin/python bench/merge_vs_mergekit.py [--repeats 1] [--methods ties linear] [--json out.json]

Inputs: three models the size of the bundled SmolLM2-135M-Instruct (fp32, 272 tensors, 538 MB
each), derived from it by adding seeded Gaussian noise of 1% of each tensor's standard deviation
(written once to ``~/.cache/expertkit/bench/merge-zoo/``); TIES uses the bundled model as base.
Each merge runs in a fresh child process (``expertkit merge CFG OUT`` and ``mergekit-yaml CFG
OUT``, the same YAML) after ``os.sync()``, started by a fresh small launcher interpreter (see
:data:`LAUNCHER`); wall time is the child's, peak memory its ``ru_maxrss`` (from ``os.wait4``).
This script never imports torch: the zoo is written and the two outputs are compared tensor by
tensor (max abs difference) in child processes too.

Goal (issue 4): expertkit at least 1.5x faster and at most 0.5x mergekit's peak memory.
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

ZOO = Path.home() / ".cache" / "expertkit" / "bench" / "merge-zoo"
BIN = Path(sys.executable).parent


def make_zoo(n: int = 3) -> tuple[Path, list[Path]]:
    """The bundled model's folder and ``n`` noisy copies (built once, in a child process)."""
    code = f"""
import torch
from pathlib import Path
from expertkit.models import ensure_bundled
from expertkit.weights import Checkpoint, ShardedWriter
base = ensure_bundled('smollm2-135m')
print(base)
for i in range({n}):
    out = Path({str(ZOO)!r}) / f'expert{{i}}'
    if (out / 'config.json').exists():
        continue
    g = torch.Generator().manual_seed(1000 + i)
    with Checkpoint(base) as ck, ShardedWriter(out, template=base, layout=ck.infos(), max_shard_size='2GB') as w:
        for name, t in ck.iter_tensors():
            if t.is_floating_point():
                t = t + 0.01 * t.float().std().clamp(min=1e-8) * torch.randn(t.shape, generator=g)
            w.add(name, t)
"""
    res = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    base = Path(res.stdout.strip().splitlines()[-1])
    return base, [ZOO / f"expert{i}" for i in range(n)]


def config(method: str, base: Path, experts: list[Path]) -> str:
    """The YAML both tools run (mergekit syntax)."""
    lines = [f"merge_method: {method}", "dtype: float32"]
    if method != "linear":
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for p in experts:
        lines += [f"  - model: {p}", "    parameters:", "      weight: 1.0"]
        if method == "ties":
            lines.append("      density: 0.2")
    return "\n".join(lines) + "\n"


#: Runs one command and reports its wall time and peak RSS as JSON. It is a fresh, small
#: interpreter (no torch): Linux carries ``ru_maxrss`` over fork and exec, so a tool started
#: straight from this script would report this script's own peak (torch, compared tensors) as
#: its floor; started from the launcher it inherits only the launcher's ~10 MB, the same for every
#: tool and every run.
LAUNCHER = """
import json, os, subprocess, sys, time
cmd = json.loads(sys.argv[1])
os.sync()
start = time.perf_counter()
proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
err = proc.stderr.read()
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
print(json.dumps({"wall": wall, "rss_mb": usage.ru_maxrss / 1024, "rc": os.waitstatus_to_exitcode(status),
                  "stderr": err.decode(errors="replace")[-2000:]}))
"""


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of ``cmd``, run by a fresh launcher process; raises on failure."""
    res = subprocess.run([sys.executable, "-c", LAUNCHER, json.dumps(cmd)], capture_output=True, text=True,
                         check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    if out["rc"] != 0:
        raise SystemExit(f"{cmd[0]} failed: {out['stderr']}")
    return out["wall"], out["rss_mb"]


COMPARE = """
import sys
from expertkit.weights import Checkpoint
worst = 0.0
with Checkpoint(sys.argv[1]) as x, Checkpoint(sys.argv[2]) as y:
    for name in x.names():
        if name in y:
            worst = max(worst, float((x.read(name).float() - y.read(name).float()).abs().max()))
print(worst)
"""


def compare(a: Path, b: Path) -> float:
    """Max abs difference over the tensors both outputs hold (in a child: this process never imports torch)."""
    res = subprocess.run([sys.executable, "-c", COMPARE, str(a), str(b)], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run the benchmark and print a markdown table of ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["ties", "linear"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if shutil.which("mergekit-yaml", path=str(BIN)) is None:
        raise SystemExit("mergekit is not installed (pip install mergekit==0.1.5); nothing to compare.")
    base, experts = make_zoo()
    rows = []
    with tempfile.TemporaryDirectory(prefix="merge-bench-") as tmp:
        tmp_path = Path(tmp)
        for method in args.methods:
            cfg = tmp_path / f"{method}.yaml"
            cfg.write_text(config(method, base, experts))
            runs: dict[str, list[tuple[float, float]]] = {"expertkit": [], "mergekit": []}
            for r in range(args.repeats):
                for tool in ("expertkit", "mergekit") if r % 2 == 0 else ("mergekit", "expertkit"):
                    out = tmp_path / f"{method}-{tool}"
                    shutil.rmtree(out, ignore_errors=True)
                    cmd = ([str(BIN / "expertkit"), "--quiet", "merge", str(cfg), str(out)] if tool == "expertkit"
                           else [str(BIN / "mergekit-yaml"), str(cfg), str(out),
                                 "--quiet"])
                    runs[tool].append(timed(cmd))
            diff = compare(tmp_path / f"{method}-expertkit", tmp_path / f"{method}-mergekit")
            ek_wall = sorted(w for w, _ in runs["expertkit"])[len(runs["expertkit"]) // 2]
            mk_wall = sorted(w for w, _ in runs["mergekit"])[len(runs["mergekit"]) // 2]
            ek_rss = max(m for _, m in runs["expertkit"])
            mk_rss = max(m for _, m in runs["mergekit"])
            rows.append({"method": method, "expertkit_s": ek_wall, "mergekit_s": mk_wall,
                         "speedup": mk_wall / ek_wall, "expertkit_mb": ek_rss, "mergekit_mb": mk_rss,
                         "memory_ratio": ek_rss / mk_rss, "max_abs_diff": diff, "runs": runs})
            for tool in ("expertkit", "mergekit"):
                shutil.rmtree(tmp_path / f"{method}-{tool}", ignore_errors=True)
    print("| method | expertkit wall | mergekit wall | speed-up (mergekit / expertkit) | expertkit peak RSS "
          "| mergekit peak RSS | memory ratio (expertkit / mergekit) | max abs diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['expertkit_s']:.1f} s | {r['mergekit_s']:.1f} s | **{r['speedup']:.2f}x** | "
              f"{r['expertkit_mb']:.0f} MB | {r['mergekit_mb']:.0f} MB | **{r['memory_ratio']:.2f}x** | "
              f"{r['max_abs_diff']:.2e} |")
    print("\ngoal: speed-up >= 1.5x and memory ratio <= 0.5x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
