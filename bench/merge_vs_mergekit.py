"""Merge benchmark: expertkit's streaming executor vs mergekit, same configs, same run, beside the I/O floor.

    .venv/bin/python bench/merge_vs_mergekit.py [--zoo bundled|tinyllama|tiny] [--methods ties linear della sce]
        [--repeats 1] [--tools expertkit mergekit floor] [--profile 25] [--json out.json]

Zoos (written once, in a child process):

* ``bundled``: three models the size of the bundled SmolLM2-135M-Instruct (fp32, 272 tensors,
  538 MB each), the bundled model plus seeded Gaussian noise of 1% of each tensor's standard
  deviation (``~/.cache/expertkit/bench/merge-zoo/``); the bundled model is the base. Configs
  say ``dtype: float32``.
* ``tinyllama``: a random bfloat16 model of TinyLlama-1.1B's shape (22 layers, hidden 2048,
  intermediate 5632, vocabulary 32000; 2.2 GB in 1 GB shards) as the base and three experts, the
  base plus noise of 1% of each matrix's standard deviation (``~/.cache/expertkit/bench/tinyllama-zoo/``,
  8.8 GB). Configs keep the stored dtype (bfloat16 in and out).
* ``tiny``: the same recipe at a toy size (2 layers, hidden 64; ``~/.cache/expertkit/bench/tiny-zoo/``),
  to check that the script runs end to end in seconds (its timings mean nothing).

Each merge runs in a fresh child process (``expertkit --quiet merge CFG OUT`` and ``mergekit-yaml
CFG OUT --quiet``, the same YAML) after ``os.sync()``, started by a fresh small launcher
interpreter (see :data:`LAUNCHER`); wall time is the child's, peak memory its ``ru_maxrss`` (from
``os.wait4``). The **I/O floor** (``floor``) runs the same way: an interpreter that imports torch,
reads every input file of the merge once and writes and fsyncs as many bytes as one model. This
script never imports torch: the zoos are written and the outputs compared (max abs difference)
in child processes too. The load average is recorded before and after each method.
``--profile N`` then runs expertkit once more per method under cProfile (untimed, in a child) and
prints its N most expensive calls by cumulative time: where the time goes. The worker threads of
the block-wise methods are not profiled; their time shows as the main thread's wait in
``map_blocks``.

Goals: issue 4, at least 1.5x faster than mergekit at at most 0.5x its peak memory; issue 21, at
1.1B parameters linear within 1.5x of the I/O floor and TIES within 3x.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE = Path.home() / ".cache" / "expertkit" / "bench"
BIN = Path(sys.executable).parent

#: TinyLlama-1.1B's shape (32 heads, 4 of them key/value heads): 1.10B parameters
TINYLLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
             "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
             "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
#: the ``tiny`` zoo: TinyLlama's layout at a toy size
TINY = {**TINYLLAMA, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 128}

BUNDLED_ZOO = """
import sys, torch
from pathlib import Path
from expertkit.models import ensure_bundled
from expertkit.weights import Checkpoint, ShardedWriter
root, n = Path(sys.argv[1]), int(sys.argv[2])
base = ensure_bundled('smollm2-135m')
print(base)
for i in range(n):
    out = root / f'expert{i}'
    if (out / 'config.json').exists():
        continue
    g = torch.Generator().manual_seed(1000 + i)
    with Checkpoint(base) as ck, ShardedWriter(out, template=base, layout=ck.infos(), max_shard_size='2GB') as w:
        for name, t in ck.iter_tensors():
            if t.is_floating_point():
                t = t + 0.01 * t.float().std().clamp(min=1e-8) * torch.randn(t.shape, generator=g)
            w.add(name, t)
"""

TINYLLAMA_ZOO = """
import json, sys, torch
from pathlib import Path
from expertkit.weights import ShardedWriter
root, n, cfg = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
h, f, v = cfg['hidden_size'], cfg['intermediate_size'], cfg['vocab_size']
kv = h * cfg['num_key_value_heads'] // cfg['num_attention_heads']
shapes = [('model.embed_tokens.weight', (v, h))]
for i in range(cfg['num_hidden_layers']):
    p = f'model.layers.{i}.'
    shapes += [(p + 'input_layernorm.weight', (h,)), (p + 'self_attn.q_proj.weight', (h, h)),
               (p + 'self_attn.k_proj.weight', (kv, h)), (p + 'self_attn.v_proj.weight', (kv, h)),
               (p + 'self_attn.o_proj.weight', (h, h)), (p + 'post_attention_layernorm.weight', (h,)),
               (p + 'mlp.gate_proj.weight', (f, h)), (p + 'mlp.up_proj.weight', (f, h)),
               (p + 'mlp.down_proj.weight', (h, f))]
