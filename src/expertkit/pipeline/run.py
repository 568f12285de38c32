"""Run a pipeline: stages in order, each result saved atomically, finished stages reused.

Layout of ``<output_dir>/<name>/``::

    config.yaml               the config as run
    stages/NN-<name>/result.json   one per finished stage (with the hash of its inputs)
    results.json              every stage's result
    report.md                 the human report

A stage whose ``result.json`` exists with the same input hash is reused, so a
run interrupted with Ctrl-C continues where it stopped when run again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import yaml

from expertkit.fileio import write_atomic
from expertkit.pipeline.config import STAGES, ParsedRun, StageSpec, load_run_config
from expertkit.pipeline.context import RunContext
from expertkit.pipeline.executor import ExecutorConfig, ModelCache, make_executor
from expertkit.progress import note



def stage_key(run: ParsedRun, index: int) -> str:
    """Hash of everything a stage's result depends on: the model, the seed and this and earlier stages."""
    parts = {"model": run.config.model, "seed": run.config.seed,
             "stages": [(s.kind, s.name, s.params.model_dump(mode="json")) for s in run.stages[: index + 1]]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _stage_dir(run_dir: Path, index: int, spec: StageSpec) -> Path:
    return run_dir / "stages" / f"{index:02d}-{spec.name}"


def run_pipeline(source: str | Path | ParsedRun, *, output_dir: str | Path | None = None,
                 force: bool = False, executor: ExecutorConfig | None = None) -> Path:
    """Run every stage of a config (path or parsed) and return the run folder.

    Finished stages with unchanged inputs are reused unless ``force``. ``executor`` replaces the
    config's ``executor:`` section (where the independent jobs of a stage run); the executor does
    not enter the stages' input hashes, since every executor gives the same results.
    """
    run = source if isinstance(source, ParsedRun) else load_run_config(source)
    if executor is not None:
        run = run.model_copy(update={"config": run.config.model_copy(update={"executor": executor})})
    run_dir = Path(output_dir or run.config.output_dir) / run.config.name
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(
        {**run.config.model_dump(mode="json"),
         "stages": [{"kind": s.kind, "name": s.name, **s.params.model_dump(mode="json")} for s in run.stages]},
        sort_keys=False))
    ctx = RunContext(config=run.config, run_dir=run_dir)
    ctx.executor = make_executor(run.config.executor, ModelCache(ctx.model_source(), ctx.model), run_dir)
    try:
        _run_stages(run, ctx, force)
    finally:
        ctx.executor.close()
    results = ctx.results
    write_atomic(run_dir / "results.json", json.dumps(
        {"name": run.config.name, "model": run.config.model, "stages": results}, indent=2))
    write_atomic(run_dir / "report.md", render_report(run, results))
    return run_dir


def _run_stages(run: ParsedRun, ctx: RunContext, force: bool) -> None:
    """Run (or reuse) each stage in order, saving each result as it finishes."""
    results: dict[str, Any] = ctx.results
    for i, spec in enumerate(run.stages):
        stage = STAGES.get(spec.kind)
        sdir = _stage_dir(ctx.run_dir, i, spec)
        key = stage_key(run, i)
        result_file = sdir / "result.json"
        if not force and result_file.exists():
            saved = json.loads(result_file.read_text())
            if saved.get("key") == key:
                note(f"[dim]stage {i + 1}/{len(run.stages)} {spec.name}: reused[/dim]")
                results[spec.name] = saved
                continue
        note(f"[bold]stage {i + 1}/{len(run.stages)} {spec.name}[/bold] ({spec.kind})")
        started = time.perf_counter()
        ctx.stage_dir = sdir
        result = stage.run(ctx, spec.params)
        saved = {"key": key, "kind": spec.kind, "seconds": round(time.perf_counter() - started, 2),
                 "result": result}
        write_atomic(result_file, json.dumps(saved, indent=2))
        results[spec.name] = saved


def render_report(run: ParsedRun, results: dict[str, Any]) -> str:
    """The human report: one section per stage."""
    lines = [f"# expertkit run: {run.config.name}", "",
             f"Base model: `{run.config.model}`; seed {run.config.seed}.", ""]
    for spec in run.stages:
        saved = results[spec.name]
        entry = STAGES.entry(spec.kind)
        lines += [f"## {spec.name} ({spec.kind}: {entry.summary})", "",
                  entry.obj.report(saved["result"]), "", f"_{saved['seconds']} s_", ""]
    return "\n".join(lines)
