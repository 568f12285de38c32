"""The MoE build on a tiny Llama: structure, exactness of the shared parts, seeding, reuse, resume, targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from expertkit.config import validate
from expertkit.errors import ConfigError
from expertkit.moe import MoeBuildConfig, build_moe, moe_structure
from expertkit.weights import Checkpoint

CLUSTERS = [{"name": "arith", "tasks": ["add_sub"]}, {"name": "logic", "tasks": ["leap_year", "syllogism"]},
            {"name": "nums", "tasks": ["gcd"]}]


def _recipe(base: Path, **over) -> MoeBuildConfig:
    data = {"base": str(base), "clusters": CLUSTERS, "expert_steps": 4, "batch_size": 3, "text_tokens": 16,
            "expert_lr": 1e-3, "router": {"steps": 2, "init_prompts": 3, "batch_size": 3}, "save_every": 2}
    data.update(over)
    return validate(MoeBuildConfig, data)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def built(tiny_checkpoint, tmp_path_factory):
    """One default build (shared by the tests that only read it)."""
    import os

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("EXPERTKIT_CACHE")
    os.environ["EXPERTKIT_CACHE"] = str(cache)
    try:
        base = tiny_checkpoint("llama")
        result = build_moe(_recipe(base), tmp_path_factory.mktemp("out") / "moe")
    finally:
        if old is None:
            os.environ.pop("EXPERTKIT_CACHE")
        else:
            os.environ["EXPERTKIT_CACHE"] = old
    return base, result


def test_output_is_a_mixtral_with_the_base_trunk_and_the_trained_experts(built):
    base, result = built
    model = AutoModelForCausalLM.from_pretrained(result.path)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 2
    layers = moe_structure(result.path)
    assert [(m.layer, m.experts) for m in layers] == [("0", (0, 1, 2)), ("1", (0, 1, 2))]
    with Checkpoint(base) as b, Checkpoint(result.path) as moe:
        for name in b.names():  # attention, norms, embeddings: the base's, bit for bit
            if ".mlp." not in name:
                assert torch.equal(b.read(name), moe.read(name)), name
        for e, folder in enumerate(result.dense_experts.values()):  # expert e = dense expert e's MLP
            with Checkpoint(folder) as dense:
                for layer in (0, 1):
                    for src, dst in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                        mine = dense.read(f"model.layers.{layer}.mlp.{src}.weight")
                        assert torch.equal(mine, moe.read(f"model.layers.{layer}.block_sparse_moe.experts.{e}.{dst}.weight"))
                        assert not torch.equal(mine, b.read(f"model.layers.{layer}.mlp.{src}.weight"))  # trained
    meta = json.loads((result.path / "moe_build.json").read_text())
    assert meta["fingerprint"] == result.fingerprint and len(meta["experts"]) == 3
    assert all(len(r["losses"]) == 4 for r in meta["experts"])
    assert len(meta["router_training"]["lm_losses"]) == 2
    # full-rank training: differences are far from rank one
    assert meta["difference_ranks"]["pairwise"]["energy90_rank_min"] > 4


def test_routers_were_initialised_and_trained(built, tmp_path):
    from expertkit.moe.build import _init_routers

    base, result = built
    # the known starting point: the centroid rows computed again from the same dense experts
    init = _init_routers(_recipe(base), list(result.meta["dense_experts"].values()))
    with Checkpoint(result.path) as moe:
        for layer in (0, 1):
            router = moe.read(f"model.layers.{layer}.block_sparse_moe.gate.weight")  # (E, H)
            start = torch.as_tensor(init[layer], dtype=router.dtype)
            assert router.shape == start.shape == (3, 64)
            # two AdamW steps at lr 1e-3 move every row, by about lr per coordinate, no more
            moved = (router - start).abs()
            assert float(moved.amax(1).min()) > 1e-4 and float(moved.max()) < 0.05


def test_same_recipe_is_reused_and_seeded_builds_are_identical(built, tiny_checkpoint, cache, monkeypatch):
    base, first = built
    again = build_moe(_recipe(base))  # another cache: built anew from the same seed
    assert again.fingerprint == first.fingerprint
    with Checkpoint(first.path) as a, Checkpoint(again.path) as b:
        assert a.names() == b.names()
        for name in a.names():
            assert torch.equal(a.read(name), b.read(name)), name

    def no_training(*a, **k):
        raise AssertionError("a finished recipe must not be trained again")

    monkeypatch.setattr("expertkit.moe.experts.train_expert", no_training)
    monkeypatch.setattr("expertkit.moe.router_train.train_routers", no_training)
    assert build_moe(_recipe(base)).reused


def test_a_base_changed_only_in_unsampled_tensors_does_not_reuse_the_build(built, tmp_path):
    """The cache keys on every byte of the base: the sampled fingerprint alone would hand the
    original base's experts to a base edited in tensors it does not read."""
    import shutil

    from safetensors.torch import load_file, save_file

    from expertkit.moe.build import build_key
    from expertkit.weights.fingerprint import fingerprint, sampled_names

    base, first = built
    assert build_key(_recipe(base)) == first.fingerprint  # the key the build used
    edited = tmp_path / "edited"
    shutil.copytree(base, edited)
    (weights,) = edited.glob("*.safetensors")
    tensors = load_file(weights)
    name = next(n for n in sorted(tensors) if n not in sampled_names({k: tuple(v.shape) for k, v in tensors.items()}))
    tensors[name] = tensors[name] * 2
    save_file(tensors, weights, metadata={"format": "pt"})
    assert fingerprint(edited) == fingerprint(base)  # the sampled fingerprint cannot tell them apart
    assert build_key(_recipe(edited)) != first.fingerprint


