"""The ``route`` stage: GLIDER and its baselines over a library of the run's LoRA experts.

The library is the run's own experts (an earlier ``train_experts`` stage) with Phatgoose gates
trained into ``<run>/route/gates/``, or, when ``tasks`` is given, a library built for those tasks
in ``<run>/route/library/`` (expertkit.route.build_library: resumable, reused). Every method is
evaluated on the same ``n`` test examples of each held-in and held-out task; GLIDER is compared with
each baseline by an exact McNemar test on the pooled examples, and the global router's top-1
retrieval accuracy on the held-in queries is reported.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from expertkit.config import Config
from expertkit.pipeline.config import STAGES
from expertkit.pipeline.context import RunContext
from expertkit.route.config import METHODS, RouteConfig
from expertkit.route.gates import GateConfig
from expertkit.train.config import LoraTrainConfig


class RouteParams(Config):
    """Parameters of the ``route`` stage."""

    tasks: list[str] | None = Field(None, description="held-in tasks (one expert each); default: the run's experts")
    held_out: list[str] = Field(default_factory=list, description="tasks without an expert, evaluated too")
    methods: list[str] = Field(default_factory=lambda: list(METHODS), min_length=1,
                               description="glider and the baselines to compare (expertkit route methods)")
    n: int = Field(50, ge=1, description="test examples per task, the same for every method")
    route: RouteConfig = Field(default_factory=RouteConfig, description="top_k, alpha, temperature, ...")
    train: LoraTrainConfig = Field(default_factory=LoraTrainConfig, description="expert training (with tasks)")
    gates: GateConfig = Field(default_factory=GateConfig, description="gate training of each expert")
    batch_size: int = Field(16, ge=1, description="examples per forward pass")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str] | None) -> list[str] | None:
        from expertkit.route import LibraryConfig

        return v if not v else LibraryConfig.check_tasks(v)

    @field_validator("held_out")
    @classmethod
    def _held_out(cls, v: list[str]) -> list[str]:
        from expertkit.pipeline.stages.experts import _known_tasks  # evaluation-only tasks may be held out

        return _known_tasks(v)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        from expertkit.errors import suggest

        for m in v:
            if m not in METHODS:
                raise ValueError(f"unknown routing method '{m}'.{suggest(m, METHODS)} Known: {', '.join(METHODS)}.")
        return v


def _library(ctx: RunContext, params: RouteParams) -> Any:
    from expertkit.errors import ConfigError
    from expertkit.route import Expert, ExpertLibrary, LibraryConfig, build_library, train_gates
    from expertkit.tasks.base import get_task

    loaded = ctx.model()
    if params.tasks:
        cfg = LibraryConfig(model=str(ctx.config.model), tasks=params.tasks, train=params.train, gates=params.gates)
        return build_library(loaded, cfg, ctx.run_dir / "route" / "library")
    experts: dict[str, dict[str, Any]] = {}
    for res in ctx.earlier("train_experts"):
        experts.update(res["experts"])
    if not experts:
        raise ConfigError("route: no tasks given and no experts trained earlier in the run; add 'tasks:' to the "
                          "stage or a train_experts stage before it.")
    lib = []
    for name, e in experts.items():
        adapter = ctx.run_dir / e["path"]
        gates = ctx.run_dir / "route" / "gates" / f"{name}.safetensors"
        train_gates(loaded, adapter, e["task"], gates, params.gates)
        lib.append(Expert(name, e["task"], get_task(e["task"]).description, adapter, gates))
    library = ExpertLibrary.from_adapters(lib)
    library.save(ctx.run_dir / "route")
    return library


class RouteStage:
    """Route the base over the run's expert library with GLIDER and the baselines; paired comparisons."""

    def run(self, ctx: RunContext, params: RouteParams) -> dict[str, Any]:
        """Build or assemble the library, evaluate every method on the same examples, compare."""
        from expertkit.route.api import evaluate_methods, global_top1, make_router
        from expertkit.tasks.paired import compare

        library = _library(ctx, params)
        loaded = ctx.model()
        held_in = [e.task for e in library.experts]
        tasks = held_in + [t for t in params.held_out if t not in held_in]
        scores = evaluate_methods(loaded, library, params.methods, tasks, n=params.n, seed=ctx.seed,
                                  batch_size=params.batch_size, base_config=params.route)
        acc = {m: {t: sum(s) / len(s) for t, s in per.items()} for m, per in scores.items()}
        result: dict[str, Any] = {"library": str(library.root.relative_to(ctx.run_dir)) if library.root else None,
                                  "held_in": held_in, "held_out": [t for t in tasks if t not in held_in],
                                  "n": params.n, "accuracy": acc, "paired": {}}
        if "glider" in scores:
            for m in scores:
                if m == "glider":
                    continue
                common = [t for t in scores[m] if t in scores["glider"]]
                a = [x for t in common for x in scores["glider"][t]]
                b = [x for t in common for x in scores[m][t]]
                result["paired"][m] = compare(a, b, seed=ctx.seed).as_dict()
            router = make_router(loaded, library, params.route.model_copy(update={"method": "global"}))
            top1 = global_top1(router, library, held_in, n=params.n, seed=ctx.seed)
            result["global_top1"] = {k: top1[k] for k in ("accuracy", "n", "per_task")}
        return result

    def report(self, result: dict[str, Any]) -> str:
        """Accuracy per method and task, GLIDER against each baseline, retrieval accuracy."""
        tasks = result["held_in"] + result["held_out"]
        lines = ["| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        for m, row in result["accuracy"].items():
            lines.append(f"| {m} | " + " | ".join(f"{row[t]:.2f}" if t in row else "-" for t in tasks) + " |")
        lines += ["", f"Held-in: {', '.join(result['held_in'])}; held-out: {', '.join(result['held_out']) or '-'}; "
                  f"n = {result['n']} test examples per task, the same for every method."]
        if result["paired"]:
            lines += ["", "| GLIDER vs | difference [95% CI] | McNemar p | n |", "|---|---:|---:|---:|"]
            for m, p in result["paired"].items():
                lines.append(f"| {m} | {p['diff']:+.3f} [{p['diff_ci'][0]:+.3f}, {p['diff_ci'][1]:+.3f}] | "
                             f"{p['p_value']:.2g} | {p['n']} |")
        if "global_top1" in result:
            g = result["global_top1"]
            lines += ["", f"Global router top-1 retrieval on held-in queries: {g['accuracy']:.3f} (n = {g['n']})."]
        return "\n".join(lines)


STAGES.add("route", RouteStage(), params=RouteParams,
           summary="GLIDER and routing baselines over a library of the run's LoRA experts, compared on the same examples")
