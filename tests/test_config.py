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


def _bomb(levels: int) -> str:
    """A "billion laughs" document: each level repeats the one below nine times."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nname: *a{levels - 1}\n"


def test_alias_bomb_is_refused_before_it_expands(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(9))  # 387,420,489 strings once expanded, from 600 bytes
    with pytest.raises(ConfigError) as info:
        load_config(Outer, path)
    msg = str(info.value)
    assert "more than 100,000 values once aliases are expanded" in msg and len(msg) < 300
    path.write_text(_bomb(3))  # 729 values: aliases in a normal amount still work
    assert len(load_yaml(path)["name"]) == 9


def test_recursive_alias_and_deep_nesting_are_one_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="an alias refers to the node that contains it"):
        load_yaml(path)
    path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")  # PyYAML alone: RecursionError
    with pytest.raises(ConfigError, match="nesting deeper than 64 levels"):
        load_yaml(path)


def test_config_larger_than_the_limit_is_refused_unread(tmp_path):
    from expertkit.config import MAX_CONFIG_BYTES

    path = tmp_path / "big.yaml"
    with path.open("w") as fh:
        fh.write("name: x\nitems:\n")
        while fh.tell() <= MAX_CONFIG_BYTES:
            fh.write("  - {steps: 1}\n" * 1000)
    with pytest.raises(ConfigError, match=r"big.yaml: larger than 1024 KiB \([\d,]+ bytes\)"):
        load_yaml(path)


def test_error_messages_quote_values_briefly_and_list_twenty_problems(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"name: x\ninner: {{steps: {'9' * 200_000}x}}\nitems: [{', '.join(['{stpes: 1}'] * 500)}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(Outer, path)
    msg = str(info.value)
    assert "501 problems" in msg and "... and 481 more" in msg
    assert "inner.steps:" in msg and "... (200,003 characters))" in msg  # the repr, cut to 60
    assert len(msg) < 5000


def test_yaml_merge_keys_follow_the_yaml_spec(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "base: &base {learning_rate: 0.1, steps: 3}\n"
        "more: &more {steps: 9, extra: 1}\n"
        "own:\n  <<: *base\n  steps: 5\n"  # the mapping's own keys override merged ones
        "listed:\n  <<: [*base, *more]\n"  # earlier mappings of the list override later ones
    )
    data = load_yaml(path)
    assert data["own"] == {"learning_rate": 0.1, "steps": 5}
    assert data["listed"] == {"learning_rate": 0.1, "steps": 3, "extra": 1}
    assert validate(Outer, {"name": "m", "inner": data["own"]}).inner.steps == 5
    path.write_text("base: &b {steps: 3}\nown:\n  <<: *b\n  steps: 5\n  steps: 6\n")
    with pytest.raises(ConfigError, match="line 5, column 3: duplicate key 'steps'"):
        load_yaml(path)
    path.write_text("a: {x: 1}\nown:\n  <<: {x: 2}\n  <<: {y: 3}\n")
    with pytest.raises(ConfigError, match="duplicate merge key"):
        load_yaml(path)


def test_refused_keys_are_never_suggested():
    from typing import Any

    from pydantic import Field

    from expertkit.config import REFUSED, allowed_keys

    class Merge(Config):
        models: list[str] = []
        modules: Any = Field(None, json_schema_extra=REFUSED)  # declared only to refuse it

    assert allowed_keys(Merge, ("modles",)) == ["models"]
    with pytest.raises(ConfigError, match="unknown key 'modles'. Did you mean 'models'?"):
        validate(Merge, {"modles": ["a"]})
