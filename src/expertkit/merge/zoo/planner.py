"""``plan_zoo``: the Model-GLUE planner from zoo paths to an editable :class:`ZooPlan`.

1. **Inputs**: :func:`~expertkit.merge.zoo.members.discover_zoo` (model folders, LoRA adapters,
   folders of them such as the quickstart's experts).
2. **Compatibility**: members are split by signature (architecture, tensor names and shapes,
   vocabulary, tied embeddings); every incompatible pair of classes is explained in the plan.
3. **Similarity**: streamed pairwise similarity within each class (per tensor group; weights or
   task vectors), then **clustering** of all members at once with incompatible pairs forbidden
   (:func:`~expertkit.merge.zoo.cluster.agglomerative`); every member is placed.
4. **Strategy** per cluster, on the cluster's tasks (the members' training tasks among the plan's
   tasks; all plan tasks when none is known), by
   :func:`~expertkit.merge.zoo.select.select_strategy` under the evaluation budget, with a grid
   of coefficients or a CMA-ES search of per-member weights (``search``).
5. **Mixture** of the cluster representatives: ``ffn`` when every representative has the same
   signature and the architecture has an MoE counterpart (Llama/Mistral -> Mixtral, Qwen2 ->
   Qwen2-MoE); else ``model``, with a note; as asked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from expertkit.errors import ConfigError
from expertkit.merge.zoo.cluster import agglomerative
from expertkit.merge.zoo.compat import Signature, compatibility_classes, incompatibility_report
from expertkit.merge.zoo.members import MemberWeights, ZooMember, discover_zoo
from expertkit.merge.zoo.plan import ClusterSpec, MemberSpec, MixtureSpec, SimilaritySpec, ValidationSpec, ZooPlan
from expertkit.merge.zoo.select import BatchEvaluator, Evaluator, MergeFn, select_strategy
from expertkit.merge.zoo.similarity import pairwise_similarity

EvaluatorFactory = Callable[[Path, list[str]], Evaluator]


def common_base(members: Sequence[ZooMember]) -> Path | None:
    """The base folder every member is an adapter of, or None."""
    bases = {m.base.resolve() if m.base else None for m in members}
    if len(bases) == 1 and all(m.kind == "adapter" for m in members):
        return next(iter(bases))
    return None


def varying_names(readers: Sequence[MemberWeights], base: Path | None = None) -> list[str]:
    """Tensor names whose values differ somewhere among ``readers`` (file order of the first).

    For adapters of one base this is the union of the tensors they change (nothing is read);
    otherwise every floating-point tensor is read and compared.
    """
    names = readers[0].names()
    if base is not None and all(r.member.kind == "adapter" for r in readers):
        changed = set().union(*(r.changed() for r in readers))
        return [n for n in names if n in changed]
    out = []
    for n in names:
        if not readers[0].dtype(n).is_floating_point:
            continue
        first = readers[0].read(n)
        if not all(torch.equal(first, r.read(n)) for r in readers[1:]):
            out.append(n)
    return out


def cluster_tasks(members: Sequence[ZooMember], tasks: Sequence[str]) -> list[str]:
    """The plan's tasks the members were trained for (all plan tasks when none is known)."""
    mine = {t for m in members for t in m.tasks}
    return [t for t in tasks if t in mine] or list(tasks)


def _similarity(readers: list[MemberWeights], classes: list[list[int]], metric: str, group: str,
                progress: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, dict[str, float]]]:
    n = len(readers)
    dist = torch.zeros(n, n, dtype=torch.float64)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    matrix: dict[str, dict[str, float]] = {r.member.name: {} for r in readers}
    for cls in classes:
        for i in cls:
            allowed[i, cls] = True
        if len(cls) < 2:
            continue
        sub = [readers[i] for i in cls]
        reference = None
        if metric == "task_cosine":
            base = common_base([r.member for r in sub])
            if base is None:
                raise ConfigError("metric 'task_cosine' needs members that are adapters of one base; "
                                  "use metric 'cosine' or 'relative_l2'.")
            reference = MemberWeights(ZooMember("base", base, "model"))
        try:
            rep = pairwise_similarity(sub, sub[0].names(), reference=reference, config=sub[0].config,
                                      member_names=[r.member.name for r in sub], progress=progress)
        finally:
            if reference is not None:
                reference.close()
        d = rep.distance(metric, group)
        m = rep.matrix(metric, group)
        for a, i in enumerate(cls):
            for b, j in enumerate(cls):
                dist[i, j] = d[a, b]
                if i != j:
                    matrix[readers[i].member.name][readers[j].member.name] = round(float(m[a, b]), 9)
    return dist, allowed, matrix


