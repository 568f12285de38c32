"""Config base: frozen, unknown keys refused with suggestions, all errors at once."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from expertkit.config import Config, load_config, load_yaml, validate
from expertkit.errors import ConfigError


class Inner(Config):
    learning_rate: float = 1e-3
    steps: int = 10


class Outer(Config):
    name: str
    inner: Inner = Inner()
    items: list[Inner] = []


def test_config_is_frozen():
    cfg = Outer(name="a")
    with pytest.raises(ValidationError):
        cfg.name = "b"  # type: ignore[misc]


def test_unknown_keys_suggest_nearest_and_all_errors_reported(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nnmae: y\ninner:\n  lerning_rate: 0.1\nitems:\n  - {stpes: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_config(Outer, path)
    msg = str(info.value)
    assert "3 problems" in msg
    assert "unknown key 'nmae'. Did you mean 'name'?" in msg
    assert "inner.lerning_rate: unknown key 'lerning_rate'. Did you mean 'learning_rate'?" in msg
    assert "items[0].stpes: unknown key 'stpes'. Did you mean 'steps'?" in msg


def test_missing_and_wrong_type():
    with pytest.raises(ConfigError) as info:
        validate(Outer, {"inner": {"steps": "many"}})
    msg = str(info.value)
    assert "name: required field is missing" in msg
    assert "inner.steps:" in msg and "'many'" in msg


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ninner: [1, 2\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+"):
        load_yaml(path)


def test_duplicate_keys_are_refused_with_their_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("name: first\ninner:\n  steps: 1\n  steps: 2\n")  # PyYAML alone keeps steps: 2
    with pytest.raises(ConfigError, match=r"dup.yaml: invalid YAML at line 4, column 3: duplicate key 'steps'"):
        load_yaml(path)
    path.write_text("name: first\ninner:\n  steps: 1\n")
    assert load_yaml(path) == {"name": "first", "inner": {"steps": 1}}


def test_missing_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "nope.yaml")
    assert issubclass(ConfigError, ValueError)
