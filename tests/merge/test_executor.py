"""The streaming executor: equal to the in-memory reference bit for bit, atomic, checked up front."""

from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch

from expertkit.errors import ConfigError, IncompatibleModelsError
from expertkit.merge import MergeConfig, merge_state_dicts, run_merge
from expertkit.merge.sources import FolderSource
from expertkit.weights import Checkpoint, save_state_dict


def _sd(path: Path) -> dict[str, torch.Tensor]:
    with Checkpoint(path) as ck:
        return dict(ck.iter_tensors())


def _run(tmp_path: Path, data: dict, name: str = "out", **kw) -> dict[str, torch.Tensor]:
    out = run_merge(MergeConfig.model_validate(data), tmp_path / name, progress=False, **kw)
    return _sd(out)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def zoo(tiny_checkpoint):
    return [tiny_checkpoint("llama", s) for s in range(3)]


#: every registered method: (parameters, number of models, merge with a base). A new method must be
#: added here: the test below refuses a registry this table does not cover.
STREAMED: dict[str, tuple[dict, int, bool]] = {
    "linear": ({}, 2, False), "task_arithmetic": ({"lambda": 0.7}, 2, True), "ties": ({"density": 0.3}, 2, True),
    "dare_linear": ({"density": 0.4}, 2, True), "dare_ties": ({"density": 0.6}, 2, True),
    "breadcrumbs": ({"density": 0.8}, 2, True), "model_stock": ({}, 2, True), "slerp": ({"t": 0.3}, 1, True),
    "passthrough": ({"scale": 0.5}, 1, False), "fisher": ({}, 2, False), "regmean": ({"alpha": 0.8}, 2, False),
    "breadcrumbs_ties": ({"density": 0.8, "gamma": 0.05}, 2, True),
    "della": ({"density": 0.6, "epsilon": 0.2}, 2, True), "della_linear": ({"density": 0.5, "epsilon": 0.1}, 2, True),
    "sce": ({"select_topk": 0.5}, 2, True), "ram": ({"epsilon": 0.01}, 2, True),
    "ramplus_tl": ({"epsilon": 0.01, "r": 0.5, "alpha": 0.5}, 2, True),
    "nuslerp": ({"nuslerp_flatten": False}, 2, True), "multislerp": ({}, 2, True), "karcher": ({}, 2, False),
    "nearswap": ({"t": 0.01}, 1, True), "arcee_fusion": ({}, 1, True),
}


def test_the_streamed_test_covers_every_registered_method():
    from expertkit.merge import METHODS

    assert set(STREAMED) == set(METHODS.names())


