"""How risky is porting a patch to a new base? Drift of the base against the size of the patch.

For every tensor the patch changes, :func:`diagnose` reports

* ``rel_drift = ||theta_new - theta_old|| / ||theta_old||``: how far the base moved;
* ``patch_norm = ||scale * delta||`` and ``patch_vs_drift = patch_norm / ||theta_new - theta_old||``.

Distances are exact when the old base is given (both streamed tensor by tensor) and estimated
from the sketch stored in the patch otherwise (see :mod:`expertkit.port.sketch`); without
either, only the fingerprints are compared. The verdict (``relation``):

* ``same``: the new base has the fingerprint the patch was made on: porting is plain application;
* ``evolved``: the base moved by a median relative drift below :data:`UNRELATED_DRIFT`;
* ``unrelated``: the median relative drift is above :data:`UNRELATED_DRIFT` (two independently
  trained models are about ``sqrt(2)`` apart); porting is refused unless forced;
* ``unknown``: the fingerprints differ and there is neither an old base nor a sketch.

Tensors whose relative drift exceeds :data:`RISKY_DRIFT` are listed (``risky``), and a median drift
above it draws a warning: PortLLM's premise is that the patch stays useful when the base changes
modestly; past that, measure before trusting a port.
:data:`UNRELATED_DRIFT` is a heuristic. :data:`RISKY_DRIFT` is set from a measurement
(``experiments/portllm.py``, docs/results.md, PortLLM): LoRA patches on SmolLM2-135M ported to bases
evolved by continued pretraining lost nothing at a median drift of 0.22% (2% of the patched tensors
above 0.5%) and 18 points of accuracy at 0.96% (every patched tensor above 0.5%), 43 at 4.4%.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from expertkit.port.sketch import estimate_distance, estimate_norm, sketch_tensor
from expertkit.weights.deltas import ModelSource, TensorSource
from expertkit.weights.fingerprint import fingerprint
from expertkit.weights.patch import Patch

UNRELATED_DRIFT = 0.5
RISKY_DRIFT = 0.005  # between the measured safe (0.22% median) and unsafe (0.96%) levels, see above


@dataclass
class TensorDrift:
    """Drift of one patched tensor between the old and the new base."""

    name: str
    layer: int | None
    base_norm: float
    drift: float
    rel_drift: float
    patch_norm: float
    patch_vs_drift: float  # inf when the base did not move


@dataclass
class PortDiagnosis:
    """The verdict of :func:`diagnose` and its per-tensor evidence."""

    relation: str  # same | evolved | unrelated | unknown
    method: str  # exact | sketch | fingerprint
    patch_fingerprint: str | None
    new_fingerprint: str
    tensors: list[TensorDrift] = field(default_factory=list)
    median_rel_drift: float | None = None
    max_rel_drift: float | None = None
    risky: list[str] = field(default_factory=list)
    message: str = ""

    def by_layer(self) -> list[dict[str, Any]]:
        """Per layer (None = outside the layer stack): relative drift and patch/drift, from summed squares."""
        rows: dict[int | None, list[float]] = {}
        for t in self.tensors:
            acc = rows.setdefault(t.layer, [0.0, 0.0, 0.0, 0])
            acc[0] += t.base_norm**2
            acc[1] += t.drift**2
            acc[2] += t.patch_norm**2
            acc[3] += 1
        out = []
        for layer in sorted(rows, key=lambda k: (k is None, k or 0)):
            base, drift, patch, count = rows[layer]
            out.append({
                "layer": layer, "tensors": count,
                "rel_drift": math.sqrt(drift / base) if base else 0.0,
                "patch_vs_drift": math.sqrt(patch / drift) if drift else math.inf,
            })
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (infinities as strings)."""
        data = asdict(self)
        data["by_layer"] = self.by_layer()
        return json.loads(json.dumps(data, default=str).replace("Infinity", '"inf"'))

    def markdown(self) -> str:
        """A short report: the verdict, then the per-layer table."""
        lines = [f"**{self.relation}** ({self.method}): {self.message}", ""]
        if self.tensors:
            lines += ["| layer | tensors | relative drift of the base | patch / drift |", "|---|---|---|---|"]
            for row in self.by_layer():
                layer = "-" if row["layer"] is None else row["layer"]
                ratio = "inf" if math.isinf(row["patch_vs_drift"]) else f"{row['patch_vs_drift']:.3f}"
                lines.append(f"| {layer} | {row['tensors']} | {row['rel_drift']:.4f} | {ratio} |")
        return "\n".join(lines) + "\n"


