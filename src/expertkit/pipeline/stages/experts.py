"""Stages of the expert zoo: train LoRA experts, evaluate base and experts on every task.

* ``train_experts``: one LoRA expert per task on the run's base model; adapters go to
  ``<run>/experts/<task>/`` (standard PEFT folders). Interrupted training resumes.
* ``evaluate``: the base model and every expert trained earlier in the run, on every task;
  accuracy with a 95% Wilson interval, a models x tasks heatmap (``heatmap.png``), and for each
  expert whether it beats the base on its own task beyond the intervals. Models written by
  earlier ``merge`` stages are evaluated beside them (rows ``merge:<label>``), with their mean
  accuracy next to the base's and the experts' own-task mean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from expertkit.config import Config
from expertkit.pipeline.config import STAGES
from expertkit.pipeline.context import RunContext
from expertkit.train.config import LoraTrainConfig


def _known_tasks(names: list[str]) -> list[str]:
    """Check task names at validation time (no weights are loaded)."""
    from expertkit.errors import UnknownNameError
    from expertkit.tasks.base import get_task

    for name in names:
        try:
            get_task(name)
        except UnknownNameError as exc:  # pydantic reports ValueErrors beside the file's other errors
            raise ValueError(str(exc)) from None
    if len(set(names)) != len(names):
        raise ValueError("a task is listed twice")
    return names


class TrainExpertsParams(Config):
    """Parameters of the ``train_experts`` stage."""

    tasks: list[str] = Field(min_length=1, description="one LoRA expert is trained per task")
    train: LoraTrainConfig = Field(default_factory=LoraTrainConfig, description="LoRA training settings")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        return _known_tasks(v)


class TrainExpertsStage:
    """Train one LoRA expert per task."""

    def run(self, ctx: RunContext, params: TrainExpertsParams) -> dict[str, Any]:
        """Train (or resume, or reuse) each expert: one job per task on the run's executor."""
        from expertkit.pipeline.executor import Job
        from expertkit.pipeline.jobs import train_expert
        from expertkit.tasks.base import get_task

        config = params.train.model_copy(update={"seed": ctx.seed})
        outs = {task: ctx.run_dir / "experts" / task for task in params.tasks}
        jobs = [Job(f"expert:{task}", train_expert, ctx.model_source(),
                    {"task": get_task(task), "out_dir": str(out.absolute()), "config": config})
                for task, out in outs.items()]
        done = ctx.run_jobs("train_experts", jobs)
        experts = {}
        for task, out in outs.items():
            res = done[f"expert:{task}"]
            experts[task] = {"path": str(out.relative_to(ctx.run_dir)), "task": task,
                             "steps": params.train.steps, "final_loss": res["final_loss"],
                             "train_loss": res["train_loss"], "seconds": res["seconds"]}
        return {"experts": experts}

    def report(self, result: dict[str, Any]) -> str:
        """A table of experts."""
        rows = ["| expert | task | steps | final loss | seconds |", "|---|---|---:|---:|---:|"]
        for name, e in result["experts"].items():
            rows.append(f"| {name} | {e['task']} | {e['steps']} | {e['final_loss']:.3f} | {e['seconds']} |")
        return "\n".join(rows)


class EvaluateParams(Config):
    """Parameters of the ``evaluate`` stage."""

    tasks: list[str] | None = Field(None, description="tasks to evaluate on; default: the experts' tasks")
    n: int = Field(100, ge=1, description="examples per task")
    split: str = Field("test", pattern="^(validation|test)$", description="validation or test")
    batch_size: int = Field(16, ge=1, description="examples per forward pass")
    include_base: bool = Field(True, description="also evaluate the base model")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else _known_tasks(v)


def beats(expert: dict[str, Any], base: dict[str, Any]) -> bool:
    """True when the expert's 95% interval lies entirely above the base's."""
    return expert["ci"][0] > base["ci"][1]


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def merge_summary(matrix: dict[str, dict[str, Any]], own: dict[str, Any], merged: list[str]) -> dict[str, Any]:
    """Per merged model: its mean accuracy over the tasks, the base's, and the experts' on their own tasks."""
    def mean(row: dict[str, Any]) -> float:
        return sum(c["accuracy"] for c in row.values()) / len(row)

    base = mean(matrix["base"]) if "base" in matrix else None
    experts = sum(o["expert"] for o in own.values()) / len(own) if own else None
    return {label: {"mean": mean(matrix[label]), "base_mean": base, "experts_own_mean": experts} for label in merged}