shapes += [('model.norm.weight', (h,)), ('lm_head.weight', (v, h))]
print(root / 'base')
for k, name in enumerate(['base'] + [f'expert{i}' for i in range(n)]):
    out = root / name
    if (out / 'config.json').exists():
        continue
    g = torch.Generator().manual_seed(7)  # the same base weights in every model
    noise = torch.Generator().manual_seed(2000 + k)
    with ShardedWriter(out, layout=[(s, d, torch.bfloat16) for s, d in shapes], max_shard_size='1GB') as w:
        for s, d in shapes:
            t = torch.ones(d) if len(d) == 1 else torch.randn(d, generator=g).mul_(0.02)
            if k > 0 and len(d) > 1:
                t.add_(torch.randn(d, generator=noise), alpha=0.01 * 0.02)
            w.add(s, t.to(torch.bfloat16))
    (out / 'config.json').write_text(json.dumps(cfg, indent=2))
"""


def make_zoo(kind: str, n: int = 3) -> tuple[Path, list[Path], str | None]:
    """(base folder, expert folders, config dtype) of the ``bundled``, ``tinyllama`` or ``tiny`` zoo."""
    if kind == "bundled":
        root, code, args, dtype = CACHE / "merge-zoo", BUNDLED_ZOO, [], "float32"
    else:
        cfg = TINYLLAMA if kind == "tinyllama" else TINY
        root, code, args, dtype = CACHE / f"{kind}-zoo", TINYLLAMA_ZOO, [json.dumps(cfg)], None
    res = subprocess.run([sys.executable, "-c", code, str(root), str(n), *args], check=True, capture_output=True,
                         text=True)
    return Path(res.stdout.strip().splitlines()[-1]), [root / f"expert{i}" for i in range(n)], dtype


#: per method: (shared parameters, per-model parameters, whether the models take a weight)
SETTINGS: dict[str, tuple[dict, dict, bool]] = {
    "linear": ({}, {}, True), "ties": ({}, {"density": 0.2}, True), "task_arithmetic": ({}, {}, True),
    "della": ({}, {"density": 0.5, "epsilon": 0.1}, True), "sce": ({"select_topk": 0.5}, {}, False),
    "dare_ties": ({}, {"density": 0.5}, True), "breadcrumbs": ({}, {"density": 0.9, "gamma": 0.01}, True),
}


def config(method: str, base: Path, experts: list[Path], dtype: str | None) -> str:
    """The YAML both tools run (mergekit syntax)."""
    shared, per_model, weighted = SETTINGS[method]
    lines = [f"merge_method: {method}"] + ([f"dtype: {dtype}"] if dtype else [])
    if method != "linear":
        lines.append(f"base_model: {base}")
    if shared:
        lines += ["parameters:"] + [f"  {k}: {v}" for k, v in shared.items()]
    lines.append("models:")
    for p in experts:
        params = {**({"weight": 1.0} if weighted else {}), **per_model}
        lines += [f"  - model: {p}"] + (["    parameters:"] + [f"      {k}: {v}" for k, v in params.items()]
                                        if params else [])
    return "\n".join(lines) + "\n"


#: The I/O floor of one merge: an interpreter that imports torch (both tools do), reads every input
#: file once (from the page cache as the tools find it) and writes and fsyncs one model's bytes.
FLOOR = """
import os, sys
import torch  # noqa: F401 - part of the floor: both tools import it
out, size, inputs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
view = memoryview(bytearray(64 << 20))
for path in inputs:
    with open(path, 'rb', buffering=0) as fh:
        while fh.readinto(view):
            pass
fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
left = size
while left > 0:
    left -= os.write(fd, view[:min(left, len(view))])
os.fsync(fd)
os.close(fd)
"""

#: Runs one command and reports its wall time and peak RSS as JSON. It is a fresh, small
#: interpreter (no torch): Linux carries ``ru_maxrss`` over fork and exec, so a tool started
#: straight from a big process would report that process's peak as its own floor; started from
#: the launcher it inherits only the launcher's ~10 MB, the same for every tool and every run.
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


def command(tool: str, cfg: Path, out: Path, inputs: list[Path]) -> list[str]:
    """The command line of ``tool`` (expertkit, mergekit or floor) for one merge."""
    if tool == "expertkit":
        return [str(BIN / "expertkit"), "--quiet", "merge", str(cfg), str(out)]
    if tool == "mergekit":
        return [str(BIN / "mergekit-yaml"), str(cfg), str(out), "--quiet"]
    files = [str(f) for d in inputs for f in sorted(d.glob("*.safetensors"))]
    size = sum(f.stat().st_size for f in inputs[0].glob("*.safetensors"))
    return [sys.executable, "-c", FLOOR, str(out), str(size), *files]


PROFILE = """
import cProfile, pstats, runpy, sys
n, argv = int(sys.argv[1]), sys.argv[2:]
sys.argv = argv
prof = cProfile.Profile()
try:
    prof.runcall(runpy.run_path, argv[0], run_name='__main__')