def _stats(kind: str, sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Random Fisher diagonals (one per tensor) or Gram matrices (one per 2-D weight)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "fisher":
        return {k: torch.rand(v.shape, generator=g) for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        if v.dim() == 2:
            x = torch.randn(3 * v.shape[1], v.shape[1], generator=g)  # (tokens, in)
            out[k] = x.T @ x  # (in, in)
    return out


def _streamed_case(tmp_path: Path, zoo: list[Path], method: str) -> tuple[dict, list[Path], list[float], list | None]:
    """The config of ``method``'s row of :data:`STREAMED` (statistics files written when it needs them),
    its input models, weights and statistics."""
    from expertkit.merge import METHODS

    params, n, with_base = STREAMED[method]
    base, *models = zoo
    models = models[:n]
    weights = [0.6, 0.4][:n] if n > 1 and method != "model_stock" else [1.0] * n
    stats_kind = METHODS.get(method).stats
    stats = [_stats(stats_kind, _sd(m), i) for i, m in enumerate(models)] if stats_kind else None
    entries = []
    for i, (m, w) in enumerate(zip(models, weights, strict=True)):
        entry = {"model": str(m), "parameters": {"weight": w}}
        if stats is not None:
            entry["stats"] = str(save_state_dict(stats[i], tmp_path / f"stats{i}"))
        entries.append(entry)
    data = {"merge_method": method, "parameters": params, "seed": 11, "max_shard_size": 60_000,  # several shards
            "models": entries, **({"base_model": str(base)} if with_base else {})}
    return data, models, weights, stats


@pytest.mark.parametrize("method", sorted(STREAMED))
def test_streamed_merge_equals_in_memory_merge_bit_for_bit(tmp_path, zoo, method):
    params, _, with_base = STREAMED[method]
    data, models, weights, stats = _streamed_case(tmp_path, zoo, method)
    got = _run(tmp_path, data)
    ref = merge_state_dicts(method, [_sd(m) for m in models], _sd(zoo[0]) if with_base else None, weights=weights,
                            params=params, seed=11, stats=stats)
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    changed = [k for k in ref if not torch.equal(ref[k], _sd(models[0])[k])]
    assert len(changed) >= len(ref) // 2  # the merge did something: not a copy of the first model
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert _leftovers(tmp_path) == []


def test_output_loads_with_transformers_and_records_the_config(tmp_path, zoo):
    from expertkit.models import load_model

    data = {"merge_method": "linear", "models": [{"model": str(m)} for m in zoo], "out_dtype": "bfloat16"}
    _run(tmp_path, data)
    loaded = load_model(str(tmp_path / "out"))
    assert loaded.tokenizer is not None and loaded.model.config.num_hidden_layers == 2
    with Checkpoint(tmp_path / "out") as ck:
        assert {i.dtype for i in ck.infos()} == {torch.bfloat16}
        assert json.loads(ck.metadata["expertkit.merge"])["merge_method"] == "linear"


@pytest.mark.parametrize("method", sorted(STREAMED))
def test_peak_memory_is_one_tensor_per_input(tmp_path, zoo, monkeypatch, method):
    """Every method streams: at most one tensor of each input (and the base) is alive at a time,
    and each is read exactly once (methods with whole-model statistics read those separately)."""
    alive: list[weakref.ref] = []
    peak = [0]

    def tracking(original):
        def read(self, name):
            t = original(self, name)
            alive.append(weakref.ref(t))
            peak[0] = max(peak[0], sum(r() is not None for r in alive))
            return t
        return read

    data, models, _, _ = _streamed_case(tmp_path, zoo, method)
    inputs = len(models) + ("base_model" in data)
    monkeypatch.setattr(FolderSource, "read", tracking(FolderSource.read))
    monkeypatch.setattr(FolderSource, "view", tracking(FolderSource.view))  # zero-copy methods map their inputs
    _run(tmp_path, data)
    assert len(alive) == 21 * inputs  # every tensor of every input read exactly once
    assert peak[0] == inputs  # one tensor each: never a whole model


def test_depth_gradients_and_group_filters(tmp_path, zoo):
    base, model, _ = zoo
    b, m = _sd(base), _sd(model)
    data = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(model)}],
            "parameters": {"lambda": [0.0, 1.0]}}
    got = _run(tmp_path, data, "gradient")
    for name in b:
        expect = m[name] if ".layers.1." in name else b[name]  # t = 0 for layer 0 and non-layer tensors
        torch.testing.assert_close(got[name], expect, atol=1e-6, rtol=0, msg=name)
    # "attention" is a group of the architecture descriptor (the names say self_attn); "q_proj" a substring
    data["parameters"] = {"lambda": [{"filter": "q_proj", "value": 0.25}, {"filter": "mlp", "value": 1.0},
                                     {"filter": "attention", "value": 0.5}, {"value": 0.0}]}
    got = _run(tmp_path, data, "filters")
    for name in b:
        lam = 0.25 if "q_proj" in name else 1.0 if ".mlp." in name else 0.5 if "self_attn" in name else 0.0
        torch.testing.assert_close(got[name], b[name] + lam * (m[name] - b[name]), atol=1e-6, rtol=0, msg=name)


def test_per_model_density_overrides_the_global_one(tmp_path, zoo):
    base, m1, m2 = zoo
    data = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5},
            "models": [{"model": str(m1), "parameters": {"density": 1.0}}, {"model": str(m2)}]}
    got = _run(tmp_path, data)
    # equal to merging a model pre-trimmed at 1.0 (unchanged) with one trimmed at 0.5
    b, a, c = _sd(base), _sd(m1), _sd(m2)
    trimmed = merge_state_dicts("ties", [c], b, params={"density": 0.5, "normalize": False})
    ref = merge_state_dicts("ties", [a, trimmed], b, params={"density": 1.0})
    assert all(torch.allclose(got[k], ref[k], atol=1e-6) for k in ref)


def test_lora_adapters_are_inputs_without_merged_copies(tmp_path, tiny_checkpoint):
    from peft import LoraConfig, get_peft_model

    from expertkit.models.tiny import tiny_model

    base = tiny_checkpoint("llama", 0)
    adapters, merged = [], []
    for i, targets in enumerate([["q_proj", "v_proj"], ["up_proj"]]):
        peft_model = get_peft_model(tiny_model("llama", 0), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        peft_model.save_pretrained(tmp_path / f"adapter{i}")
        adapters.append(tmp_path / f"adapter{i}")
        merged.append({k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()})
    before = sorted(p.name for p in tmp_path.iterdir())
    data = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.5},
            "models": [{"model": f"{base}+{adapters[0]}"}, {"model": str(adapters[1])}]}
    got = _run(tmp_path, data)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "out"])  # no merged copies
    ref = merge_state_dicts("ties", merged, _sd(base), params={"density": 0.5})
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=0, msg=k)


