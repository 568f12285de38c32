"""The run config behind ``expertkit run``: a name, a model and a list of stages.

Stages are registered by kind in :data:`STAGES` (see :mod:`expertkit.pipeline.stages`);
each declares its own parameter model, so adding a stage edits no other file.
:func:`parse_run_config` validates the whole file and reports every error at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from expertkit.config import Config, config_error, error_lines, load_yaml
from expertkit.errors import ConfigError, suggest
from expertkit.pipeline.executor import ExecutorConfig
from expertkit.registry import Registry

STAGES: Registry[Any] = Registry("stage")


class RunConfig(Config):
    """Top level of a run config."""

    name: str = Field(description="run name: outputs go to <output_dir>/<name>/", pattern=r"^[\w.-]+$")
    model: str = Field("smollm2-135m", description="base model: bundled name, local folder or hub id")
    output_dir: str = Field("runs", description="folder that holds the runs")
    seed: int = Field(0, description="seed for everything random in the run")
    stages: list[dict[str, Any]] = Field(description="stages, run in order")
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig,
                                     description="where the independent jobs of a stage run (local or ray)")


class StageSpec(BaseModel):
    """One validated stage: its kind, its unique name and its parameters."""

    kind: str
    name: str
    params: Any


class ParsedRun(BaseModel):
    """A validated run config with typed stages."""

    config: RunConfig
    stages: list[StageSpec]


def parse_run_config(data: Any, *, source: str = "config") -> ParsedRun:
    """Validate a run config (dict), collecting every error of the file in one ConfigError."""
    import expertkit.pipeline.stages  # noqa: F401 - registers the built-in stages

    lines: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}.")
    config = None
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        lines += error_lines(exc, RunConfig)
    specs: list[StageSpec] = []
    raw_stages = data.get("stages") if isinstance(data.get("stages"), list) else []
    seen: set[str] = set()
    for i, raw in enumerate(raw_stages):
        where = f"stages[{i}]"
        if not isinstance(raw, dict):
            lines.append(f"{where}: expected a mapping with a 'kind' key.")
            continue
        kind = raw.get("kind")
        if kind is None:
            lines.append(f"{where}: required field 'kind' is missing (one of: {', '.join(STAGES.names())}).")
            continue
        if kind not in STAGES:
            lines.append(f"{where}.kind: unknown stage '{kind}'.{suggest(str(kind), STAGES.names())} "
                         f"Known stages: {', '.join(STAGES.names())}.")
            continue
        name = str(raw.get("name", kind))
        if name in seen:
            lines.append(f"{where}.name: stage name '{name}' is used twice; give each stage a unique 'name'.")
        seen.add(name)
        params_model = STAGES.entry(kind).params
        body = {k: v for k, v in raw.items() if k not in ("kind", "name")}
        try:
            params = params_model.model_validate(body)
        except ValidationError as exc:
            lines += error_lines(exc, params_model, prefix=("stages", i))
            continue
        specs.append(StageSpec(kind=kind, name=name, params=params))
    if config is not None:
        lines += _check_model(config.model)
    if config is not None and not raw_stages:
        lines.append("stages: the run has no stages; add at least one.")
    if lines:
        raise config_error(source, lines)
    assert config is not None  # every failure above added a line
    return ParsedRun(config=config, stages=specs)


def _check_model(model: str) -> list[str]:
    """A model that is neither bundled, nor an existing folder, nor shaped like a hub id is an error."""
    from expertkit.models.bundled import BUNDLED
    from expertkit.models.loader import HUB_ID

    if model in BUNDLED or Path(model).expanduser().exists():
        return []
    if "/" in model and HUB_ID.match(model) and not model.startswith("."):
        return []  # a hub id: checked when loaded, where a hub is reachable
    if "/" in model or model.startswith("."):
        return [f"model: folder not found: {model}."]
    return [f"model: unknown model '{model}'.{suggest(model, BUNDLED)} "
            f"Use a bundled name ({', '.join(BUNDLED)}), a local folder or a hub id like org/name."]


def load_run_config(path: str | Path) -> ParsedRun:
    """Read and validate a run config YAML file without loading any weights."""
    return parse_run_config(load_yaml(path), source=str(path))