def plan_zoo(  # noqa: PLR0913 - the planner's options
    paths: Sequence[str | os.PathLike[str]],
    tasks: Sequence[str],
    *,
    base: str | os.PathLike[str] | None = None,
    metric: str = "cosine",
    group: str = "all",
    threshold: float | str = "auto",
    split: str = "validation",
    n: int = 50,
    budget: int = 12,
    mixture: str = "ffn",
    seed: int = 0,
    search: str = "grid",
    evaluator_factory: EvaluatorFactory | None = None,
    merge: MergeFn | None = None,
    progress: bool = True,
) -> ZooPlan:
    """Plan a zoo: clusters, a merge strategy per cluster, and a mixture (see the module docstring).

    ``evaluator_factory(folder, tasks)`` returns the evaluator of one cluster (default: a
    :class:`~expertkit.merge.zoo.evaluator.PatchedEvaluator` on ``split``/``n``/``seed``); an
    evaluator with a ``many`` method (:class:`~expertkit.merge.zoo.select.BatchEvaluator`, e.g. the
    executor jobs of :func:`expertkit.pipeline.zoo_jobs.job_evaluator_factory`) is given the
    independent candidates as batches, with the same plan as a one-by-one evaluator;
    ``merge`` replaces :func:`expertkit.merge.merge_state_dicts` (tests). ``search`` is ``grid``
    or ``cmaes`` (see :func:`~expertkit.merge.zoo.select.select_strategy`).
    """
    from expertkit.merge.zoo.select import SEARCHES
    from expertkit.tasks import get_task

    if search not in SEARCHES:
        raise ConfigError(f"unknown coefficient search {search!r}; use one of {', '.join(SEARCHES)}.")

    for t in tasks:
        get_task(t)  # unknown names fail before any work
    members = discover_zoo(paths, base=base)
    readers = [MemberWeights(m) for m in members]
    try:
        return _plan(members, readers, list(tasks), metric, group, threshold, split, n, budget, mixture, seed,
                     evaluator_factory, merge, progress, search)
    finally:
        for r in readers:
            r.close()


def _plan(members: list[ZooMember], readers: list[MemberWeights], tasks: list[str], metric: str, group: str,
          threshold: float | str, split: str, n: int, budget: int, mixture: str, seed: int,
          evaluator_factory: EvaluatorFactory | None, merge: MergeFn | None, progress: bool,
          search: str = "grid") -> ZooPlan:
    names = [m.name for m in members]
    sigs = [Signature.of(r.names(), r.shape, r.config) for r in readers]
    classes = compatibility_classes(sigs)
    incompatible = incompatibility_report(sigs, names)
    dist, allowed, matrix = _similarity(readers, classes, metric, group, progress)
    clustering = agglomerative(dist, threshold, allowed=allowed)
    if evaluator_factory is None:
        from expertkit.merge.zoo.evaluator import evaluator_for

        def evaluator_factory(folder: Path, ts: list[str]) -> Evaluator:
            return evaluator_for(folder, ts, split=split, n=n, seed=seed)

    clusters = []
    for k, idx in enumerate(clustering.clusters):
        sub = [readers[i] for i in idx]
        cmembers = [members[i] for i in idx]
        cbase = common_base(cmembers)
        ctasks = cluster_tasks(cmembers, tasks)
        spec: dict[str, Any] = {"name": f"cluster{k}", "members": [m.name for m in cmembers],
                                "base": str(cbase) if cbase else None, "tasks": ctasks}
        if len(sub) == 1:
            clusters.append(ClusterSpec(**spec, method="single", merge=[cmembers[0].name]))
            continue
        vary = varying_names(sub, cbase)
        models = {r.member.name: r.state_dict(vary) for r in sub}
        base_sd = None
        if cbase is not None:
            with MemberWeights(ZooMember("base", cbase, "model")) as b:
                base_sd = b.state_dict(vary)
        evaluator = evaluator_factory(cmembers[0].weights_base, ctasks)
        sel = select_strategy(models, evaluator, base=base_sd, budget=budget, merge=merge, seed=seed,
                              search=search,
                              evaluate_many=evaluator.many if isinstance(evaluator, BatchEvaluator) else None)
        clusters.append(ClusterSpec(**spec, merge=sel.members, method=sel.method, params=sel.params,
                                    weights=sel.weights, score=sel.score, trials=[t.line() for t in sel.trials]))
    kind = mixture
    if kind == "ffn" and len({sigs[c[0]] for c in clustering.clusters}) > 1:
        kind = "model"
        incompatible.append("mixture: the cluster representatives differ in architecture or shapes, so an "
                            "FFN-level (MoE) mixture is impossible; a model-level router is planned instead.")
    elif kind == "ffn" and clustering.clusters:
        kind = _ffn_or_model(readers[clustering.clusters[0][0]].config or {}, incompatible)
    if len(clusters) < 2 and kind != "none":
        kind = "none"
    return ZooPlan(
        seed=seed, tasks=tasks,
        validation=ValidationSpec(split=split, n=n, budget=budget, search=search),  # type: ignore[arg-type]
        similarity=SimilaritySpec(metric=metric, group=group, threshold=threshold,
                                  cut=clustering.threshold if clustering.threshold != float("inf") else None,
                                  matrix=matrix),
        members=[MemberSpec(name=m.name, path=str(m.path), kind=m.kind, base=str(m.base) if m.base else None,
                            tasks=list(m.tasks)) for m in members],
        incompatible=incompatible, clusters=clusters, mixture=MixtureSpec(kind=kind),  # type: ignore[arg-type]
    )


def _ffn_or_model(config: dict[str, Any], incompatible: list[str]) -> str:
    """"ffn" when the representatives' architecture has an MoE counterpart, else "model" (with a note)."""
    from expertkit.errors import ConfigError
    from expertkit.merge.mixture.ffn import moe_target

    try:
        moe_target(config)
    except ConfigError as exc:
        incompatible.append(f"mixture: {exc} A model-level router is planned instead.")
        return "model"
    return "ffn"


def members_of(plan: ZooPlan, names: Sequence[str]) -> list[ZooMember]:
    """Rebuild :class:`ZooMember`\\ s of a plan (paths as written in the plan)."""
    out = []
    for name in names:
        m = plan.member(name)
        out.append(ZooMember(m.name, Path(m.path), m.kind, Path(m.base) if m.base else None, tuple(m.tasks)))
    return out