class EvaluateStage:
    """Evaluate the base and the run's experts on every task."""

    def run(self, ctx: RunContext, params: EvaluateParams) -> dict[str, Any]:
        """Fill the models x tasks accuracy matrix: one job per cell on the run's executor."""
        from expertkit.models.bundled import cache_root
        from expertkit.pipeline.executor import Job
        from expertkit.pipeline.jobs import evaluate_cell
        from expertkit.pipeline.plots import heatmap
        from expertkit.tasks.base import get_task

        experts: dict[str, dict[str, Any]] = {}
        for res in ctx.earlier("train_experts"):
            experts.update(res["experts"])
        tasks = params.tasks or [e["task"] for e in experts.values()]
        if not tasks:
            from expertkit.errors import ConfigError

            raise ConfigError("evaluate: no tasks given and no experts trained earlier in the run; "
                              "add 'tasks:' to the stage or a train_experts stage before it.")
        models: dict[str, Path | None] = {"base": None} if params.include_base else {}
        models.update({f"expert:{name}": ctx.run_dir / e["path"] for name, e in experts.items()})
        merged = {f"merge:{m['label']}": ctx.run_dir / m["path"] for m in ctx.earlier("merge")}
        base_source = ctx.model_source()
        sources = {label: (base_source, adapter) for label, adapter in models.items()}
        sources.update({label: (str(folder.absolute()), None) for label, folder in merged.items()})
        cache = str((cache_root() / "eval").absolute())
        jobs = [Job(f"{label}|{task}", evaluate_cell, source,
                    {"task": get_task(task), "adapter": None if adapter is None else str(adapter.absolute()),
                     "split": params.split, "n": params.n, "seed": ctx.seed, "batch_size": params.batch_size,
                     "cache_dir": cache})
                for label, (source, adapter) in sources.items() for task in tasks]
        done = ctx.run_jobs("evaluate", jobs)
        matrix: dict[str, dict[str, Any]] = {label: {task: done[f"{label}|{task}"] for task in tasks}
                                              for label in sources}
        own = {}
        if "base" in matrix:
            for name, e in experts.items():
                if e["task"] in tasks:
                    mine, base = matrix[f"expert:{name}"][e["task"]], matrix["base"][e["task"]]
                    own[name] = {"task": e["task"], "expert": mine["accuracy"], "base": base["accuracy"],
                                 "beats_base_beyond_ci": beats(mine, base)}
        rows = list(matrix)
        highlight = [(rows.index(f"expert:{n}"), tasks.index(o["task"])) for n, o in own.items()]
        heatmap([[matrix[m][t]["accuracy"] for t in tasks] for m in rows], rows, tasks,
                ctx.run_dir / "heatmap.png", title=f"accuracy on {params.split} (n={params.n} per task)",
                highlight=highlight)
        result = {"tasks": tasks, "split": params.split, "n": params.n, "matrix": matrix, "own_task": own,
                  "heatmap": "heatmap.png"}
        if merged:
            result["merges"] = merge_summary(matrix, own, list(merged))
        return result

    def report(self, result: dict[str, Any]) -> str:
        """The accuracy matrix with intervals, the heatmap, and the own-task verdicts."""
        tasks = result["tasks"]
        lines = [f"![models x tasks accuracy]({result['heatmap']})", "",
                 "| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        for model, row in result["matrix"].items():
            cells = []
            for t in tasks:
                c = row[t]
                cells.append(f"{c['accuracy']:.2f} [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines += ["", f"Accuracy on the {result['split']} split, n = {result['n']} per task, "
                  "with 95% Wilson intervals in brackets."]
        if result["own_task"]:
            lines += ["", "| expert | own task | base | expert | beats base beyond the 95% intervals |",
                      "|---|---|---:|---:|---|"]
            for name, o in result["own_task"].items():
                verdict = "yes" if o["beats_base_beyond_ci"] else "**no**"
                lines.append(f"| {name} | {o['task']} | {o['base']:.2f} | {o['expert']:.2f} | {verdict} |")
        if result.get("merges"):
            lines += ["", "Merged models beside the experts (mean accuracy over the tasks above):", "",
                      "| model | mean accuracy | base | each expert on its own task (mean) |", "|---|---:|---:|---:|"]
            for label, m in result["merges"].items():
                lines.append(f"| {label} | {m['mean']:.3f} | {_fmt(m['base_mean'])} | {_fmt(m['experts_own_mean'])} |")
        return "\n".join(lines)


STAGES.add("train_experts", TrainExpertsStage(), params=TrainExpertsParams,
           summary="train one LoRA expert per task on the base model")
STAGES.add("evaluate", EvaluateStage(), params=EvaluateParams,
           summary="accuracy of the base and every expert on every task, with a heatmap")
