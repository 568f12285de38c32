"""docs/merge.md's method table is generated from the registry, and every default a method shares
with mergekit 0.1.5 is mergekit's (the one rule of issue 20: a mergekit config without a parameter
means the same in both tools)."""

from __future__ import annotations

from pathlib import Path

import pytest

from expertkit.merge import METHODS
from expertkit.merge.doc_table import BEGIN, END, REQUIRED, _params_cell, expertkit_params, methods_table

ROOT = Path(__file__).resolve().parents[2]


def _doc_block() -> str:
    text = (ROOT / "docs" / "merge.md").read_text()
    assert BEGIN in text and END in text, "regenerate the table: python -m expertkit.merge.doc_table"
    return text[text.index(BEGIN):text.index(END) + len(END)]


def test_every_registered_method_has_its_row_with_its_defaults():
    rows = {line.split(" | ")[0].strip("| `"): line.split(" | ") for line in _doc_block().splitlines()
            if line.startswith("| `")}
    for name in METHODS.names():
        assert name in rows, f"{name} is missing from docs/merge.md's table"
        cells = rows[name]
        assert cells[1] == _params_cell(expertkit_params(name)), name
        assert cells[3].rstrip(" |") == METHODS.entry(name).extra["vs_mergekit"], name


def _mergekit_params():
    pytest.importorskip("mergekit", reason="mergekit (a peer) is not installed")
    from expertkit.merge.doc_table import mergekit_params

    return mergekit_params()


@pytest.mark.peers
def test_the_table_is_up_to_date_with_mergekit():
    assert _doc_block() == methods_table(_mergekit_params()), "regenerate: python -m expertkit.merge.doc_table"


#: the same default written differently: mergekit's passthrough ``scale: None`` means no scaling
SAME = {("passthrough", "scale"): (None, 1.0)}


@pytest.mark.peers
def test_every_shared_parameter_has_mergekits_default():
    theirs_all = _mergekit_params()
    shared = [n for n in METHODS.names() if n in theirs_all]
    assert len(shared) >= 9
    differ = []
    for name in shared:
        ours, theirs = expertkit_params(name), theirs_all[name]
        for key in set(ours) & set(theirs):
            mine, their = ours[key][0], theirs[key][0]
            if their is REQUIRED or mine == their or SAME.get((name, key)) == (their, mine):
                continue
            differ.append(f"{name}.{key}: expertkit {mine!r}, mergekit {their!r}")
    assert differ == []


#: per-model parameters mergekit 0.1.5 declares but never uses: task_arithmetic has no sparsification,
#: so its ``density`` changes nothing there (expertkit refuses it when the config is read)
IGNORED_BY_MERGEKIT = {("task_arithmetic", "density")}


@pytest.mark.peers
def test_every_parameter_mergekit_takes_per_model_expertkit_takes_per_model():
    theirs_all = _mergekit_params()
    missing, extra = [], []
    for name in [n for n in METHODS.names() if n in theirs_all]:
        ours = {k for k, (_, per) in expertkit_params(name).items() if per}
        theirs = {k for k, (_, per) in theirs_all[name].items() if per}
        missing += [f"{name}.{k}" for k in sorted(theirs - ours) if (name, k) not in IGNORED_BY_MERGEKIT]
        extra += [f"{name}.{k}" for k in sorted(ours - theirs)]
    assert missing == [] and extra == []