def test_incompatible_models_give_one_error_and_no_output(tmp_path, tiny_checkpoint):
    llama, qwen = tiny_checkpoint("llama", 0), tiny_checkpoint("qwen2", 0)
    data = {"merge_method": "linear", "models": [{"model": str(llama)}, {"model": str(qwen)}]}
    with pytest.raises(IncompatibleModelsError) as err:
        _run(tmp_path, data)
    text = str(err.value)
    assert "architecture" in text and "model_type" in text and "Nothing was written" in text
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_tied_embeddings_and_shapes_are_explained(tmp_path):
    from expertkit.models.tiny import save_tiny

    a = save_tiny("llama", tmp_path / "a", 0)
    tied = save_tiny("llama", tmp_path / "tied", 1, tie_word_embeddings=True)
    wide = save_tiny("llama", tmp_path / "wide", 1, intermediate_size=96)
    for other, needle in [(tied, "tied embeddings"), (wide, "mlp.up_proj.weight")]:
        data = {"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(other)}]}
        with pytest.raises(IncompatibleModelsError, match=needle):
            _run(tmp_path, data, "never")
    assert not (tmp_path / "never").exists()


def test_failure_mid_merge_leaves_no_output(tmp_path, zoo, monkeypatch):
    import expertkit.merge.executor as ex

    calls = [0]
    original = ex.merge_tensor

    def failing(*a, **k):
        calls[0] += 1
        if calls[0] == 5:
            raise RuntimeError("disk on fire")
        return original(*a, **k)

    monkeypatch.setattr(ex, "merge_tensor", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        _run(tmp_path, {"merge_method": "linear", "models": [{"model": str(m)} for m in zoo]})
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_slices_stack_layers_and_update_the_config(tmp_path, zoo):
    from expertkit.models import load_model

    a, b, _ = zoo
    data = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 2]}]}]}
    got = _run(tmp_path, data)
    sa, sb = _sd(a), _sd(b)
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], sb["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], sa["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], sb["lm_head.weight"])  # post weights: last slice
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    assert load_model(str(tmp_path / "out")).model.config.num_hidden_layers == 3


def test_sliced_task_arithmetic_with_a_base_among_the_sources(tmp_path, zoo):
    base, model, _ = zoo
    data = {"merge_method": "task_arithmetic", "base_model": str(base), "slices": [{"sources": [
        {"model": str(base), "layer_range": [0, 2]}, {"model": str(model), "layer_range": [0, 2]}]}]}
    got = _run(tmp_path, data)
    assert all(torch.allclose(got[k], v, atol=1e-6) for k, v in _sd(model).items())


def _with_added_tokens(src: Path, dst: Path, extra: int, seed: int) -> Path:
    """A copy of ``src`` whose tokenizer and embeddings have ``extra`` tokens appended."""
    sd = _sd(src)
    g = torch.Generator().manual_seed(seed)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[name] = torch.cat([sd[name], torch.randn(extra, sd[name].shape[1], generator=g)])
    save_state_dict(sd, dst)
    cfg = json.loads((src / "config.json").read_text())
    cfg["vocab_size"] += extra
    (dst / "config.json").write_text(json.dumps(cfg))
    tok = json.loads((src / "tokenizer.json").read_text())
    for i in range(extra):
        tok["added_tokens"].append({"id": cfg["vocab_size"] - extra + i, "content": f"<tool{i}>", "single_word": False,
                                    "lstrip": False, "rstrip": False, "normalized": False, "special": True})
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    shutil.copy(src / "tokenizer_config.json", dst / "tokenizer_config.json")
    return dst


def test_vocabularies_differing_by_added_tokens_are_aligned(tmp_path, zoo):
    base, model, _ = zoo
    bigger = _with_added_tokens(model, tmp_path / "bigger", 2, 0)
    data = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(bigger)}]}
    got = _run(tmp_path, data)
    sb = _sd(bigger)
    emb = got["model.embed_tokens.weight"]
    assert emb.shape[0] == 130
    torch.testing.assert_close(emb, sb["model.embed_tokens.weight"], atol=1e-6, rtol=0)  # new rows: base row := mean
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 130
    assert "<tool1>" in (tmp_path / "out" / "tokenizer.json").read_text()
    # the same token at another id cannot be aligned
    clash = _with_added_tokens(model, tmp_path / "clash", 2, 1)
    tok = json.loads((clash / "tokenizer.json").read_text())
    tok["added_tokens"][-1]["content"] = "a"  # 'a' already has a lower id
    (clash / "tokenizer.json").write_text(json.dumps(tok))
    data["models"] = [{"model": str(clash)}]
    with pytest.raises(IncompatibleModelsError, match="vocabulary"):
        _run(tmp_path, data, "never")


def test_config_errors_before_any_work(tmp_path, zoo):
    base, model, _ = zoo
    with pytest.raises(ConfigError, match="needs a base"):
        _run(tmp_path, {"merge_method": "ties", "models": [{"model": str(model)}]})
    with pytest.raises(ConfigError, match="exists"):
        (tmp_path / "taken").mkdir()
        _run(tmp_path, {"merge_method": "linear", "models": [{"model": str(model)}]}, "taken")
    with pytest.raises(ConfigError, match="LoRA adapter"):
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("{}")
        _run(tmp_path, {"merge_method": "linear", "models": [{"model": str(adapter)}]})
