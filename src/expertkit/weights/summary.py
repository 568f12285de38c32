"""A checkpoint at a glance: what ``expertkit info`` prints and the ``inspect`` stage records.

Reads only headers and ``config.json``: no tensor data is loaded.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from expertkit.fileio import human_bytes as _human
from expertkit.weights.arch import InferredArchitectureWarning, describe
from expertkit.weights.reader import Checkpoint


def checkpoint_summary(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Architecture, parameter count, dtypes, tensor groups and size on disk, as a JSON-able dict."""
    with Checkpoint(path, allow_pickle=allow_pickle) as ckpt:
        infos = ckpt.infos()
        config = ckpt.config
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", InferredArchitectureWarning)
            arch = describe([i.name for i in infos], config)
        dtypes = Counter(str(i.dtype).replace("torch.", "") for i in infos)
        groups = {}
        for group, names in arch.groups.items():
            if names:
                groups[group] = {
                    "tensors": len(names),
                    "parameters": sum(ckpt.info(n).numel for n in names),
                    "layers": len({arch.roles[n].layer for n in names if arch.roles[n].layer is not None}),
                }
        return {
            "path": str(ckpt.path),
            "architecture": arch.architecture,
            "model_type": arch.model_type,
            "inferred": arch.inferred,
            "warnings": [str(w.message) for w in caught],
            "num_layers": arch.num_layers,
            "layers_per_stack": {str(k): v for k, v in arch.layers_per_stack.items()},
            "num_experts": arch.num_experts,
            "moe": _moe(arch, config),
            "num_tensors": len(infos),
            "num_parameters": ckpt.num_parameters,
            "dtypes": dict(dtypes),
            "groups": groups,
            "other": list(arch.other[:20]),
            "shards": len(ckpt.shards),
            "size_on_disk": ckpt.size_on_disk,
        }


def _rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    arch = summary["architecture"] + (" (inferred from tensor names)" if summary["inferred"] else "")
    rows = [
        ("architecture", arch),
        ("model_type", str(summary["model_type"])),
        ("layers", str(summary["num_layers"])
         + ("" if len(summary["layers_per_stack"]) < 2 else
            " per stack (" + ", ".join(f"{k} {v}" for k, v in summary["layers_per_stack"].items()) + ")")),
        ("parameters", f"{summary['num_parameters']:,} in {summary['num_tensors']} tensors"),
        ("dtypes", ", ".join(f"{k} x{v}" for k, v in summary["dtypes"].items())),
        ("size on disk", f"{_human(summary['size_on_disk'])} in {summary['shards']} shard(s)"),
    ]
    moe = summary.get("moe")
    if moe:
        shared = f"; shared experts in {moe['shared_layers']}" if moe["shared_layers"] else ""
        dense = f"; dense MLP layers: {moe['dense_layers']}" if moe["dense_layers"] else ""
        top_k = f", top-{moe['top_k']} routing" if moe["top_k"] else ""
        rows.insert(3, ("experts", f"{summary['num_experts']} per MoE layer{top_k}; {moe['moe_layers']} MoE layers, "
                                   f"{moe['routers']} router tensors{shared}{dense}"))
    return rows


def _moe(arch: Any, config: dict[str, Any] | None) -> dict[str, Any] | None:
    """Where the experts, routers and shared parts are (None for a dense model)."""
    if not arch.num_experts:
        return None
    from expertkit.weights.arch import descriptor_for

    desc = descriptor_for(config) if config else None
    return {"moe_layers": len(arch.experts), "routers": len(arch.groups["router"]),
            "shared_layers": len(arch.by_layer("shared_expert")), "dense_layers": len(arch.by_layer("mlp")),
            "top_k": desc.top_k(config) if desc else None}


def summary_markdown(summary: dict[str, Any]) -> str:
    """The summary as markdown tables."""
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in _rows(summary)]
    lines += ["", "| group | tensors | parameters | layers |", "|---|---:|---:|---:|"]
    for group, g in summary["groups"].items():
        lines.append(f"| {group} | {g['tensors']} | {g['parameters']:,} | {g['layers'] or ''} |")
    for w in summary["warnings"]:
        lines += ["", f"> warning: {w}"]
    return "\n".join(lines)


def print_summary(summary: dict[str, Any], console: Any) -> None:
    """Print the summary as rich tables."""
    from rich.table import Table

    head = Table(show_header=False, title=summary["path"], title_justify="left")
    for k, v in _rows(summary):
        head.add_row(k, v)
    console.print(head)
    groups = Table("group", "tensors", "parameters", "layers", title="tensor groups", title_justify="left")
    for group, g in summary["groups"].items():
        groups.add_row(group, str(g["tensors"]), f"{g['parameters']:,}", str(g["layers"] or ""))
    console.print(groups)
    for w in summary["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {w}", markup=True, highlight=False)
    if summary["other"]:
        console.print("unrecognised tensors: " + ", ".join(summary["other"]), markup=False)
