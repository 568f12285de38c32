"""PortLLM at several drift levels, and porting's memory against LoRA fine-tuning as the model grows.

    .venv/bin/python experiments/portllm.py [--part all|accuracy|memory] [--n 300]
        [--levels 60:5e-05 60:0.00025 60:0.00125] [--sizes 135m 360m 700m 1b] [--out runs/experiments/portllm]
    .venv/bin/python experiments/portllm.py --smoke     # a tiny random Llama and a toy task: checks the script

Accuracy (``--part accuracy``; everything cached under --out, so a rerun only evaluates):

1. old base = the bundled SmolLM2-135M-Instruct; one LoRA expert per task (q/v, rank 8, 60 steps);
2. one new base per level ``STEPS:LR`` (``expertkit evolve``: continued pretraining on the BBC News
   training articles, AdamW at that learning rate for that many steps); its drift is the median
   relative drift of the patched tensors, measured exactly by ``port``'s diagnosis;
3. at each level, the experts' patches ported as adapters (no training) and, for comparison, LoRA
   fine-tuned again on the new base with the same settings;
4. the same ``n`` test examples of each task scored for: new base zero-shot, new base + ported patch,
   new base + LoRA fine-tuned (and the old base + patch once); per level, pooled over the tasks, paired
   tests (exact McNemar, paired bootstrap interval): does fine-tuning beat the port, is the port within
   ``--margin`` of fine-tuning (the interval of fine-tuned - ported ends below ``margin``), does the port beat zero-shot,
   does the patch lose accuracy by moving (old base + patch against new base + ported patch);
5. what ``port diagnose``'s risky-drift threshold should be: between the largest drift at which the port
   lost nothing measurable against the patch on its own base and the smallest at which it did.

Why n = 300 per task: 900 pooled pairs per level detect a 3-point difference when 10% of the pairs
are discordant (``mcnemar_sample_size(0.03, 0.10)`` = 868).

Memory (``--part memory``): for each size a synthetic Llama (SmolLM2's tokenizer and layout, random
weights in bfloat16, as released checkpoints are stored) with a random rank-8 q/v PEFT adapter; in
fresh processes, the peak resident set (``VmHWM``) of: a dense port of the adapter (the whole model
streamed to disk), 3 LoRA fine-tuning steps (batch 8; the peak is reached on the first), and, as
baselines, processes that only import what each of the two imports. Both whole-process peaks and
peaks above each one's import baseline are reported, and a line fitted to each peak against the
parameter count says at what size the paper's 12.2x ratio would be reached. Memory is the quantity
measured here; the sizes' times are printed but are not a benchmark.

Writes ``<out>/results.json`` and ``<out>/portllm.png`` and prints the markdown for docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

TASKS = ["family_relation", "reverse_words", "bbc_topic"]
TRAIN = {"steps": 60, "batch_size": 8, "lr": 2e-3, "rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
LEVELS = ["60:5e-05", "60:0.00025", "60:0.00125"]
PAPER_RATIO = 12.2  # PortLLM's largest memory saving against LoRA fine-tuning (GPU memory)
# Llama layouts at the sizes of the memory part (head dim 64 throughout, SmolLM2's 49,152-token
# vocabulary, tied embeddings): 135m is SmolLM2-135M itself, 360m SmolLM2-360M, then two wider ones.
SIZES = {
    "135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3},
    "360m": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
             "num_key_value_heads": 5},
    "700m": {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 24,
             "num_key_value_heads": 8},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8},
}
SMOKE_SIZES = {"s": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2},
               "m": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4}}

PORT_CHILD = """
import sys
from expertkit.port import port
port(sys.argv[1], sys.argv[2], sys.argv[3], overwrite=True)
"""
TRAIN_CHILD = """
import json, sys
from expertkit.train import train_lora
if len(sys.argv) > 5:
    from expertkit.tasks.toy import register_smoke_task
    register_smoke_task()
train_lora(sys.argv[1], sys.argv[2], sys.argv[3], resume=False, eval_n=0, save_every=0,
           **{**json.loads(sys.argv[4]), "steps": 3})