def test_changing_only_the_routers_reuses_the_experts(tiny_checkpoint, cache, monkeypatch):
    base = tiny_checkpoint("llama")
    build_moe(_recipe(base))
    calls = []
    from expertkit.moe import experts

    real = experts.train_expert

    def counted(*a, **k):
        calls.append(a[4])
        return real(*a, **k)

    monkeypatch.setattr(experts, "train_expert", counted)
    other = build_moe(_recipe(base, router={"steps": 1, "init_prompts": 3, "batch_size": 3}))
    assert not other.reused and calls == [0, 1, 2]  # called, but every expert came from its cache file
    assert all(len(r["losses"]) == 4 for r in other.meta["experts"])


def test_an_interrupted_build_resumes_to_the_same_weights(built, tiny_checkpoint, cache, monkeypatch):
    base, uninterrupted = built
    from expertkit.moe import experts

    real = experts.per_example_loss
    seen = {"n": 0}

    def flaky(*a, **k):
        seen["n"] += 1
        if seen["n"] == 7:  # expert 1, step 3: after its step-2 checkpoint
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(experts, "per_example_loss", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_moe(_recipe(base))
    states = list((cache / "moe-build" / "experts").glob("logic-*/.mlp.state.safetensors"))
    assert len(states) == 1  # the checkpoint of the interrupted expert
    monkeypatch.setattr(experts, "per_example_loss", real)
    resumed = build_moe(_recipe(base))
    with Checkpoint(uninterrupted.path) as a, Checkpoint(resumed.path) as b:
        for name in a.names():
            assert torch.equal(a.read(name), b.read(name)), name


def test_qwen2_moe_target_has_the_base_mlp_as_shared_expert(tiny_checkpoint, cache):
    base = tiny_checkpoint("llama")
    result = build_moe(_recipe(base, target="qwen2_moe", router={"steps": 0, "init_prompts": 3}))
    model = AutoModelForCausalLM.from_pretrained(result.path)
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.qkv_bias is False
    with Checkpoint(base) as b, Checkpoint(result.path) as moe:
        shared = moe.read("model.layers.1.mlp.shared_expert.up_proj.weight")
        assert torch.equal(shared, b.read("model.layers.1.mlp.up_proj.weight"))
        assert float(moe.read("model.layers.1.mlp.shared_expert_gate.weight").abs().sum()) == 0.0  # sigmoid(0) = 0.5
        dense = Checkpoint(result.dense_experts["nums"])
        try:  # routed down projections halved: 0.5 * shared + 0.5 * routed mixture at the start
            torch.testing.assert_close(moe.read("model.layers.1.mlp.experts.2.down_proj.weight"),
                                       0.5 * dense.read("model.layers.1.mlp.down_proj.weight"), rtol=0, atol=0)
        finally:
            dense.close()


@pytest.mark.parametrize(("change", "message"), [
    ({"top_k": 4}, "top_k \\(4\\) exceeds the number of experts \\(3\\)"),
    ({"clusters": [{"name": "a", "tasks": ["gcd"]}, {"name": "a", "tasks": ["add_sub"]}]}, "repeated: a"),
    ({"expert_stpes": 3}, "expert_steps"),
])
def test_bad_recipes_are_refused_with_the_reason(tiny_checkpoint, change, message):
    with pytest.raises(ConfigError, match=message):
        _recipe(tiny_checkpoint("llama"), **change)


def test_eval_only_task_is_refused_before_training(tiny_checkpoint, cache):
    recipe = _recipe(tiny_checkpoint("llama"), clusters=[{"name": "a", "tasks": ["gsm8k"]}, {"name": "b", "tasks": ["gcd"]}])
    with pytest.raises(ConfigError, match="'gsm8k' is evaluation only"):
        build_moe(recipe)


def test_existing_output_is_not_replaced_without_overwrite(tiny_checkpoint, cache, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="output folder exists"):
        build_moe(_recipe(tiny_checkpoint("llama")), tmp_path / "taken")


def test_router_shape_that_disagrees_with_the_experts_is_refused_with_tensor_names(built, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    _, result = built
    bad = tmp_path / "bad"
    shutil.copytree(result.path, bad)
    weights = next(bad.glob("*.safetensors"))
    tensors = load_file(weights)
    tensors["model.layers.1.block_sparse_moe.gate.weight"] = torch.zeros(4, 64)
    save_file(tensors, weights)
    with pytest.raises(Exception, match=r"router model\.layers\.1\.block_sparse_moe\.gate\.weight has 4 rows"):
        moe_structure(bad)


def test_a_second_build_waits_for_the_first(tiny_checkpoint, cache, tmp_path):
    """Two processes building at once would train into the same files: the second waits on a lock."""
    import subprocess
    import sys
    import textwrap

    done = tmp_path / "holder-finished"
    holder = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from expertkit.moe.build import _build_lock
        with _build_lock(Path({str(cache / "moe-build")!r})):
            print("locked", flush=True)
            time.sleep(1)
            Path({str(done)!r}).write_text("done")  # the last thing before letting go
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    from expertkit.moe.build import _build_lock

    with _build_lock(cache / "moe-build"):
        assert done.is_file()  # it could only enter once the holder had finished
    proc.wait(timeout=30)
    assert proc.returncode == 0


def test_trained_moe_folder_holds_one_checkpoint_with_usual_permissions(built):
    """The router-trained model is the only checkpoint in the output (no shards of the untrained
    mixture beside it) and its files are readable by others like every written file."""
    from expertkit.fileio import umask

    _, result = built
    weights = {f.name for f in result.path.iterdir() if f.name.endswith((".safetensors", ".safetensors.index.json"))}
    index = result.path / "model.safetensors.index.json"
    expected = ({index.name, *json.loads(index.read_text())["weight_map"].values()} if index.is_file()
                else {"model.safetensors"})
    assert weights == expected
    for f in result.path.iterdir():
        if f.is_file():
            assert f.stat().st_mode & 0o777 == 0o666 & ~umask(), f.name


def test_copy_extras_never_copies_weights_or_indexes(tmp_path):
    from expertkit.moe.build import copy_extras

    src, dest = tmp_path / "mixed", tmp_path / "trained"
    src.mkdir()
    dest.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "pytorch_model.bin", "tokenizer.json", "chat_template.jinja",
                 "generation_config.json", ".expertkit-mixed"):
        (src / name).write_text(name)
    (dest / "model.safetensors").write_text("trained")
    (dest / "generation_config.json").write_text("mine")
    copy_extras(src, dest)
    assert sorted(f.name for f in dest.iterdir()) == ["chat_template.jinja", "generation_config.json",
                                                      "model.safetensors", "tokenizer.json"]
    assert (dest / "generation_config.json").read_text() == "mine"
