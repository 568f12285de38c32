"""Streamed pairwise similarity of models, per tensor group, of weights or task vectors.

For ``n`` compatible models the tensors are visited one name at a time (``n`` tensors in memory,
plus the reference's in task-vector mode). Per tensor group (``embedding``, ``attention``,
``mlp``, ``norm``, ... from the architecture descriptor, plus ``all``) three sums are kept in
float64:

* ``sq[i]``: squared norm of model ``i``'s weights;
* ``dist2[i, j]``: squared distance ``||w_i - w_j||^2``;
* ``tv2[i]``: squared norm of the task vector ``w_i - w_ref`` (only with a reference).

From them, without cancellation near 1 (the regime of models fine-tuned from one base):

* weight cosine: ``cos = 1 - (dist2 - (|w_i| - |w_j|)^2) / (2 |w_i| |w_j|)``;
* task-vector cosine: the same formula with task-vector norms (``w_i - w_j`` is also
  ``tv_i - tv_j``, so the distance serves both);
* relative distance: ``||w_i - w_j|| / sqrt(|w_i| |w_j|)``.

Integer and bool tensors are not weights and are skipped. Tensors that are bit-identical in
every model are recorded in :attr:`SimilarityReport.identical` (merging need not touch them).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from expertkit.errors import ConfigError, IncompatibleModelsError, unknown

METRICS = ("cosine", "task_cosine", "relative_l2")


class WeightReader(Protocol):
    """What similarity needs from a model: names, shapes, dtypes and one tensor at a time."""

    def names(self) -> list[str]: ...  # noqa: D102
    def shape(self, name: str) -> tuple[int, ...]: ...  # noqa: D102
    def dtype(self, name: str) -> torch.dtype: ...  # noqa: D102
    def read(self, name: str) -> torch.Tensor: ...  # noqa: D102


@dataclass
class _Sums:
    sq: torch.Tensor  # (n,)
    dist2: torch.Tensor  # (n, n)
    tv2: torch.Tensor  # (n,)
    numel: int = 0


@dataclass
class SimilarityReport:
    """Pairwise similarity sums per tensor group; metrics are computed on demand."""

    members: list[str]
    sums: dict[str, _Sums]
    has_reference: bool
    identical: list[str] = field(default_factory=list)

    @property
    def groups(self) -> list[str]:
        """Tensor groups with at least one tensor (``all`` first)."""
        return ["all"] + sorted(g for g in self.sums if g != "all")

    def matrix(self, metric: str = "cosine", group: str = "all") -> torch.Tensor:
        """The ``(n, n)`` matrix of ``metric`` (see the module docstring) over ``group``."""
        if metric not in METRICS:
            raise unknown("similarity metric", metric, METRICS)
        if group not in self.sums:
            raise unknown("tensor group", group, self.groups)
        s = self.sums[group]
        if metric == "relative_l2":
            norm = s.sq.sqrt()
            return s.dist2.sqrt() / (norm[:, None] * norm[None, :]).sqrt().clamp_min(1e-300)
        if metric == "task_cosine" and not self.has_reference:
            raise ConfigError("metric 'task_cosine' needs a reference model (reference=): the common base.")
        norm = (s.tv2 if metric == "task_cosine" else s.sq).sqrt()  # (n,)
        gap = (norm[:, None] - norm[None, :]) ** 2  # (n, n)
        denom = (2 * norm[:, None] * norm[None, :]).clamp_min(1e-300)
        cos = 1 - (s.dist2 - gap) / denom
        return cos.clamp(-1.0, 1.0)

    def distance(self, metric: str = "cosine", group: str = "all") -> torch.Tensor:
        """A dissimilarity for clustering: ``1 - cos`` for cosines, the relative distance otherwise."""
        m = self.matrix(metric, group)
        d = m if metric == "relative_l2" else 1 - m
        d = d.clamp_min(0.0)
        d.fill_diagonal_(0.0)
        return d


def pairwise_similarity(
    models: Sequence[WeightReader],
    names: Sequence[str],
    *,
    reference: WeightReader | None = None,
    config: dict[str, Any] | None = None,
    member_names: Sequence[str] | None = None,
    progress: bool = True,
) -> SimilarityReport:
    """Stream ``models`` tensor by tensor and accumulate the similarity sums per tensor group.

    Args:
        models: readers of compatible models (same names and shapes; checked).
        names: the tensor names to visit.
        reference: optional common base; enables task-vector cosine.
        config: ``config.json`` of the models (picks the architecture descriptor for groups).
        member_names: labels of the models (default ``m0, m1, ...``).
    """
    from expertkit.progress import track
    from expertkit.weights.arch import InferredArchitectureWarning, describe

    n = len(models)
    labels = list(member_names) if member_names is not None else [f"m{i}" for i in range(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InferredArchitectureWarning)
        summary = describe(list(names), config)
    sums: dict[str, _Sums] = {}

    def acc(group: str) -> _Sums:
        if group not in sums:
            z = torch.zeros(n, dtype=torch.float64)
            sums[group] = _Sums(z.clone(), torch.zeros(n, n, dtype=torch.float64), z.clone())
        return sums[group]

    identical = []
    items = track(list(names), "Pairwise similarity", total=len(names)) if progress else names
    for name in items:
        shapes = {tuple(m.shape(name)) for m in models}
        if len(shapes) != 1:
            raise IncompatibleModelsError(f"tensor {name} has different shapes across models: {sorted(shapes)}.")
        if not all(m.dtype(name).is_floating_point for m in models):
            continue
        xs = [m.read(name).reshape(-1) for m in models]  # n x (numel,)
        ref = reference.read(name).reshape(-1) if reference is not None else None
        same = all(torch.equal(xs[0], x) for x in xs[1:])
        if same:
            identical.append(name)
        sq = torch.tensor([float(x.double().square().sum()) for x in xs], dtype=torch.float64)
        tv2 = torch.zeros(n, dtype=torch.float64)
        if ref is not None:  # (w_i - w_ref) in float32 is exact for nearby values; summed in float64
            tv2 = torch.tensor([float((x - ref).double().square().sum()) for x in xs], dtype=torch.float64)
        dist2 = torch.zeros(n, n, dtype=torch.float64)
        if not same:
            for i in range(n):
                for j in range(i + 1, n):
                    dist2[i, j] = dist2[j, i] = float((xs[i] - xs[j]).double().square().sum())
        for group in ("all", summary.roles[name].group):
            s = acc(group)
            s.numel += xs[0].numel()
            s.sq += sq
            s.tv2 += tv2
            s.dist2 += dist2
    if not sums:
        raise ConfigError("no floating-point tensors to compare; the models hold no weights.")
    return SimilarityReport(labels, sums, reference is not None, identical)
