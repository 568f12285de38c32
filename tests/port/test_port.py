"""PortLLM on tiny models: extraction, porting (dense and as an adapter), checks and diagnosis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from expertkit.errors import CheckpointError, ConfigError, IncompatibleModelsError
from expertkit.models.tiny import save_tiny, tiny_tokenizer
from expertkit.port import diagnose, extract_patch, port
from expertkit.port.apply import PORT_META
from expertkit.weights.patch import Patch
from expertkit.weights.reader import Checkpoint


def weights(folder: Path) -> dict[str, torch.Tensor]:
    with Checkpoint(folder) as ckpt:
        return dict(ckpt.iter_tensors())


def drifted(old: Path, dest: Path, rel: float, seed: int = 7) -> Path:
    """A copy of ``old`` whose float weights moved by about ``rel`` of their norm (an "evolved" base)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(old)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std().clamp_min(1e-3) * rel)
    model.save_pretrained(dest)
    tiny_tokenizer().save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Old base, evolved base (2% drift), unrelated model, and a LoRA adapter trained (randomised) on the old base."""
    root = tmp_path_factory.mktemp("port")
    old = save_tiny("llama", root / "old", seed=0)
    new = drifted(old, root / "new", 0.02)
    other = save_tiny("llama", root / "other", seed=1)
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(old),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    )
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(root / "adapter")
    return {"root": root, "old": old, "new": new, "other": other, "adapter": root / "adapter"}


def test_extract_keeps_factors_fingerprint_and_sketch(zoo):
    patch = extract_patch(zoo["adapter"], zoo["old"])
    assert patch.kind == "lora" and len(patch.factors) == 2 * 2 + 1  # q, v in 2 layers + embedding
    assert set(patch.sketch) == set(patch.names())
    patch.save(zoo["root"] / "patch")
    again = Patch.load(zoo["root"] / "patch")
    assert all(torch.equal(again.sketch[n], patch.sketch[n]) for n in patch.sketch)


def test_port_then_subtract_restores_new_base(zoo, tmp_path):
    ported = port(zoo["adapter"], zoo["new"], tmp_path / "ported", old_base=zoo["old"])
    back = port(zoo["adapter"], ported.path, tmp_path / "back", scale=-1.0, force=True)
    new, ported_w, restored = weights(zoo["new"]), weights(ported.path), weights(back.path)
    changed = [n for n in new if not torch.equal(new[n], ported_w[n])]
    assert len(changed) == 5
    for name, tensor in new.items():
        # x + d - d in float32 is x up to one rounding of x + d
        tol = 2 * torch.finfo(torch.float32).eps * float(ported_w[name].abs().max())
        torch.testing.assert_close(restored[name], tensor, rtol=0, atol=tol)


def test_scale_zero_gives_new_base_bit_for_bit(zoo, tmp_path):
    res = port(zoo["adapter"], zoo["new"], tmp_path / "zero", scale=0.0)
    new, out = weights(zoo["new"]), weights(res.path)
    assert set(new) == set(out) and all(torch.equal(new[n], out[n]) for n in new)


def test_low_rank_patch_as_adapter_equals_dense(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    dense = port(zoo["adapter"], zoo["new"], tmp_path / "dense", scale=0.7)
    adapter = port(zoo["adapter"], zoo["new"], tmp_path / "adapter", scale=0.7, as_adapter=True)
    assert adapter.adapter["max_residual"] == 0.0
    ids = torch.tensor([[5, 17, 30, 44, 2, 9, 60, 12]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(dense.path)(ids).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["new"]), adapter.path)
        got = peft(ids).logits
    assert (got - want).abs().max() < 1e-5
    merged = peft.merge_and_unload().state_dict()
    dense_w = weights(dense.path)
    for name, tensor in dense_w.items():
        assert (merged[name] - tensor).abs().max() < 1e-5, name


def test_dense_patch_as_adapter_reports_svd_residual(zoo, tmp_path):
    old = weights(zoo["old"])
    tuned = dict(old)
    gen = torch.Generator().manual_seed(0)
    name = "model.layers.0.mlp.up_proj.weight"
    d0, d1 = old[name].shape
    tuned[name] = old[name] + torch.randn(d0, 2, generator=gen) @ torch.randn(2, d1, generator=gen)  # rank 2
    patch = Patch.from_task_vector(tuned, old)
    exact = port(patch, zoo["new"], tmp_path / "r2", as_adapter=True, rank=2)
    assert exact.adapter["residuals"][name] < 1e-6
    lossy = port(patch, zoo["new"], tmp_path / "r1", as_adapter=True, rank=1)
    assert 0.05 < lossy.adapter["residuals"][name] < 1.0


def test_norm_deltas_refused_as_adapter_unless_skipped(zoo, tmp_path):
    old = weights(zoo["old"])
    tuned = dict(old)
    tuned["model.norm.weight"] = old["model.norm.weight"] + 0.1
    tuned["model.layers.1.self_attn.o_proj.weight"] = old["model.layers.1.self_attn.o_proj.weight"] * 1.1
    patch = Patch.from_task_vector(tuned, old)
    with pytest.raises(ConfigError, match="not matrices"):
        port(patch, zoo["new"], tmp_path / "a", as_adapter=True)
    assert not (tmp_path / "a").exists()
    res = port(patch, zoo["new"], tmp_path / "b", as_adapter=True, skip_non_matrix=True)
    assert res.adapter["skipped"] == ["model.norm.weight"]
    assert json.loads((res.path / PORT_META).read_text())["adapter"]["skipped"] == ["model.norm.weight"]


def test_incompatible_shapes_error_and_no_output(zoo, tmp_path):
    wide = save_tiny("llama", tmp_path / "wide", seed=0, hidden_size=48)
    with pytest.raises(IncompatibleModelsError, match="differ in shape"):
        port(zoo["adapter"], wide, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide"]  # no output, no temporary folder


def test_unrelated_base_refused_unless_forced(zoo, tmp_path):
    with pytest.raises(IncompatibleModelsError, match="another model"):
        port(zoo["adapter"], zoo["other"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    res = port(zoo["adapter"], zoo["other"], tmp_path / "out", force=True)
    assert res.diagnosis.relation == "unrelated" and res.path.is_dir()


def test_same_base_is_reported_as_such(zoo, tmp_path):
    res = port(zoo["adapter"], zoo["old"], tmp_path / "same")
    assert res.diagnosis.relation == "same"


def test_sketch_estimate_matches_exact_drift(zoo):
    patch = extract_patch(zoo["adapter"], zoo["old"])
    exact = diagnose(patch, zoo["new"], old_base=zoo["old"])
    sketched = diagnose(patch, zoo["new"])
    assert exact.method == "exact" and sketched.method == "sketch"
    assert exact.relation == sketched.relation == "evolved"
    for e, s in zip(exact.tensors, sketched.tensors, strict=True):
        assert e.name == s.name
        assert s.rel_drift == pytest.approx(e.rel_drift, rel=0.2)
    layers = [row["layer"] for row in exact.by_layer()]
    assert layers == [0, 1, None]


def test_no_sketch_no_old_base_is_unknown(zoo):
    patch = extract_patch(zoo["adapter"], zoo["old"], sketch=False)
    assert diagnose(patch, zoo["new"]).relation == "unknown"


def test_existing_output_refused_and_kept(zoo, tmp_path):
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists"):
        port(zoo["adapter"], zoo["new"], dest)
    assert (dest / "keep.txt").read_text() == "mine"


def test_model_folder_without_base_is_a_clear_error(zoo):
    with pytest.raises(ConfigError, match="--base"):
        extract_patch(zoo["new"])


def test_corrupt_patch_is_refused(zoo, tmp_path):
    patch = extract_patch(zoo["adapter"], zoo["old"])
    folder = patch.save(tmp_path / "p")
    tensors = load_file(folder / "patch.safetensors")
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1
    save_file(tensors, folder / "patch.safetensors")
    with pytest.raises(CheckpointError, match="checksum"):
        port(folder, zoo["new"], tmp_path / "out")


def test_replacements_become_deltas_against_the_old_base():
    from expertkit.port.apply import _replacements_to_deltas
    from expertkit.weights.deltas import TensorSource

    base = {"head.weight": torch.ones(2, 2), "emb.weight": torch.zeros(3, 2), "same.weight": torch.ones(2)}
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [0.0], [1.0]])  # B @ A: rows 0 and 2 = [1, 2]
    patch = Patch(kind="lora", factors={"emb.weight": (a, b)},
                  replacements={"head.weight": torch.full((2, 2), 3.0), "emb.weight": torch.ones(3, 2),
                                "same.weight": torch.ones(2)})
    _replacements_to_deltas(patch, TensorSource(base))
    assert not patch.replacements and set(patch.factors) == set()
    assert torch.equal(patch.deltas["head.weight"], torch.full((2, 2), 2.0))
    assert torch.equal(patch.deltas["emb.weight"], torch.tensor([[2.0, 3.0], [1.0, 1.0], [2.0, 3.0]]))
    assert "same.weight" not in patch.deltas  # equal to the base: not a change


def test_cli_port_extract_apply_and_errors(zoo, tmp_path, cli):
    code, _, _ = cli(["port", "extract", str(zoo["adapter"]), str(tmp_path / "p"), "--base", str(zoo["old"])])
    assert code == 0 and (tmp_path / "p" / "patch.json").is_file()
    code, out, _ = cli(["port", "apply", str(tmp_path / "p"), str(zoo["new"]), str(tmp_path / "m"), "--scale", "0.5"])
    assert code == 0 and "evolved" in out and (tmp_path / "m" / "model.safetensors").is_file()
    code, _, err = cli(["port", "apply", str(tmp_path / "p"), str(zoo["other"]), str(tmp_path / "x")])
    assert code == 2 and "refusing to port" in err and not (tmp_path / "x").exists()
    code, out, _ = cli(["port", "diagnose", str(tmp_path / "p"), str(zoo["new"]), "--old-base", str(zoo["old"])])
    assert code == 0 and "relative drift of the base" in out


def test_gpt2_conv1d_patch_as_adapter_equals_dense(tmp_path):
    from transformers import AutoModelForCausalLM

    old = save_tiny("gpt2", tmp_path / "old", seed=0)
    new = drifted(old, tmp_path / "new", 0.02)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(old),
                                LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    dense = port(tmp_path / "adapter", new, tmp_path / "dense")
    adapter = port(tmp_path / "adapter", new, tmp_path / "as-adapter", as_adapter=True)
    ids = torch.tensor([[5, 17, 30, 44, 2, 9]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(dense.path)(ids).logits
        got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(new), adapter.path)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(new)(ids).logits
    assert (want - base).abs().max() > 1e-3  # the patch changes the model
    assert (got - want).abs().max() < 1e-5


def test_missing_quickstart_experts_point_to_make_run(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(["port", "apply", "runs/quickstart/experts/gcd", "smollm2-135m", "out"])
    assert code == 2 and "patch or adapter folder not found: runs/quickstart/experts/gcd" in err
    assert "written by `make run`" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(["port", "extract", "elsewhere/gcd", "patch"])
    assert code == 2 and "adapter or model folder not found: elsewhere/gcd (check the path)" in err


def test_risky_drift_warning_follows_the_median_and_lists_the_tensors_above():
    from expertkit.port.diagnose import RISKY_DRIFT, TensorDrift, _verdict

    def rows(rels):
        return [TensorDrift(f"t{i}", i, 1.0, r, r, 0.1, 0.1 / r) for i, r in enumerate(rels)]

    # like the measured-safe base: median 0.22%, one tensor above the threshold
    safe = _verdict("a", "b", "exact", rows([0.002, 0.0022, 0.0025, 0.009]))
    assert safe.relation == "evolved" and safe.risky == ["t3"]
    assert "a modest update" in safe.message and "1 of 4 tensors moved by more than 0.5%" in safe.message
    assert "evaluate" not in safe.message
    # like the measured-unsafe base: median 0.96%
    unsafe = _verdict("a", "b", "exact", rows([0.0072, 0.0096, 0.0122]))
    assert unsafe.median_rel_drift > RISKY_DRIFT and len(unsafe.risky) == 3
    assert "evaluate the ported model" in unsafe.message and "modest" not in unsafe.message
