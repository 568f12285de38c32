"""Registries refuse duplicates and suggest the nearest name."""

from __future__ import annotations

import pytest

from expertkit.errors import ExpertkitError, UnknownNameError
from expertkit.registry import Registry


def test_registry_add_get_and_metadata():
    reg: Registry[int] = Registry("method")
    reg.add("linear", 1, summary="average", paper="p")
    reg.register("ties", summary="trim")(2)
    assert reg.get("linear") == 1 and reg.get("ties") == 2
    assert reg.entry("linear").summary == "average" and reg.entry("linear").paper == "p"
    assert reg.names() == ["linear", "ties"] and len(reg) == 2 and "ties" in reg


def test_registry_refuses_duplicates():
    reg: Registry[int] = Registry("method")
    reg.add("linear", 1)
    with pytest.raises(ExpertkitError, match="registered twice"):
        reg.add("linear", 2)
    assert reg.get("linear") == 1


def test_unknown_name_suggests():
    reg: Registry[int] = Registry("method")
    reg.add("linear", 1)
    reg.add("task_arithmetic", 2)
    with pytest.raises(UnknownNameError) as info:
        reg.get("liner")
    assert "unknown method 'liner'. Did you mean 'linear'?" in str(info.value)
    assert "task_arithmetic" in str(info.value)
