"""The linear merge's fast path: copy-on-write mapped inputs, a fused first add, a lazy CLI start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from expertkit.merge import MergeConfig, merge_state_dicts, run_merge
from expertkit.merge.core import get_method
from expertkit.merge.methods.base import weighted_sum
from expertkit.merge.sources import FolderSource
from expertkit.weights import Checkpoint, save_state_dict


def _sd(path: Path) -> dict[str, torch.Tensor]:
    with Checkpoint(path) as ck:
        return dict(ck.iter_tensors())


def test_view_maps_every_tensor_copy_on_write(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(33, 7, generator=gen), "b": torch.randn(5, generator=gen).to(torch.bfloat16),
          "c": torch.arange(6, dtype=torch.int64).reshape(2, 3), "empty": torch.zeros(0, 4),
          "d": torch.randn(1000, generator=gen, dtype=torch.float64)}
    folder = save_state_dict(sd, tmp_path / "ck", max_shard_size=4000)  # several shards, odd offsets
    before = {p.name: p.read_bytes() for p in folder.glob("*.safetensors")}
    with Checkpoint(folder) as ck:
        assert len(ck.shards) > 1
        for name, t in sd.items():
            v = ck.view(name)
            assert v.dtype == t.dtype and v.shape == t.shape and torch.equal(v, t), name
        v = ck.view("a")
        v.mul_(0).add_(5)  # writes stay private
        assert torch.equal(ck.read("a"), sd["a"]) and torch.equal(ck.view("a"), sd["a"])
    assert {p.name: p.read_bytes() for p in folder.glob("*.safetensors")} == before


def test_linear_maps_its_inputs_instead_of_reading_them(tmp_path, tiny_checkpoint, monkeypatch):
    models = [tiny_checkpoint("llama", s) for s in range(3)]

    def no_read(self, name):
        raise AssertionError("a zero-copy method must not read tensors into fresh memory")

    assert get_method("linear").zero_copy and get_method("ties").zero_copy and not get_method("task_arithmetic").zero_copy
    monkeypatch.setattr(FolderSource, "read", no_read)
    files = {p: p.read_bytes() for m in models for p in m.glob("*.safetensors")}
    weights = [0.5, 0.3, 1.7]
    data = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": w}}
                                                 for m, w in zip(models, weights, strict=True)]}
    out = run_merge(MergeConfig.model_validate(data), tmp_path / "out", progress=False)
    got = _sd(out)
    ref = merge_state_dicts("linear", [_sd(m) for m in models], weights=weights)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    assert all(p.read_bytes() == data for p, data in files.items())  # the inputs are untouched
    monkeypatch.undo()
    with pytest.raises(AssertionError, match="zero-copy"):  # a method that owns its inputs still reads
        monkeypatch.setattr(FolderSource, "read", no_read)
        data = {"merge_method": "task_arithmetic", "base_model": str(models[0]), "models": [{"model": str(models[1])}]}
        run_merge(MergeConfig.model_validate(data), tmp_path / "ta", progress=False)
    assert not (tmp_path / "ta").exists()


def test_linear_over_a_lora_input_with_mapped_base_tensors(tmp_path, tiny_checkpoint):
    from peft import LoraConfig, get_peft_model

    from expertkit.models.tiny import tiny_model

    base = tiny_checkpoint("llama", 0)
    peft_model = get_peft_model(tiny_model("llama", 0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    data = {"merge_method": "linear", "models": [{"model": f"{base}+{tmp_path / 'adapter'}"}, {"model": str(base)}]}
    got = _sd(run_merge(MergeConfig.model_validate(data), tmp_path / "out", progress=False))
    ref = merge_state_dicts("linear", [merged, _sd(base)])
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=0, msg=k)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(got[q], _sd(base)[q])  # the adapter did change the merge


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [1.0, 0.3, -2.5], [0.7, 1.0], [1.0]])
@pytest.mark.parametrize("normalize", [True, False])
def test_weighted_sum_new_tensor_equals_the_plain_formula_bit_for_bit(weights, normalize):
    gen = torch.Generator().manual_seed(len(weights))
    ts = [torch.randn(257, 31, generator=gen) for _ in weights]
    copies = [t.clone() for t in ts]
    got = weighted_sum(ts, weights, normalize)
    ref = torch.mul(ts[0], weights[0])
    for t, w in zip(ts[1:], weights[1:], strict=True):
        ref.add_(t, alpha=w)
    if normalize:
        ref.div_(sum(weights))
    assert torch.equal(got, ref)
    assert all(got.data_ptr() != t.data_ptr() for t in ts)  # a new tensor; the inputs are only read
    assert all(torch.equal(a, b) for a, b in zip(ts, copies, strict=True))


def test_cli_merge_starts_without_importing_transformers(tmp_path, tiny_checkpoint):
    models = [tiny_checkpoint("llama", s) for s in range(2)]
    cfg = tmp_path / "m.yaml"
    cfg.write_text("merge_method: linear\nmodels:\n" + "".join(f"  - model: {m}\n" for m in models))
    code = ("import sys\nfrom expertkit.cli.main import main\n"
            f"try:\n    main(['--quiet', 'merge', {str(cfg)!r}, {str(tmp_path / 'out')!r}])\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('transformers' in sys.modules, 'huggingface_hub' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split()[-2:] == ["False", "False"], res.stdout + res.stderr
    assert (tmp_path / "out" / "config.json").exists()


def test_quiet_switches_transformers_bars_before_and_after_it_is_imported():
    code = """
import os
from expertkit.progress import set_quiet
os.environ.pop('HF_HUB_DISABLE_PROGRESS_BARS', None)
set_quiet(True)
assert os.environ['HF_HUB_DISABLE_PROGRESS_BARS'] == '1'
set_quiet(False)
assert 'HF_HUB_DISABLE_PROGRESS_BARS' not in os.environ
set_quiet(True)
from transformers.utils import logging as hf_logging
from huggingface_hub.utils import are_progress_bars_disabled
assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
set_quiet(False)
assert hf_logging.is_progress_bar_enabled()  # huggingface_hub's download bars stay off: its variable, read at import, has priority (no module is patched)
set_quiet(True)
assert not hf_logging.is_progress_bar_enabled()
print('ok')
"""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
