"""The lifecycle run behind ``expertkit run``: stages from a YAML config, and the report."""

from expertkit.pipeline.config import STAGES, load_run_config, parse_run_config
from expertkit.pipeline.run import run_pipeline

__all__ = ["STAGES", "load_run_config", "parse_run_config", "run_pipeline"]
