"""``expertkit zoo``: Model-GLUE zoo planning (``zoo plan``) and building (``zoo build``).

Wired into the main app by :func:`register`. Each command parses its arguments and calls one
library function of :mod:`expertkit.merge.zoo`; heavy imports stay inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

zoo_app = typer.Typer(
    help="Model-GLUE zoo planning: cluster mergeable models, merge each cluster, mix the clusters.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console(soft_wrap=True)


def _threshold(text: str) -> float | str:
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        from expertkit.errors import ConfigError

        raise ConfigError(f"--threshold must be 'auto' or a number, got {text!r}.") from None


@zoo_app.command("plan")
def plan_cmd(  # noqa: PLR0913 - one option per planner setting
    paths: Annotated[list[Path], typer.Argument(help="model folders, LoRA adapters, or folders holding them")],
    task: Annotated[list[str], typer.Option("--task", "-t", help="evaluation task (repeat for several)")],
    out_plan: Annotated[Path, typer.Option("--out", "-o", help="where to write the plan YAML")] = Path("zoo-plan.yaml"),
    base: Annotated[str | None, typer.Option(help="base model of the adapters (default: from each adapter)")] = None,
    metric: Annotated[str, typer.Option(help="cosine, task_cosine or relative_l2")] = "cosine",
    group: Annotated[str, typer.Option(help="tensor group the clustering uses: all, attention, mlp, ...")] = "all",
    threshold: Annotated[str, typer.Option(help="clustering distance cut, or 'auto' (largest gap)")] = "auto",
    n: Annotated[int, typer.Option("--n", "-n", min=1, help="validation examples per task")] = 50,
    budget: Annotated[int, typer.Option(min=1, help="evaluations per cluster")] = 12,
    mixture: Annotated[str, typer.Option(help="ffn, model or none")] = "ffn",
    seed: Annotated[int, typer.Option(help="seed of examples and random merges")] = 0,
    search: Annotated[str, typer.Option(help="coefficient search: grid or cmaes (per-member weights)")] = "grid",
    executor: Annotated[str | None, typer.Option(
        help="run the candidate evaluations as jobs: local (this process) or ray (default: in this process, "
             "without jobs)")] = None,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster address (host:port, or 'auto') for --executor ray; without it a local Ray is "
             "started")] = None,
    work_dir: Annotated[Path | None, typer.Option(
        help="with --executor: folder of the candidates' tensor files and the job logs (default: PLAN-jobs "
             "beside the plan; on a cluster, a path every node reaches)")] = None,
) -> None:
    """Cluster the zoo, choose a merge strategy per cluster on the validation split, plan a mixture.

    With --executor the candidates of each cluster that do not depend on each other (the members
    alone, the grid, a CMA-ES generation) run as one batch of jobs (Ray tasks with ray); the plan
    is the same as without (docs/pipeline.md).
    """
    from expertkit.merge.zoo import plan_zoo, save_plan

    if mixture not in ("ffn", "model", "none"):
        from expertkit.errors import unknown

        raise unknown("mixture kind", mixture, ["ffn", "model", "none"])
    if search not in ("grid", "cmaes"):
        from expertkit.errors import unknown

        raise unknown("coefficient search", search, ["grid", "cmaes"])
    if executor is not None and executor not in ("local", "ray"):
        from expertkit.errors import unknown

        raise unknown("executor", executor, ["local", "ray"])
    if address is not None and executor != "ray":
        from expertkit.errors import ConfigError

        raise ConfigError("--address names a Ray cluster: pass it with --executor ray.")
    jobs = factory = None
    if executor is not None:
        from expertkit.models.bundled import cache_root
        from expertkit.pipeline.executor import ExecutorConfig, ModelCache, make_executor
        from expertkit.pipeline.zoo_jobs import job_evaluator_factory

        work = (work_dir or out_plan.with_name(f"{out_plan.stem}-jobs")).absolute()
        work.mkdir(parents=True, exist_ok=True)
        jobs = make_executor(ExecutorConfig(kind=executor, address=address), ModelCache(), work)
        factory = job_evaluator_factory(jobs, work, split="validation", n=n, seed=seed, cache_dir=cache_root() / "eval")
    try:
        plan = plan_zoo(paths, task, base=base, metric=metric, group=group, threshold=_threshold(threshold), n=n,
                        budget=budget, mixture=mixture, seed=seed, search=search, evaluator_factory=factory)
    finally:
        if jobs is not None:
            jobs.close()
    save_plan(plan, out_plan)
    for c in plan.clusters:
        score = "" if c.score is None else f", validation {c.score:.3f}"
        merged = [f"{m}*{c.weights[m]:.3g}" if c.weights and m in c.weights else m for m in c.merged]
        out.print(f"{c.name}: {', '.join(c.members)} -> {c.method} of {', '.join(merged)}{score}",
                  markup=False, highlight=False)
    for line in plan.incompatible:
        out.print(f"note: {line}", markup=False, highlight=False)
    out.print(f"mixture: {plan.mixture.kind}. Plan written to {out_plan}; edit it, then run "
              f"`expertkit zoo build {out_plan} OUT`.", markup=False, highlight=False)


@zoo_app.command("build")
def build_cmd(
    plan_file: Annotated[Path, typer.Argument(help="a plan written by `expertkit zoo plan`")],
    out_dir: Annotated[Path, typer.Argument(help="output folder (cluster models and the mixture)")],
    overwrite: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
) -> None:
    """Merge every cluster into its representative and build the mixture of the plan."""
    from expertkit.merge.zoo import build_plan, load_plan

    path = build_plan(load_plan(plan_file), out_dir, overwrite=overwrite)
    out.print(f"built {path} (see build.json)", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``expertkit zoo`` to the main app."""
    app.add_typer(zoo_app, name="zoo")