def _layers(names: list[str], source: TensorSource) -> dict[str, int | None]:
    """Layer index of each name via the architecture descriptor of the base's config."""
    from expertkit.weights.arch import describe

    config = None
    path = getattr(source.underlying, "path", None)
    if path is not None:
        cfg = Path(path) / "config.json" if Path(path).is_dir() else Path(path).parent / "config.json"
        if cfg.is_file():
            config = json.loads(cfg.read_text())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        roles = describe(names, config).roles
    return {n: roles[n].layer for n in names}


def _patch_norms(patch: Patch, scale: float) -> dict[str, float]:
    norms = {n: abs(scale) * float(d.double().norm()) for n, d in patch.dense_deltas()}
    for n, r in patch.replacements.items():
        norms.setdefault(n, 0.0)
    return norms


def diagnose(
    patch: Patch, new_base: ModelSource, *, old_base: ModelSource | None = None, scale: float | None = None
) -> PortDiagnosis:
    """Compare ``new_base`` with the base ``patch`` was made on (see the module docstring)."""
    s = patch.scale if scale is None else scale
    new = TensorSource(new_base)
    old = TensorSource(old_base) if old_base is not None else None
    try:
        new_fp = fingerprint(new.underlying)
        if patch.base_fingerprint is not None and new_fp == patch.base_fingerprint:
            return PortDiagnosis("same", "fingerprint", patch.base_fingerprint, new_fp,
                                 message="the new base is the very base the patch was made on; porting is plain application.")
        names = [n for n in patch.names() if new.dtype(n).is_floating_point]
        norms = _patch_norms(patch, s)
        if old is not None:
            method = "exact"
        elif patch.sketch and all(n in patch.sketch for n in names):
            method = "sketch"
        else:
            return PortDiagnosis("unknown", "fingerprint", patch.base_fingerprint, new_fp, message=(
                "the fingerprints differ and neither the old base nor a sketch of it is available, so the drift "
                "cannot be measured; pass the old base (--old-base) to see how far the base moved."))
        layers = _layers(names, new)
        rows = []
        for name in names:
            x_new = new.read(name)
            numel = x_new.numel()
            if old is not None:
                x_old = old.read(name).double()
                base_norm, drift = float(x_old.norm()), float((x_new.double() - x_old).norm())
            else:
                sk = patch.sketch[name]
                base_norm = estimate_norm(sk, numel)
                drift = estimate_distance(sketch_tensor(name, x_new, sk.numel()), sk, numel)
            rows.append(TensorDrift(
                name, layers[name], base_norm, drift, drift / base_norm if base_norm else 0.0, norms[name],
                norms[name] / drift if drift else math.inf,
            ))
    finally:
        new.close()
        if old is not None:
            old.close()
    return _verdict(patch.base_fingerprint, new_fp, method, rows)


def _verdict(patch_fp: str | None, new_fp: str, method: str, rows: list[TensorDrift]) -> PortDiagnosis:
    rels = [r.rel_drift for r in rows]
    median = statistics.median(rels) if rels else 0.0
    risky = [r.name for r in rows if r.rel_drift > RISKY_DRIFT]
    how = "measured exactly" if method == "exact" else "estimated from the patch's sketch of the old base"
    if median > UNRELATED_DRIFT:
        relation = "unrelated"
        message = (f"the median relative drift of the patched tensors is {median:.2f} ({how}), above "
                   f"{UNRELATED_DRIFT}: this does not look like an update of the patch's base but another model.")
    else:
        relation = "evolved"
        # the warning follows the median, the quantity the threshold was measured on: on the measured-safe
        # base (median 0.22%) a few tensors already exceed it, on the unsafe one (0.96%) all of them do
        head = f"the base moved by a median relative drift of {median:.4f} (max {max(rels, default=0):.4f}, {how}); "
        if median > RISKY_DRIFT:
            message = head + (f"the median is above {RISKY_DRIFT:.1%}, where ported LoRA patches were measured to lose "
                              "accuracy (docs/results.md, PortLLM): evaluate the ported model before trusting it.")
        else:
            message = head + "a modest update: the setting PortLLM targets" + (
                f" ({len(risky)} of {len(rows)} tensors moved by more than {RISKY_DRIFT:.1%})." if risky else ".")
    return PortDiagnosis(relation, method, patch_fp, new_fp, rows, median, max(rels, default=0.0), risky, message)
