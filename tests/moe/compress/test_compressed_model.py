"""Compressed folders on tiny MoEs: what load_model gives, exactness of group routing, stock forms, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from expertkit.errors import ExpertkitError
from expertkit.models import load_model
from expertkit.moe.compress import METHODS, LayerStats, compress_checkpoint
from expertkit.moe.compressed import expert_parameters, experts_modules
from expertkit.weights import Checkpoint

from .helpers import save_with_permuted_experts, swiglu

IDS = torch.tensor([[5, 40, 41, 60, 7, 80, 33, 9, 12, 70]])


def _stats(n_layers: int, n_experts: int, seed: int = 0) -> LayerStats:
    rng = np.random.default_rng(seed)
    freq = rng.dirichlet(np.ones(n_experts), size=n_layers)  # (L, E)
    sim = np.stack([np.corrcoef(rng.normal(size=(n_experts, 6))) for _ in range(n_layers)])  # (L, E, E)
    return LayerStats(freq, sim, rng.normal(size=(n_layers, n_experts, 64)), rng.random((n_layers, n_experts)))


def _compress(src, out, method="msmoe", keep=(2, 2), lowrank=None, stats=None, **kw):
    stats = stats or _stats(len(keep), 4)
    return compress_checkpoint(src, out, method=method, params=METHODS.get(method).params(), stats=stats,
                               keep=list(keep), lowrank=lowrank, **kw)


def test_permuted_copies_compress_to_one_expert_per_layer_with_the_same_function(tiny_checkpoint, tmp_path):
    src = save_with_permuted_experts("mixtral", tmp_path / "src")
    original = load_model(src).model
    result = _compress(src, tmp_path / "out", keep=(1, 1))
    loaded = load_model(result.path)
    # every expert computed the same function, so one merged expert with group routing changes nothing
    torch.testing.assert_close(loaded.model(IDS).logits, original(IDS).logits, rtol=0, atol=2e-5)
    assert expert_parameters(loaded.model) == 2 * 3 * 64 * 128 == result.record["expert_parameters"]["after"]
    assert expert_parameters(original) == 4 * expert_parameters(loaded.model)
    assert result.stock is None  # one expert per layer is fewer than top-2: no stock class expresses it


def test_group_routing_is_top_k_over_the_original_rows_mapped_to_groups(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("mixtral")
    result = _compress(src, tmp_path / "out", keep=(2, 2))
    layout = json.loads((result.path / "config.json").read_text())["expertkit_compressed_moe"]
    model = load_model(result.path).model
    block = model.model.layers[1].mlp
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))  # (N, H)
    with Checkpoint(src) as orig, Checkpoint(result.path) as comp:
        rows = orig.read("model.layers.1.block_sparse_moe.gate.weight")  # (4, H): the router keeps its rows
        assert torch.equal(rows, comp.read("model.layers.1.block_sparse_moe.gate.weight"))
        merged = [[comp.read(f"model.layers.1.block_sparse_moe.experts.{g}.{m}.weight") for m in ("w1", "w3", "w2")]
                  for g in range(2)]
    probs = torch.softmax(x @ rows.T, dim=-1)  # (N, 4)
    top, idx = probs.topk(2, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    gmap = torch.tensor(layout["layers"]["1"]["group_map"])
    expected = torch.zeros_like(x)
    for k in range(2):
        for g in range(2):
            hit = gmap[idx[:, k]] == g
            expected[hit] += top[hit, k, None] * swiglu(*merged[g], x[hit])
    torch.testing.assert_close(block(x[None])[0], expected, rtol=1e-5, atol=1e-5)
    assert set(gmap.tolist()) == {0, 1}


def test_pruned_folder_and_its_stock_form_are_the_same_model(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen3_moe")
    result = _compress(src, tmp_path / "out", method="prune_frequency", keep=(2, 2))
    assert result.record["stock"] and result.record["stock_exact"]
    exact = load_model(result.path).model
    stock = AutoModelForCausalLM.from_pretrained(result.stock)  # plain transformers reads it
    assert stock.config.num_experts == 2
    torch.testing.assert_close(stock(IDS).logits, exact(IDS).logits, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError):  # a stock reader refuses the exact folder instead of misreading it
        AutoModelForCausalLM.from_pretrained(_compress(src, tmp_path / "m", keep=(2, 2)).path)


def test_factored_experts_load_for_real_and_match_their_multiplied_out_stock_form(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("olmoe")
    result = _compress(src, tmp_path / "out", keep=(2, 2), lowrank=(0.4, 0.25))
    exact = load_model(result.path).model
    kept = expert_parameters(exact)
    assert kept == result.record["expert_parameters"]["after"] <= 0.4 * 2 * 2 * 3 * 128 * 64
    assert result.record["expert_parameters"]["removed_share"] >= 0.8
    stock = AutoModelForCausalLM.from_pretrained(result.stock)
    # the stock form multiplies the factors out; group routing there is approximated by combined rows,
    # so compare layer by layer with the exact form's routing: the experts themselves must agree
    for (_r, fac), (_r2, dense) in zip(experts_modules(exact).values(), experts_modules(stock).values(), strict=True):
        x = torch.randn(5, 64)
        for g in range(2):
            idx = torch.full((5, 1), g)
            torch.testing.assert_close(fac(x, idx, torch.ones(5, 1)), dense(x, idx, torch.ones(5, 1)), rtol=1e-4, atol=1e-5)


def test_adaptive_counts_per_layer_load_with_their_own_sizes(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("mixtral")
    result = _compress(src, tmp_path / "out", method="hcsmoe", keep=(3, 1))
    model = load_model(result.path).model
    sizes = [e.gate_up_proj.shape[0] for _r, e in experts_modules(model).values()]
    assert sizes == [3, 1] and model.config.num_local_experts == 3 and result.stock is None
    assert model.generate(IDS, max_new_tokens=3, do_sample=False).shape == (1, 13)


def test_two_compressions_of_one_moe_have_distinct_evaluation_keys(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("mixtral")
    a = _compress(src, tmp_path / "a", method="msmoe").path
    b = _compress(src, tmp_path / "b", method="average").path
    from expertkit.weights.fingerprint import model_digest

    digest = {k: model_digest(load_model(p).model) for k, p in (("a", a), ("b", b))}
    assert digest["a"] != digest["b"] and digest["a"] == model_digest(load_model(a).model)


def test_a_dense_model_is_refused_with_one_line(tiny_checkpoint, tmp_path):
    with pytest.raises(ExpertkitError, match="dense architecture") as info:
        _compress(tiny_checkpoint("llama"), tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_statistics_of_another_shape_or_counts_per_layer_that_do_not_fit_are_refused(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("mixtral")
    with pytest.raises(ExpertkitError, match="2 MoE layers, but 3 expert counts"):
        _compress(src, tmp_path / "a", keep=(2, 2, 2))
    other = _stats(2, 4)
    other.layers = ["0", "5"]
    with pytest.raises(ExpertkitError, match="collect them on this model"):
        _compress(src, tmp_path / "b", stats=other)
    with pytest.raises(ExpertkitError, match="layer 0 is asked to keep 5 experts; each layer keeps 1 to 4"):
        _compress(src, tmp_path / "c", keep=(5, 2))
    # pruning below top-k (2) leaves a router that cannot pick two experts: refused, nothing written
    # (merging to one group is fine: test_adaptive_counts_per_layer_load_with_their_own_sizes)
    for method in ("prune_frequency", "reap"):
        with pytest.raises(ExpertkitError, match=f"{method} keeps 1 experts in layer 1, fewer than the model's top-k"):
            _compress(src, tmp_path / "d", method=method, keep=(2, 1))
    assert not any(p.name in {"a", "b", "c", "d"} for p in tmp_path.iterdir())
    assert not any(p.name.startswith(".d.tmp") for p in tmp_path.iterdir())



def test_the_c_steps_recorded_weight_error_is_the_factors_error_against_the_merged_experts(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    from expertkit.moe.compress.lowrank import factorize, split_budget

    src = tiny_checkpoint("olmoe")
    merged = load_file(_compress(src, tmp_path / "m", keep=(2, 2)).path / "model.safetensors")
    result = _compress(src, tmp_path / "c", keep=(2, 2), lowrank=(0.4, 0.25))
    layers = json.loads((result.path / "config.json").read_text())
    layers = next(v for v in layers.values() if isinstance(v, dict) and "layers" in v)["layers"]
    # recompute layer 1's gate error from the merged (uncompressed) folder's own tensors
    gates = [merged[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"] for e in range(2)]
    r, k = split_budget(*gates[0].shape, 0.4, 0.25)
    want = np.mean([float((factorize(w, r, k).dense() - w).norm() / w.norm()) for w in gates])
    assert layers["1"]["relative_error"]["gate"] == pytest.approx(want, rel=1e-4)
    assert 0.05 < want < 1  # 40% of a random matrix's parameters lose a real share of it
    means = {p: np.mean([e["relative_error"][p] for e in layers.values()]) for p in ("gate", "up", "down")}
    assert result.record["lowrank"]["relative_error"] == pytest.approx(means)
