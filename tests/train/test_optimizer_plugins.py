"""Plugin packages of the optimizer registry: a broken one fails loudly, a missing dependency is named."""

from __future__ import annotations

import pytest

from expertkit.errors import UnknownNameError
from expertkit.train import optimizers


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """Write plugin packages ``{name: source of __init__}`` and make them the registry's plugins."""

    def make(sources: dict[str, str]) -> None:
        for name, source in sources.items():
            (tmp_path / name).mkdir()
            (tmp_path / name / "__init__.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setattr(optimizers, "PLUGIN_PACKAGES", ("expertkit.optim", *sources))

    return make


def test_a_broken_plugin_raises_its_own_error(plugins):
    plugins({"ek_broken_plugin": "from expertkit.train.optimizers import NoSuchThing\n"})
    with pytest.raises(ImportError, match="cannot import name 'NoSuchThing'"):
        optimizers.optimizer_entry("my-new-zo")


def test_a_plugin_of_our_own_that_is_missing_is_not_tolerated(monkeypatch):
    monkeypatch.setattr(optimizers, "PLUGIN_PACKAGES", ("expertkit.no_such_plugin",))
    with pytest.raises(ModuleNotFoundError, match="expertkit.no_such_plugin"):
        optimizers.optimizer_entry("my-new-zo")


def test_a_missing_dependency_is_named_in_the_unknown_name_error(plugins):
    plugins({"ek_needs_dep": "import ek_absent_dependency_xyz\n"})
    with pytest.raises(UnknownNameError) as info:
        optimizers.optimizer_entry("my-new-zo")
    msg = str(info.value)
    assert msg.startswith("unknown optimizer 'my-new-zo'.")
    assert "ek_needs_dep needs the package 'ek_absent_dependency_xyz', which is not installed" in msg
    assert optimizers.optimizer_entry("zo-sgd").name == "zo-sgd"  # the other plugins still load


def test_optimizers_command_names_a_plugin_it_could_not_load(plugins, cli):
    plugins({"ek_needs_dep": "import ek_absent_dependency_xyz\n"})
    code, out, _ = cli(["optimizers"])
    assert code == 0 and "zo-sgd (zeroth-order)" in out
    assert "optimizers of ek_needs_dep are not listed: it needs the package 'ek_absent_dependency_xyz'" in out
