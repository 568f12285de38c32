"""The ``zoo`` stage: Model-GLUE zoo planning (and building) over the run's experts.

The zoo is the LoRA experts of earlier ``train_experts`` stages (adapters of the run's base, named
by their tasks), plus any ``members`` listed in the stage: paths as ``expertkit zoo plan`` takes
them (Hugging Face model folders, PEFT LoRA adapters, folders holding them). The stage calls
:func:`~expertkit.merge.zoo.plan_zoo` with the settings and defaults of ``zoo plan`` (``n``,
``budget``, ``search``, ``metric``, ``group``, ``threshold``, ``mixture``; the run's seed), so the
plan is the one ``expertkit zoo plan`` writes for the same members and settings. The candidates
of each cluster are scored as jobs on the run's executor
(:class:`~expertkit.pipeline.zoo_jobs.JobEvaluator`): in this process by default, as Ray tasks
with ``expertkit run --executor ray``, with the same plan either way.

Output: ``<run>/zoo/<label>/plan.yaml``; with ``build: true`` (the default) the same folder is
:func:`~expertkit.merge.zoo.build_plan`'s output (``clusters/<cluster>/`` model folders, the
mixture, ``build.json``). The folder is installed whole at the end (nothing half-written), and
``expertkit zoo build <run>/zoo/<label>/plan.yaml OUT`` builds an edited copy of the plan.
Candidate files and job logs go to the stage's folder (``stages/NN-<name>/``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from expertkit.config import Config
from expertkit.pipeline.config import STAGES
from expertkit.pipeline.context import RunContext


class ZooStageParams(Config):
    """Parameters of the ``zoo`` stage (the planner's match ``expertkit zoo plan``'s options)."""

    experts: list[str] | None = Field(None, description="the run's experts (task names) in the zoo; default: all, "
                                      "[] for none")
    members: list[str] = Field(default_factory=list, description="more zoo members: model folders, LoRA adapters, "
                               "or folders holding them (as `expertkit zoo plan` takes)")
    tasks: list[str] | None = Field(None, min_length=1, description="evaluation tasks; default: the members' own tasks")
    base: str | None = Field(None, description="base of the listed adapters when their config does not name it "
                             "(zoo plan --base; applies to every adapter, so it must be the run's model "
                             "when the run's experts are in the zoo)")
    metric: Literal["cosine", "task_cosine", "relative_l2"] = Field("cosine", description="similarity metric")
    group: str = Field("all", description="tensor group the clustering uses: all, attention, mlp, embedding, ...")
    threshold: float | str = Field("auto", description="clustering distance cut, or 'auto' (largest gap)")
    n: int = Field(50, ge=1, description="validation examples per task")
    budget: int = Field(12, ge=1, description="evaluations per cluster")
    search: Literal["grid", "cmaes"] = Field("grid", description="coefficient search: the grid, or CMA-ES weights")
    mixture: Literal["ffn", "model", "none"] = Field("ffn", description="how the cluster representatives are mixed")
    build: bool = Field(True, description="build the plan (cluster models and mixture); false: write the plan only")
    label: str = Field("main", pattern=r"^[\w.-]+$", description="output folder name under zoo/")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str] | None) -> list[str] | None:
        from expertkit.pipeline.stages.experts import _known_tasks

        return None if v is None else _known_tasks(v)

    @field_validator("group")
    @classmethod
    def _group(cls, v: str) -> str:
        from expertkit.errors import suggest
        from expertkit.weights.arch import GROUPS

        if v != "all" and v not in GROUPS:
            raise ValueError(f"unknown tensor group '{v}'.{suggest(v, ['all', *GROUPS])} "
                             f"Known: all, {', '.join(GROUPS)}.")
        return v

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float | str) -> float | str:
        if isinstance(v, str) and v != "auto":
            raise ValueError(f"threshold must be 'auto' or a number, got {v!r}")
        if not isinstance(v, str) and v < 0:
            raise ValueError(f"threshold is a distance: give a number >= 0 (or 'auto'), got {v}")
        return v


def zoo_paths(ctx: RunContext, params: ZooStageParams) -> list[Path]:
    """The zoo's paths: the chosen experts of the run, then the listed members (all made absolute)."""
    from expertkit.errors import ConfigError

    experts: dict[str, dict[str, Any]] = {}
    for res in ctx.earlier("train_experts"):
        experts.update(res["experts"])
    chosen = list(experts) if params.experts is None else params.experts
    missing = [e for e in chosen if e not in experts]
    if missing:
        raise ConfigError(f"zoo: experts {missing} were not trained earlier in the run; trained: "
                          f"{', '.join(experts) or 'none'}. Add them to a train_experts stage before it.")
    if not chosen and not params.members:
        raise ConfigError("zoo: no zoo members: the run has no experts and the stage lists no members; add a "
                          "train_experts stage before it or list members: (model folders or LoRA adapters).")
    if chosen and params.base is not None:
        from expertkit.merge.zoo.members import resolve_base

        if resolve_base(params.base).resolve() != ctx.model_path().resolve():
            raise ConfigError(f"zoo: base '{params.base}' is not the run's model, whose adapters the run's experts "
                              "are; drop base: or leave the run's experts out (experts: []).")
    return [(ctx.run_dir / experts[e]["path"]).absolute() for e in chosen] + \
        [Path(m).expanduser().absolute() for m in params.members]


