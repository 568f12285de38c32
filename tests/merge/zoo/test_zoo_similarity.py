"""Similarity, clustering and incompatibility reporting on hand-placed tensors and tiny zoos."""

from __future__ import annotations

import math

import pytest
import torch

from expertkit.errors import ConfigError
from expertkit.merge.zoo import (
    MemberWeights,
    Signature,
    agglomerative,
    auto_threshold,
    discover_zoo,
    explain,
    pairwise_similarity,
    plan_zoo,
)
from expertkit.models.tiny import save_tiny
from expertkit.weights.deltas import TensorSource

Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"
LLAMA = {"model_type": "llama"}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return float(a @ b / (a.norm() * b.norm()))


def test_streamed_similarity_equals_cosine_of_concatenated_weights():
    models = [
        {Q: torch.tensor([[1.0, 2.0], [3.0, 4.0]]), UP: torch.tensor([1.0, 0.0, 0.0])},
        {Q: torch.tensor([[1.0, 2.0], [3.0, 5.0]]), UP: torch.tensor([0.0, 1.0, 0.0])},
        {Q: torch.tensor([[-1.0, 2.0], [3.0, 4.0]]), UP: torch.tensor([1.0, 1.0, 0.0])},
    ]
    ref = {Q: torch.tensor([[1.0, 2.0], [3.0, 4.0]]), UP: torch.tensor([0.0, 0.0, 1.0])}
    rep = pairwise_similarity([TensorSource(m) for m in models], [Q, UP], reference=TensorSource(ref),
                              config=LLAMA, progress=False)
    flat = [torch.cat([m[Q].reshape(-1), m[UP]]).double() for m in models]
    ref_flat = torch.cat([ref[Q].reshape(-1), ref[UP]])
    cos = rep.matrix("cosine", "all")
    tv = rep.matrix("task_cosine", "all")
    attn = rep.matrix("cosine", "attention")
    mlp = rep.matrix("cosine", "mlp")
    for i in range(3):
        for j in range(3):
            assert cos[i, j] == pytest.approx(_cos(flat[i], flat[j]), abs=1e-12)
            assert tv[i, j] == pytest.approx(_cos(flat[i] - ref_flat, flat[j] - ref_flat), abs=1e-12)
            assert attn[i, j] == pytest.approx(_cos(models[i][Q], models[j][Q]), abs=1e-12)
            assert mlp[i, j] == pytest.approx(_cos(models[i][UP], models[j][UP]), abs=1e-12)
    rel = rep.matrix("relative_l2", "all")
    expected = float((flat[0] - flat[1]).norm() / math.sqrt(flat[0].norm() * flat[1].norm()))
    assert rel[0, 1] == pytest.approx(expected, abs=1e-12)
    assert rep.groups == ["all", "attention", "mlp"]
    assert rep.identical == []


def test_similarity_records_identical_tensors_and_needs_a_reference_for_task_cosine():
    a = {Q: torch.ones(2, 2), UP: torch.tensor([1.0, 2.0])}
    b = {Q: torch.ones(2, 2), UP: torch.tensor([1.0, 3.0])}
    rep = pairwise_similarity([TensorSource(a), TensorSource(b)], [Q, UP], config=LLAMA, progress=False)
    assert rep.identical == [Q]
    assert rep.distance("cosine", "attention")[0, 1] == 0.0
    with pytest.raises(ConfigError, match="needs a reference"):
        rep.matrix("task_cosine")


def test_nearly_parallel_weights_keep_their_tiny_distance():
    # 1 - cos of about 5e-13: a Gram matrix in float32 would round it to 0 or make it negative
    w = torch.linspace(1.0, 2.0, 1000)
    v = w.clone()
    v[0] += 1e-5
    rep = pairwise_similarity([TensorSource({UP: w}), TensorSource({UP: v})], [UP], config=LLAMA, progress=False)
    exact = 1 - _cos(w, v)
    assert rep.distance()[0, 1].item() == pytest.approx(exact, rel=1e-3)
    assert exact > 0


