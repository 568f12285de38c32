"""The code store: allocations that share a calibration share their solved matrices, bit for bit."""

from __future__ import annotations

import pytest
import torch

from expertkit.errors import ConfigError
from expertkit.models import load_model
from expertkit.models.tiny import save_tiny
from expertkit.quant.codestore import CodeStore
from expertkit.quant.config import QuantizeConfig
from expertkit.quant.run import quantize_model

CALIB = {"text_blocks": 0, "tasks": ["add_sub", "gcd"], "prompts_per_task": 4, "batch_size": 4}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A tiny Mixtral and its Hessians from one pass over the unquantized model."""
    from expertkit.quant.calibrate import calibrate
    from expertkit.quant.data import calibration_batches
    from expertkit.quant.targets import find_targets

    folder = save_tiny("mixtral", tmp_path_factory.mktemp("cs") / "m", seed=3)
    loaded = load_model(str(folder))
    batches = calibration_batches(loaded.tokenizer, text_blocks=0, tasks=CALIB["tasks"], prompts_per_task=4,
                                  batch_size=4)
    return folder, calibrate(loaded.model, batches, find_targets(loaded.model), min_tokens_per_expert=64), batches


def _run(folder, hessians, batches, policy, store=None, **over):
    cfg = QuantizeConfig.model_validate({"model": str(folder), "group_size": 32, "calibration": CALIB,
                                         "policy": policy, **over})
    return quantize_model(cfg, load_model(str(folder)), calibration=hessians, batches=batches, store=store)


def _files(store):
    return sorted(p.relative_to(store.folder) for p in store.folder.rglob("*.safetensors"))


def test_stored_matrices_give_the_same_model_and_records_and_only_new_bits_are_solved(shared, tmp_path, monkeypatch):
    folder, hessians, batches = shared
    store = CodeStore(tmp_path / "codes", {"model": "tiny-3"})
    mixed = {"kind": "block", "favour": ["attention"], "target_bits": 3.0, "choices": [2, 3, 4]}
    plain = _run(folder, hessians, batches, mixed)
    first = _run(folder, hessians, batches, mixed, store)
    n_targets = len(first.records)
    assert len(_files(store)) == n_targets  # one file per matrix at its bits
    uniform = _run(folder, hessians, batches, {"kind": "uniform", "bits": 3}, store)
    solved_3 = sum(1 for b in first.allocation.bits.values() if b == 3)
    assert len(_files(store)) == n_targets + (n_targets - solved_3)  # the 3-bit matrices were not solved again

    u_plain = _run(folder, hessians, batches, {"kind": "uniform", "bits": 3})
    a, b = u_plain.loaded.model.state_dict(), uniform.loaded.model.state_dict()  # partly read from the store
    assert all(torch.equal(a[k], b[k]) for k in a)

    import expertkit.quant.apply as apply

    def no_solving(*a, **k):  # every matrix is in the store now: nothing may be solved
        raise AssertionError(f"solved a matrix the store holds: {a[0].name} {a[2]}")

    monkeypatch.setattr(apply, "_solve", no_solving)
    again = _run(folder, hessians, batches, mixed, store)
    for res in (first, again):
        a, b = plain.loaded.model.state_dict(), res.loaded.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        for name, rec in plain.records.items():
            got = res.records[name]
            assert (got.method, got.error, got.rtn_error) == (rec.method, rec.error, rec.rtn_error)
            assert torch.equal(got.scale, rec.scale) and torch.equal(got.zero, rec.zero)


def test_other_settings_are_kept_apart(shared, tmp_path):
    folder, hessians, batches = shared
    store = CodeStore(tmp_path / "codes", {"model": "tiny-3"})
    uniform = {"kind": "uniform", "bits": 3}
    _run(folder, hessians, batches, uniform, store)
    n = len(_files(store))
    clipped = _run(folder, hessians, batches, uniform, store, clip_grid=5)
    assert len(_files(store)) == 2 * n  # the clipped grid is another key, never the unclipped codes
    plain = _run(folder, hessians, batches, uniform, clip_grid=5)
    a, b = plain.loaded.model.state_dict(), clipped.loaded.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_store_of_another_model_or_a_store_without_shared_hessians_is_refused(shared, tmp_path):
    folder, _hessians, _batches = shared
    CodeStore(tmp_path / "codes", {"model": "tiny-3", "calib": 1})
    with pytest.raises(ConfigError, match="another model or calibration.*calib"):
        CodeStore(tmp_path / "codes", {"model": "tiny-3", "calib": 2})
    store = CodeStore(tmp_path / "codes", {"model": "tiny-3", "calib": 1})
    cfg = QuantizeConfig.model_validate({"model": str(folder), "group_size": 32, "calibration": CALIB,
                                         "policy": {"kind": "uniform", "bits": 3}})
    with pytest.raises(ConfigError, match="calibration=.*depend on the allocation"):
        quantize_model(cfg, store=store)