def default_tasks(paths: list[Path], base: str | None) -> list[str]:
    """The members' own tasks (``expertkit.json``), in member order; an error when none is known."""
    from expertkit.errors import ConfigError
    from expertkit.merge.zoo import discover_zoo

    tasks: list[str] = []
    for m in discover_zoo(paths, base=base):
        tasks += [t for t in m.tasks if t not in tasks]
    if not tasks:
        raise ConfigError("zoo: no member names the task it was trained for (expertkit.json); give 'tasks:' "
                          "(the evaluation tasks of the plan).")
    return tasks


def summary(plan: Any, folder: str, built: bool) -> dict[str, Any]:
    """The stage's result: where the plan is, and per cluster its members, method and score."""
    clusters = [{"name": c.name, "members": c.members, "merged": c.merged, "method": c.method, "params": c.params,
                 "weights": c.weights, "score": c.score, "tasks": c.tasks} for c in plan.clusters]
    return {"path": folder, "plan": f"{folder}/plan.yaml", "built": built, "tasks": plan.tasks,
            "members": {m.name: m.path for m in plan.members}, "clusters": clusters,
            "mixture": plan.mixture.kind, "incompatible": plan.incompatible,
            "validation": plan.validation.model_dump(mode="json")}


class ZooStage:
    """Plan the zoo of the run's experts (and listed members); build it unless ``build: false``."""

    def run(self, ctx: RunContext, params: ZooStageParams) -> dict[str, Any]:
        """Plan with candidate evaluations on the run's executor, then write (and build) the plan."""
        from expertkit.fileio import staged_folder
        from expertkit.merge.zoo import build_plan, plan_zoo, save_plan
        from expertkit.models.bundled import cache_root
        from expertkit.pipeline.zoo_jobs import job_evaluator_factory

        paths = zoo_paths(ctx, params)
        tasks = params.tasks or default_tasks(paths, params.base)
        work = (ctx.stage_dir or ctx.run_dir / "stages" / "zoo").absolute()
        work.mkdir(parents=True, exist_ok=True)
        factory = job_evaluator_factory(ctx.job_executor(), work, split="validation", n=params.n, seed=ctx.seed,
                                        cache_dir=cache_root() / "eval")
        plan = plan_zoo(paths, tasks, base=params.base, metric=params.metric, group=params.group,
                        threshold=params.threshold, n=params.n, budget=params.budget, mixture=params.mixture,
                        seed=ctx.seed, search=params.search, evaluator_factory=factory)
        out = ctx.run_dir / "zoo" / params.label
        if params.build:
            build_plan(plan, out, overwrite=True)
        else:
            with staged_folder(out) as tmp:  # replaces a former build of this label whole
                save_plan(plan, tmp / "plan.yaml")
        return summary(plan, str(out.relative_to(ctx.run_dir)), params.build)

    def report(self, result: dict[str, Any]) -> str:
        """Clusters with the chosen merge per cluster and its validation score; the mixture."""
        v = result["validation"]
        lines = ["| cluster | members | merged | method | validation score |", "|---|---|---|---|---:|"]
        for c in result["clusters"]:
            params = ", ".join(f"{k}={x}" for k, x in c["params"].items())
            weights = c["weights"] or {}
            merged = ", ".join(f"{m}*{weights[m]:.3g}" if m in weights else m for m in c["merged"])
            score = "-" if c["score"] is None else f"{c['score']:.3f}"
            lines.append(f"| {c['name']} | {', '.join(c['members'])} | {merged} | {c['method']}"
                         f"{f' ({params})' if params else ''} | {score} |")
        done = (f"built into `{result['path']}/` (build.json)" if result["built"]
                else f"not built (`expertkit zoo build {result['plan']} OUT` builds it)")
        lines += ["", f"Mixture: {result['mixture']}. Plan `{result['plan']}`, {done}. Scores: mean accuracy over "
                  f"each cluster's tasks on the {v['split']} split, n = {v['n']} per task, budget {v['budget']} "
                  f"evaluations per cluster ({v['search']} search)."]
        if result["incompatible"]:
            lines += ["", *(f"- note: {line}" for line in result["incompatible"])]
        return "\n".join(lines)


STAGES.add("zoo", ZooStage(), params=ZooStageParams,
           summary="Model-GLUE zoo of the run's experts (and listed members): clusters, a merge per cluster "
                   "chosen on validation under a budget, a mixture; built unless build: false")
