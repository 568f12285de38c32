"""PortLLM at small scale: LoRA patches made on SmolLM2-135M, ported to an evolved SmolLM2 without training.

    .venv/bin/python experiments/portllm.py [--tasks family_relation reverse_words bbc_topic]
        [--evolve-steps 60] [--train-steps 60] [--n 100] [--out runs/experiments/portllm]

Steps (everything cached under --out, so a rerun only evaluates):

1. old base = the bundled SmolLM2-135M-Instruct; one LoRA expert per task (q/v, rank 8, 60 steps);
2. new base = ``expertkit evolve``: continued pretraining on the BBC News training articles;
3. the experts' patches ported to the new base as adapters (``expertkit port apply --as-adapter``);
4. for comparison, LoRA fine-tuned again on the new base with the same settings;
5. accuracy on each task's test split (n examples, 95% Wilson intervals) of: new base zero-shot,
   new base + ported patch, new base + LoRA fine-tuned, old base + patch;
6. peak memory (``VmHWM`` of a fresh process) of porting (dense, streamed: the full
   ported model is written) and of LoRA fine-tuning on the new base (a few steps: the peak is
   reached on the first), measured in the same run.

Writes ``<out>/results.json`` and prints the markdown table for docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

TASKS = ["family_relation", "reverse_words", "bbc_topic"]
TRAIN = {"steps": 60, "batch_size": 8, "lr": 2e-3, "rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}

PORT_CHILD = """
import sys
from expertkit.port import port
port(sys.argv[1], sys.argv[2], sys.argv[3], overwrite=True)
"""
TRAIN_CHILD = """
import json, sys
from expertkit.train import train_lora
train_lora(sys.argv[1], sys.argv[2], sys.argv[3], resume=False, eval_n=0, save_every=0,
           **{**json.loads(sys.argv[4]), "steps": 3})
"""


# VmHWM (the peak resident set of this process's memory map) rather than ru_maxrss: Linux carries
# ru_maxrss over fork and exec, so a child started by a big parent would report the parent's peak.
PEAK = """
from expertkit.procmem import status as _status
print("PEAK_KB", _status("VmHWM") // 1024)
"""
IMPORTS_CHILD = "import torch, transformers, peft, expertkit.port, expertkit.train"


def peak_rss(code: str, *args: str) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of a fresh Python process running ``code`` with ``args``."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code + PEAK, *args], check=True, env=_env(),
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    kb = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_KB")]
    return int(kb[-1]) / 1024, seconds


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "EXPERTKIT_QUIET": "1"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--evolve-steps", type=int, default=60)
    parser.add_argument("--train-steps", type=int, default=TRAIN["steps"])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("runs/experiments/portllm"))
    args = parser.parse_args()
    train = {**TRAIN, "steps": args.train_steps}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    from expertkit.models import load_model
    from expertkit.models.bundled import cache_root
    from expertkit.port import evolve, port
    from expertkit.tasks.evaluate import evaluate
    from expertkit.train import train_lora

    old = load_model("smollm2-135m")
    new_dir = out / "new-base"
    if not (new_dir / "expertkit.json").is_file():
        evolve(old, new_dir, corpus="bbc", steps=args.evolve_steps, overwrite=True)
    evolved = json.loads((new_dir / "expertkit.json").read_text())

    first = args.tasks[0]
    expert0 = out / "experts-old" / first
    train_lora(old, first, expert0, **train)
    mem_imports, _ = peak_rss(IMPORTS_CHILD)
    mem_port, sec_port = peak_rss(PORT_CHILD, str(expert0), str(new_dir), str(out / "mem-ported-model"))
    mem_train, sec_train = peak_rss(TRAIN_CHILD, str(new_dir), first, str(out / "mem-train"), json.dumps(train))

    new = load_model(new_dir)
    kw = {"split": "test", "n": args.n, "seed": 0, "batch_size": 16, "cache_dir": cache_root() / "eval"}
    rows = {}
    for task in args.tasks:
        old_expert = out / "experts-old" / task
        train_lora(old, task, old_expert, **train)
        ported = port(old_expert, new_dir, out / "ported" / task, as_adapter=True, old_base="smollm2-135m",
                      overwrite=True)
        new_expert = out / "experts-new" / task
        train_lora(new, task, new_expert, **train)
        row = {"drift": ported.diagnosis.median_rel_drift}
        for label, model, adapter in (("new_zero_shot", new, None), ("new_ported", new, ported.path),
                                      ("new_finetuned", new, new_expert), ("old_patch", old, old_expert)):
            r = evaluate(model, None, task, adapter=adapter, **kw)
            row[label] = {"accuracy": r.accuracy, "ci": [r.ci_low, r.ci_high]}
        rows[task] = row
        print(task, {k: v["accuracy"] if isinstance(v, dict) else v for k, v in row.items()}, flush=True)

    result = {"evolved": {k: evolved[k] for k in ("steps", "lr", "corpus", "loss_first", "loss_last")},
              "train": train, "n": args.n, "tasks": rows,
              "memory_mb": {"imports": mem_imports, "port_dense": mem_port, "lora_finetune": mem_train,
                            "ratio_finetune_over_port": mem_train / mem_port},
              "seconds": {"port_dense": sec_port, "lora_finetune_3_steps": sec_train}}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(table(result))


def table(result: dict) -> str:
    """The markdown table of docs/results.md."""
    def cell(c: dict) -> str:
        return f"{c['accuracy']:.2f} [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]"

    lines = ["| task | base drift (median rel.) | new base zero-shot | new base + ported patch | "
             "new base + LoRA fine-tuned | old base + patch |", "|---|---:|---:|---:|---:|---:|"]
    mean = {k: 0.0 for k in ("new_zero_shot", "new_ported", "new_finetuned", "old_patch")}
    for task, r in result["tasks"].items():
        lines.append(f"| {task} | {r['drift']:.4f} | {cell(r['new_zero_shot'])} | {cell(r['new_ported'])} | "
                     f"{cell(r['new_finetuned'])} | {cell(r['old_patch'])} |")
        for k in mean:
            mean[k] += r[k]["accuracy"] / len(result["tasks"])
    lines.append(f"| **mean** | | {mean['new_zero_shot']:.3f} | {mean['new_ported']:.3f} | "
                 f"{mean['new_finetuned']:.3f} | {mean['old_patch']:.3f} |")
    m = result["memory_mb"]
    lines += ["", f"Peak RSS: porting (dense, streamed) {m['port_dense']:.0f} MB; LoRA fine-tuning on the new "
              f"base {m['lora_finetune']:.0f} MB; fine-tuning / porting = {m['ratio_finetune_over_port']:.2f}x "
              f"(a process that only imports torch, transformers and expertkit: {m['imports']:.0f} MB)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
