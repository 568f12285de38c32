"""train_private's shared folder: a sweep over ε makes the public-part teacher and layer sharpness once."""

from __future__ import annotations

import json

from expertkit.models import load_model
from expertkit.privacy import recipe as rmod
from expertkit.privacy.recipe import PrivateRecipe, train_private


def _recipe(task: str, eps: float) -> PrivateRecipe:
    return PrivateRecipe(
        task=task, n_public=12, n_private=24, teacher_steps=2, distill_weight=0.1, prefix_layers=1,
        sharpness_examples=2, sharpness_iters=2, eval_n=6, mia_n=4,
        train={"scheme": "prefix", "num_virtual_tokens": 2, "steps": 2, "batch_size": 4, "save_every": 0,
               "optimizer": "dp-adamw", "optimizer_params": {"epsilon": eps, "delta": 1e-3}})


def test_two_epsilons_share_the_teacher_and_the_layer_sharpness(tmp_path, tiny_checkpoint, lohi, monkeypatch):
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    loaded = load_model(str(tiny_checkpoint("llama")))
    calls = []
    real = rmod.prefix_layer_sharpness
    monkeypatch.setattr(rmod, "prefix_layer_sharpness", lambda *a, **k: calls.append(1) or real(*a, **k))
    shared = tmp_path / "shared"
    a = train_private(loaded, _recipe(lohi.name, 3.0), tmp_path / "a", shared=shared)
    b = train_private(loaded, _recipe(lohi.name, 8.0), tmp_path / "b", shared=shared)
    assert len(calls) == 1  # measured once, read back for the second ε
    assert a["layer_sharpness"] == b["layer_sharpness"] and a["prefix_layers"] == b["prefix_layers"]
    assert a["teacher"] == b["teacher"] and a["teacher"].startswith(str(shared))
    assert not (tmp_path / "a" / "teacher").exists()
    for out in ("a", "b"):  # each student was taught by the shared teacher
        params = json.loads((tmp_path / out / "student" / "expertkit.json").read_text())["config"]["optimizer_params"]
        assert params["teacher"] == a["teacher"]
    assert a["epsilon"] < b["epsilon"]  # the students themselves differ
    # the shared measurement is the one a run without the shared folder makes
    alone = train_private(loaded, _recipe(lohi.name, 3.0), tmp_path / "c")
    assert alone["layer_sharpness"] == a["layer_sharpness"] and len(calls) == 2
    # another public split is another key: measured again, not read from the other split's file
    other = _recipe(lohi.name, 3.0).model_copy(update={"n_public": 10})
    train_private(loaded, other, tmp_path / "d", shared=shared)
    assert len(calls) == 3 and len(list(shared.glob("layer-sharpness-*.json"))) == 2


def test_the_shared_key_follows_the_base_contents_not_its_folder(tiny_checkpoint, lohi):
    import torch

    loaded = load_model(str(tiny_checkpoint("llama")))
    rec = _recipe(lohi.name, 3.0)
    before = rmod._public_key(loaded, rec, {"teacher": 1})
    assert rmod._public_key(loaded, rec, {"teacher": 1}) == before  # stable
    with torch.no_grad():  # the same folder, other weights (a base rebuilt in place)
        next(loaded.model.parameters()).add_(1.0)
    assert rmod._public_key(loaded, rec, {"teacher": 1}) != before