"""
# each baseline imports the libraries its probe uses (checked: porting loads torch, safetensors and
# expertkit only; training also transformers, peft and the Llama model code), so that a peak above
# its baseline is the probe's data (weights, activations, optimizer state), not library code
PORT_IMPORTS = "import sys\nimport expertkit.port"
TRAIN_IMPORTS = "import json, sys\nimport peft, transformers.models.llama.modeling_llama, expertkit.train"
# VmHWM (the peak resident set of this process's memory map) rather than ru_maxrss: Linux carries
# ru_maxrss over fork and exec, so a child started by a big parent would report the parent's peak.
PEAK = """
from expertkit.procmem import status as _status
print("PEAK_KB", _status("VmHWM") // 1024)
"""


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["all", "accuracy", "memory"], default="all")
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument("--levels", nargs="+", default=LEVELS, help="evolved bases, each STEPS:LR")
    p.add_argument("--train-steps", type=int, default=TRAIN["steps"])
    p.add_argument("--n", type=int, default=300, help="test examples per task (the same for every system)")
    p.add_argument("--margin", type=float, default=0.03, help="non-inferiority margin of the port against fine-tuning")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), help=f"memory part: model sizes of {list(SIZES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default: runs/experiments/portllm (smoke: a temp folder)")
    p.add_argument("--smoke", action="store_true", help="a tiny random Llama, a toy task, tiny n: checks the script")
    a = p.parse_args(argv)
    for level in a.levels:
        _level(level)  # a malformed level fails before any work
    if a.smoke:
        a.tasks, a.n, a.train_steps, a.levels = ["lo-hi"], min(a.n, 8), 2, ["2:1e-3", "2:1e-2"]
        a.sizes = [s for s in a.sizes if s in SMOKE_SIZES] or list(SMOKE_SIZES)
        a.out = a.out or Path(tempfile.mkdtemp(prefix="portllm-smoke-"))
    elif unknown := [s for s in a.sizes if s not in SIZES]:
        p.error(f"unknown --sizes {unknown}; choose from {list(SIZES)}")
    a.out = a.out or Path("runs/experiments/portllm")
    return a


def _level(text: str) -> tuple[int, float]:
    """``"STEPS:LR"`` as (steps, lr)."""
    try:
        steps, lr = text.split(":")
        return int(steps), float(lr)
    except ValueError:
        raise SystemExit(f"portllm: a level is STEPS:LR (for example 60:2.5e-4), got {text!r}") from None


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "EXPERTKIT_QUIET": "1"}


def peak_rss(code: str, *args: str) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of a fresh Python process running ``code`` with ``args``."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code + PEAK, *args], check=True, env=_env(),
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    kb = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_KB")]
    return int(kb[-1]) / 1024, seconds


# ---------------------------------------------------------------- accuracy at several drift levels


def _old_base(a: argparse.Namespace) -> str:
    """The old base: the bundled model, or (smoke) a tiny random Llama saved under ``out``."""
    if not a.smoke:
        return "smollm2-135m"
    from expertkit.models.tiny import saved_tiny
    from expertkit.tasks.toy import register_smoke_task

    register_smoke_task()
    return saved_tiny("llama", a.out / "tiny-llama")


def accuracy(a: argparse.Namespace) -> dict[str, Any]:
    """Per level: drift, the per-example scores of every system per task, and the pooled paired tests."""
    from expertkit.models import load_model
    from expertkit.models.bundled import cache_root
    from expertkit.port import evolve, port
    from expertkit.tasks.evaluate import evaluate
    from expertkit.train import train_lora

    train = {**TRAIN, "steps": a.train_steps, "seed": a.seed}
    if a.smoke:
        train.update(batch_size=2, rank=2)
    old_name = _old_base(a)
    old = load_model(old_name)
    kw = {"split": "test", "n": a.n, "seed": a.seed, "batch_size": 16,
          "cache_dir": (a.out if a.smoke else cache_root()) / "eval"}

    def scores(model: Any, task: str, adapter: Path | None) -> list[float]:
        return [float(s) for s in evaluate(model, None, task, adapter=adapter, **kw).scores]

    old_experts = {t: a.out / "experts-old" / t for t in a.tasks}
    for t, folder in old_experts.items():
        train_lora(old, t, folder, **train)
    old_patch = {t: scores(old, t, old_experts[t]) for t in a.tasks}
    levels = []
    for level in a.levels:
        steps, lr = _level(level)
        tag = f"{steps}-{lr:g}"
        new_dir = a.out / f"base-{tag}"
        if not (new_dir / "expertkit.json").is_file():
            evolve(old, new_dir, corpus="bbc", steps=steps, lr=lr, seed=a.seed, overwrite=True,
                   **({"batch_size": 2, "seq_len": 32} if a.smoke else {}))
        meta = json.loads((new_dir / "expertkit.json").read_text())
        new = load_model(new_dir)
        rows, drifts = {}, []
        for t in a.tasks:
            ported = port(old_experts[t], new_dir, a.out / f"ported-{tag}" / t, as_adapter=True, old_base=old_name,
                          overwrite=True)
            drifts.append(ported.diagnosis.median_rel_drift)
            tuned = a.out / f"experts-{tag}" / t
            train_lora(new, t, tuned, **train)
            rows[t] = {"zero_shot": scores(new, t, None), "ported": scores(new, t, ported.path),
                       "finetuned": scores(new, t, tuned), "old_patch": old_patch[t]}
            print(f"level {level} {t}: " + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in rows[t].items()), flush=True)
        levels.append({"level": level, "steps": steps, "lr": lr, "drift": float(np.median(drifts)),
                       "loss_first": meta["loss_first"], "loss_last": meta["loss_last"], "tasks": rows,
                       **_paired(rows, a)})
        del new
    return {"train": train, "n": a.n, "tasks": a.tasks, "margin": a.margin, "levels": levels,
            "threshold": _threshold(levels)}


def _paired(rows: dict[str, dict[str, list[float]]], a: argparse.Namespace) -> dict[str, Any]:
    """The level's pooled paired comparisons and verdict lines."""
    from expertkit.tasks.paired import compare, verdict

    def pooled(system: str) -> list[float]:
        return [x for t in a.tasks for x in rows[t][system]]

    tuned_vs_port = compare(pooled("finetuned"), pooled("ported"), seed=a.seed)
    port_vs_zero = compare(pooled("ported"), pooled("zero_shot"), seed=a.seed)
    old_vs_port = compare(pooled("old_patch"), pooled("ported"), seed=a.seed)  # does the patch lose by moving?
    non_inferior = tuned_vs_port.diff_high < a.margin  # the port is at most `margin` below fine-tuning
    lines = [verdict("LoRA fine-tuning on the new base beats the ported patch", tuned_vs_port),
             verdict("the ported patch beats the new base zero-shot", port_vs_zero),
             verdict("the patch on its own (old) base beats the same patch ported to the new base", old_vs_port),
             f"the ported patch is within {a.margin:.2f} of fine-tuning (upper end of the interval of "
             f"fine-tuned - ported below {a.margin:.2f}): {'shown' if non_inferior else 'not shown'} "
             f"({tuned_vs_port.diff_high:+.3f})."]
    return {"accuracy": {s: float(np.mean(pooled(s))) for s in ("zero_shot", "ported", "finetuned", "old_patch")},
            "finetuned_vs_ported": tuned_vs_port.as_dict(), "ported_vs_zero_shot": port_vs_zero.as_dict(),
            "old_patch_vs_ported": old_vs_port.as_dict(),
            "non_inferior": non_inferior, "verdicts": lines}


def _threshold(levels: list[dict[str, Any]]) -> dict[str, Any]:
    """What the measured levels say about ``port diagnose``'s risky-drift threshold: the largest drift at
    which the ported patch was not shown below the same patch on its own base (the port lost nothing
    measurable), and the smallest at which it was (porting itself cost accuracy)."""
    def lost(lv: dict[str, Any]) -> bool:
        o = lv["old_patch_vs_ported"]
        return o["p_value"] < 0.05 and o["diff"] > 0

    safe = [lv["drift"] for lv in levels if not lost(lv)]
    unsafe = [lv["drift"] for lv in levels if lost(lv)]
    return {"largest_safe_drift": max(safe) if safe else None, "smallest_unsafe_drift": min(unsafe) if unsafe else None}


# ---------------------------------------------------------------- memory against model size


def _synthetic(folder: Path, size: str, smoke: bool) -> tuple[Path, Path, int]:
    """A random Llama of ``size`` (bfloat16 safetensors, with a tokenizer) and a random rank-8 q/v PEFT
    adapter on it, made once under ``folder``: (model folder, adapter folder, parameter count)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir, adapter_dir = folder / "model", folder / "adapter"
    done = folder / "made.json"
    if done.is_file():
        return model_dir, adapter_dir, json.loads(done.read_text())["parameters"]
    if smoke:
        from expertkit.models.tiny import tiny_config, tiny_tokenizer

        config, tok = tiny_config("llama", **SMOKE_SIZES[size]), tiny_tokenizer()
    else:
        from expertkit.models.bundled import ensure_bundled

        base = ensure_bundled("smollm2-135m")
        config = LlamaConfig.from_pretrained(base)
        for k, v in SIZES[size].items():
            setattr(config, k, v)
        tok = AutoTokenizer.from_pretrained(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        count = sum(p.numel() for p in model.parameters())
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(adapter_dir)  # random A and B: a non-zero patch
    del model
    done.write_text(json.dumps({"size": size, "parameters": count}))
    return model_dir, adapter_dir, count


def memory(a: argparse.Namespace) -> dict[str, Any]:
    """Peak RSS of porting and of LoRA fine-tuning per size, with their import baselines and a fit."""
    import shutil

    task = "lo-hi" if a.smoke else a.tasks[0]
    train = {**TRAIN, "seed": a.seed}  # batch 8, as the docstring says
    base_port, _ = peak_rss(PORT_IMPORTS)
    base_train, _ = peak_rss(TRAIN_IMPORTS)
    rows = []
    for size in a.sizes:
        folder = a.out / "memory" / size
        model_dir, adapter_dir, count = _synthetic(folder, size, a.smoke)
        port_mb, port_s = peak_rss(PORT_CHILD, str(adapter_dir), str(model_dir), str(folder / "ported"))
        shutil.rmtree(folder / "ported", ignore_errors=True)  # a whole model's copy: not kept
        extra = ["smoke"] if a.smoke else []
        train_mb, train_s = peak_rss(TRAIN_CHILD, str(model_dir), task, str(folder / "lora"), json.dumps(train), *extra)
        row = {"size": size, "parameters": count, "port_mb": port_mb, "train_mb": train_mb,
               "port_above_mb": port_mb - base_port, "train_above_mb": train_mb - base_train,
               "ratio": train_mb / port_mb, "ratio_above": (train_mb - base_train) / max(port_mb - base_port, 1e-9),
               "port_seconds": port_s, "train_seconds_3_steps": train_s}
        rows.append(row)
        print(f"memory {size}: {count / 1e6:.0f}M parameters; port {port_mb:.0f} MB, fine-tune {train_mb:.0f} MB, "
              f"ratio {row['ratio']:.2f}x (above imports {row['ratio_above']:.2f}x)", flush=True)
    return {"baseline_mb": {"port_imports": base_port, "train_imports": base_train}, "sizes": rows,
            "paper_ratio_at": _paper_ratio_at(rows)}


def _paper_ratio_at(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Parameters at which the fitted peaks' ratio reaches :data:`PAPER_RATIO` (whole process, and above
    the import baselines), from straight lines fitted to each peak against the parameter count."""
    if len(rows) < 2:
        return {"whole": None, "above": None}
    n = np.array([r["parameters"] for r in rows], dtype=float)
    out: dict[str, float | None] = {}
    for key, (tk, pk) in {"whole": ("train_mb", "port_mb"), "above": ("train_above_mb", "port_above_mb")}.items():
        ts, ti = np.polyfit(n, [r[tk] for r in rows], 1)
        ps, pi = np.polyfit(n, [r[pk] for r in rows], 1)
        # ts*N + ti = R (ps*N + pi)  ->  N = (R pi - ti) / (ts - R ps); no crossing when it is not ahead
        denom = ts - PAPER_RATIO * ps
        at = (PAPER_RATIO * pi - ti) / denom if denom > 0 else None
        out[key] = None if at is None else float(max(at, 0.0))
    return out


# ---------------------------------------------------------------- report


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc, mem = result.get("accuracy"), result.get("memory")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if acc:
        drift = [100 * lv["drift"] for lv in acc["levels"]]
        for system, style in (("finetuned", "o-"), ("ported", "s-"), ("zero_shot", "x--")):
            axes[0].plot(drift, [lv["accuracy"][system] for lv in acc["levels"]], style, label=system.replace("_", "-"))
        axes[0].axhline(acc["levels"][0]["accuracy"]["old_patch"], color="grey", ls=":", label="patch on its own base")
        axes[0].set_xscale("log")
        axes[0].minorticks_off()
        axes[0].set_xticks(drift, [f"{d:.2f}" for d in drift])
        axes[0].set_xlabel("median relative drift of the patched tensors (%)")
        axes[0].set_ylabel(f"accuracy (pooled, n = {acc['n']} per task)")
        axes[0].set_title("new base: ported patch vs fine-tuning")
        axes[0].legend()
    if mem:
        params = [r["parameters"] / 1e6 for r in mem["sizes"]]
        axes[1].plot(params, [r["ratio"] for r in mem["sizes"]], "o-", label="whole process")
        axes[1].plot(params, [r["ratio_above"] for r in mem["sizes"]], "s-", label="above import baselines")
        axes[1].axhline(PAPER_RATIO, color="grey", ls=":", label=f"paper's {PAPER_RATIO}x")
        axes[1].set_xlabel("parameters (millions)")
        axes[1].set_ylabel("peak RSS: LoRA fine-tuning / porting")
        axes[1].set_title("memory saved by porting")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    """The tables and verdicts for docs/results.md."""
    lines = []
    if acc := result.get("accuracy"):
        lines += [f"Accuracy, pooled over {', '.join(acc['tasks'])} (n = {acc['n']} per task, the same examples for "
                  f"every system); old base + patch: {acc['levels'][0]['accuracy']['old_patch']:.3f}.", "",
                  "| level (steps:lr) | drift (median rel.) | evolve loss first -> last | new base zero-shot | "
                  "+ ported patch | + LoRA fine-tuned | fine-tuned - ported [95%] | McNemar p | old base + patch - ported [95%] "
                  "| McNemar p |", "|---|---:|---|---:|---:|---:|---|---:|---|---:|"]
        for lv in acc["levels"]:
            c, d, o = lv["accuracy"], lv["finetuned_vs_ported"], lv["old_patch_vs_ported"]
            lines.append(f"| {lv['level']} | {100 * lv['drift']:.2f}% | {lv['loss_first']:.2f} -> {lv['loss_last']:.2f} | "
                         f"{c['zero_shot']:.3f} | {c['ported']:.3f} | {c['finetuned']:.3f} | {_diff(d)} | "
                         f"{d['p_value']:.2g} | {_diff(o)} | {o['p_value']:.2g} |")
        lines.append("")
        for lv in acc["levels"]:
            lines += [f"- drift {100 * lv['drift']:.2f}%: {v}" for v in lv["verdicts"]]
        th = acc["threshold"]
        lines += ["", f"Threshold: the ported patch was not shown below the patch on its own base up to a drift of "
                  f"{_pct(th['largest_safe_drift'])}; it was from {_pct(th['smallest_unsafe_drift'])}."]
    if mem := result.get("memory"):
        b = mem["baseline_mb"]
        lines += ["", f"Peak RSS (`VmHWM`, fresh processes; import baselines: port {b['port_imports']:.0f} MB, "
                  f"LoRA training {b['train_imports']:.0f} MB):", "",
                  "| size | parameters | port (dense, streamed) | LoRA fine-tuning (batch 8) | ratio | "
                  "port above imports | fine-tuning above imports | ratio above imports |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in mem["sizes"]:
            lines.append(f"| {r['size']} | {r['parameters'] / 1e6:.0f}M | {r['port_mb']:.0f} MB | {r['train_mb']:.0f} MB | "
                         f"{r['ratio']:.2f}x | {r['port_above_mb']:.0f} MB | {r['train_above_mb']:.0f} MB | "
                         f"{r['ratio_above']:.2f}x |")
        at = mem["paper_ratio_at"]
        lines += ["", f"The paper's {PAPER_RATIO}x, from lines fitted to the peaks: whole process at "
                  f"{_params(at['whole'])}, above the import baselines at {_params(at['above'])}."]
    return "\n".join(lines)


def _diff(d: dict[str, Any]) -> str:
    return f"{d['diff']:+.3f} [{d['diff_ci'][0]:+.3f}, {d['diff_ci'][1]:+.3f}]"


def _pct(x: float | None) -> str:
    return "no measured level" if x is None else f"{100 * x:.2f}%"


def _params(x: float | None) -> str:
    return "no size (the lines do not cross)" if x is None else f"about {x / 1e6:,.0f}M parameters"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = _args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"smoke": a.smoke}
    saved = a.out / "results.json"
    if saved.is_file():  # a part run alone keeps the other part's saved result
        old = json.loads(saved.read_text())
        if old.get("smoke") == a.smoke:
            result.update({k: old[k] for k in ("accuracy", "memory") if k in old})
    if a.part in ("all", "accuracy"):
        result["accuracy"] = accuracy(a)
    if a.part in ("all", "memory"):
        result["memory"] = memory(a)
    saved.write_text(json.dumps(result, indent=1))
    _plot(result, a.out / "portllm.png")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