def test_agglomerative_threshold_gap_and_forbidden_pairs():
    d = torch.tensor([
        [0.0, 1e-6, 2e-6, 1e-2, 1e-2],
        [1e-6, 0.0, 1e-6, 1e-2, 1e-2],
        [2e-6, 1e-6, 0.0, 1e-2, 1e-2],
        [1e-2, 1e-2, 1e-2, 0.0, 3e-6],
        [1e-2, 1e-2, 1e-2, 3e-6, 0.0],
    ])
    assert agglomerative(d, 1e-3).clusters == [[0, 1, 2], [3, 4]]
    assert agglomerative(d, 1.0).clusters == [[0, 1, 2, 3, 4]]
    assert agglomerative(d, 0.0).clusters == [[0], [1], [2], [3], [4]]
    auto = agglomerative(d, "auto")
    assert auto.clusters == [[0, 1, 2], [3, 4]]
    assert 3e-6 < auto.threshold < 1e-2
    allowed = torch.ones(5, 5, dtype=torch.bool)
    allowed[4, :4] = allowed[:4, 4] = False  # model 4 is incompatible with the others
    assert agglomerative(d, 1.0, allowed=allowed).clusters == [[0, 1, 2, 3], [4]]


def test_auto_threshold_without_a_gap_joins_everything():
    assert auto_threshold([1e-3, 2e-3, 4e-3]) == math.inf
    assert auto_threshold([1e-6, 1e-2]) == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="threshold"):
        agglomerative(torch.zeros(2, 2), "nearest")


def test_adapter_member_reads_the_peft_merged_weights(tiny_zoo):
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_zoo["baseA"]),
                                           str(tiny_zoo["a0"])).merge_and_unload().state_dict()
    (member,) = discover_zoo([tiny_zoo["a0"], tiny_zoo["a1"]])[:1]
    with MemberWeights(member) as w:
        assert w.changed() == {f"model.layers.{i}.self_attn.{m}_proj.weight" for i in (0, 1) for m in "qv"}
        for name in w.names():
            torch.testing.assert_close(w.read(name), merged[name], rtol=0, atol=1e-6)


def test_discover_finds_adapters_with_their_bases_and_tasks(tiny_zoo):
    members = discover_zoo([tiny_zoo["experts"]])
    assert [m.name for m in members] == ["a0", "a1", "a2", "b0", "b1"]
    assert {m.base for m in members} == {tiny_zoo["baseA"], tiny_zoo["baseB"]}
    assert members[0].tasks == ("family_relation",)


def _flat_evaluator(folder, tasks):
    return lambda tensors: 0.5


def test_plan_clusters_two_families_of_adapters(tiny_zoo):
    plan = plan_zoo([tiny_zoo["experts"]], ["family_relation", "bbc_topic"], evaluator_factory=_flat_evaluator,
                    progress=False)
    assert [c.members for c in plan.clusters] == [["a0", "a1", "a2"], ["b0", "b1"]]
    assert plan.clusters[0].base == str(tiny_zoo["baseA"].resolve())
    assert plan.clusters[1].base == str(tiny_zoo["baseB"].resolve())
    assert plan.incompatible == []
    assert plan.mixture.kind == "ffn"
    # within a family the weights are far more similar than across families
    assert plan.similarity.matrix["a0"]["a1"] > plan.similarity.matrix["a0"]["b0"]


def test_incompatible_models_are_reported_and_placed(tiny_zoo, tmp_path):
    small = save_tiny("llama", tmp_path / "narrow", 3, hidden_size=32, intermediate_size=64)
    gpt2 = save_tiny("gpt2", tmp_path / "gpt2", 0)
    plan = plan_zoo([tiny_zoo["a0"], tiny_zoo["a1"], small, gpt2], ["family_relation"],
                    evaluator_factory=_flat_evaluator, progress=False)
    assert sorted(c.members for c in plan.clusters) == [["a0", "a1"], ["gpt2"], ["narrow"]]
    text = "\n".join(plan.incompatible)
    assert "[a0, a1] cannot be merged with [narrow]" in text and "differ in shape" in text
    assert "architectures differ" in text and "'gpt2'" in text
    assert plan.mixture.kind == "model"  # representatives of different shapes: no FFN mixture
    assert "narrow" not in plan.similarity.matrix["a0"]


def test_explain_lists_every_mismatch():
    a = Signature("llama", (("x", (2, 2)), ("y", (3,))), True, 100)
    b = Signature("llama", (("x", (2, 3)), ("z", (3,))), False, 104)
    reasons = explain(a, b, "A", "B")
    assert any("vocabularies differ: 100 vs 104" in r for r in reasons)
    assert any("tie_word_embeddings differs" in r for r in reasons)
    assert "1 tensors only in A: y" in reasons
    assert "1 tensors only in B: z" in reasons
    assert "1 tensors differ in shape: x [2, 2] vs [2, 3]" in reasons
    assert explain(a, a) == []