except SystemExit as exc:
    if exc.code not in (0, None):
        raise
pstats.Stats(prof, stream=sys.stdout).sort_stats('cumulative').print_stats(n)
"""


def profile(cmd: list[str], top: int) -> str:
    """cProfile's ``top`` calls by cumulative time of ``cmd`` (an expertkit command line), run in a child."""
    res = subprocess.run([sys.executable, "-c", PROFILE, str(top), *cmd], capture_output=True, text=True, check=True)
    lines = res.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if "function calls" in line), 0)
    return "\n".join(lines[start:])


def run_method(method: str, base: Path, experts: list[Path], dtype: str | None, tools: list[str], repeats: int,
               tmp: Path, top: int = 0) -> dict:
    """Every tool on one method, ``repeats`` times in alternating order; medians and worst peaks."""
    cfg = tmp / f"{method}.yaml"
    cfg.write_text(config(method, base, experts, dtype))
    inputs = [*experts, *([base] if method != "linear" else [])]
    runs: dict[str, list[tuple[float, float]]] = {t: [] for t in tools}
    load = [os.getloadavg()[0]]
    for r in range(repeats):
        for tool in tools if r % 2 == 0 else list(reversed(tools)):
            out = tmp / f"{method}-{tool}"
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
            runs[tool].append(timed(command(tool, cfg, out, inputs)))
    load.append(os.getloadavg()[0])
    row: dict = {"method": method, "runs": runs, "load": load}
    for tool, rs in runs.items():
        row[f"{tool}_s"] = sorted(w for w, _ in rs)[len(rs) // 2]
        row[f"{tool}_mb"] = max(m for _, m in rs)
    if "expertkit" in tools and "mergekit" in tools:
        row["max_abs_diff"] = compare(tmp / f"{method}-expertkit", tmp / f"{method}-mergekit")
    if top:
        out = tmp / f"{method}-profiled"
        row["profile"] = profile(command("expertkit", cfg, out, inputs), top)
        shutil.rmtree(out, ignore_errors=True)
    for tool in tools:
        out = tmp / f"{method}-{tool}"
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    return row


def table(rows: list[dict], tools: list[str]) -> str:
    """A markdown table: wall and peak RSS per tool, speed-up over mergekit, ratio to the floor."""
    head = ["method", *(f"{t} wall" for t in tools), *(f"{t} peak RSS" for t in tools if t != "floor")]
    if "mergekit" in tools and "expertkit" in tools:
        head += ["speed-up (mergekit / expertkit)", "memory ratio (expertkit / mergekit)", "max abs diff"]
    if "floor" in tools:
        head += [f"{t} / floor" for t in tools if t != "floor"]
    lines = ["| " + " | ".join(head) + " | load avg |", "|---" + "|---:" * (len(head) - 1) + "|---|"]
    for r in rows:
        cells = [r["method"], *(f"{r[f'{t}_s']:.1f} s" for t in tools),
                 *(f"{r[f'{t}_mb']:.0f} MB" for t in tools if t != "floor")]
        if "mergekit" in tools and "expertkit" in tools:
            cells += [f"**{r['mergekit_s'] / r['expertkit_s']:.2f}x**", f"**{r['expertkit_mb'] / r['mergekit_mb']:.2f}x**",
                      f"{r['max_abs_diff']:.2e}"]
        if "floor" in tools:
            cells += [f"**{r[f'{t}_s'] / r['floor_s']:.2f}x**" for t in tools if t != "floor"]
        lines.append("| " + " | ".join(cells) + f" | {r['load'][0]:.2f} -> {r['load'][1]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark and print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", choices=["bundled", "tinyllama", "tiny"], default="bundled")
    ap.add_argument("--methods", nargs="+", default=["ties", "linear"], choices=sorted(SETTINGS))
    ap.add_argument("--tools", nargs="+", default=["expertkit", "mergekit"], choices=["expertkit", "mergekit", "floor"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile one expertkit run per method (untimed) and print its N top calls")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if "mergekit" in args.tools and shutil.which("mergekit-yaml", path=str(BIN)) is None:
        raise SystemExit("mergekit is not installed (pip install mergekit==0.1.5); nothing to compare.")
    base, experts, dtype = make_zoo(args.zoo)
    with tempfile.TemporaryDirectory(prefix="merge-bench-") as tmp:
        rows = [run_method(m, base, experts, dtype, args.tools, args.repeats, Path(tmp), args.profile)
                for m in args.methods]
    print(table(rows, args.tools))
    for r in rows:
        if "profile" in r:
            print(f"\n### expertkit {r['method']}: cProfile, top {args.profile} by cumulative time\n\n{r['profile']}")
    if args.json:
        args.json.write_text(json.dumps({"zoo": args.zoo, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
