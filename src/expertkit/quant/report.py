"""What a quantization run reports: bits per structure, and reading a stored ``quantization.json`` back.

:func:`bits_by_structure` answers "which structures got the bits": the mean code bits (weighted by
weights) per structure group (attention, mlp, expert, shared_expert), per linear kind (attention,
gate_up, down) and per layer. :func:`read_report` parses a folder's ``quantization.json``
defensively (it may come from anywhere) and :func:`structure_table` prints it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from expertkit.errors import CheckpointError

REQUIRED = ("method", "policy", "bits", "model_bits_per_parameter", "bits_by_structure", "quantization")


def bits_by_structure(records: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """``{"group" | "kind" | "layer": {value: {"weights": n, "bits": mean code bits}}}`` of ``records``."""
    out: dict[str, dict[str, dict[str, float]]] = {"group": {}, "kind": {}, "layer": {}}
    for rec in records.values():
        t = rec.target
        for axis, value in (("group", t.group), ("kind", t.kind), ("layer", f"{t.stack + '.' if t.stack else ''}{t.layer}")):
            cell = out[axis].setdefault(value, {"weights": 0, "bits": 0.0})
            cell["weights"] += t.numel
            cell["bits"] += t.numel * rec.scheme.bits
    for axis in out.values():
        for cell in axis.values():
            cell["bits"] = round(cell["bits"] / cell["weights"], 4)
    return out


def read_report(folder: str | Path) -> dict[str, Any]:
    """The ``quantization.json`` of a quantized folder, checked for the keys readers use."""
    path = Path(folder) / "quantization.json"
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no quantization.json; is it a folder written by `expertkit quant run`?") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    missing = [k for k in REQUIRED if not isinstance(report, dict) or k not in report]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; write it again with `expertkit quant run`.")
    return report


def structure_table(report: dict[str, Any]) -> str:
    """A plain-text table: mean code bits and share of weights per structure group and linear kind,
    with GPTQ's and RTN's mean relative layer errors per group."""
    errors = report["quantization"].get("by_group", {})
    total = sum(c["weights"] for c in report["bits_by_structure"]["group"].values()) or 1
    lines = [f"{'structure':<16}{'weights':>9}{'bits':>7}{'error':>9}{'RTN':>9}"]
    for axis in ("group", "kind"):
        for name, cell in report["bits_by_structure"][axis].items():
            e = errors.get(name, {}) if axis == "group" else {}
            err = f"{e['error']:9.4f}{e['rtn_error']:9.4f}" if e else ""
            label = name if axis == "group" else f"{name} (kind)"
            lines.append(f"{label:<16}{cell['weights'] / total:9.1%}{cell['bits']:7.2f}{err}")
    return "\n".join(lines)
