"""What training writes, seen from outside: PEFT loads the adapter from anywhere; OS errors are one line."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest
import torch

from expertkit.models import load_model
from expertkit.tasks.toy import copy_task
from expertkit.train import train_lora

TRAIN = {"steps": 2, "batch_size": 4, "rank": 4, "save_every": 0}
IDS = torch.tensor([[5, 17, 30, 44, 2, 9, 60, 12]])


def peft_logits_from(directory, adapter) -> torch.Tensor:
    """Logits of ``AutoPeftModelForCausalLM.from_pretrained(adapter)``, run from ``directory``."""
    from peft import AutoPeftModelForCausalLM

    here = os.getcwd()
    os.chdir(directory)
    try:
        model = AutoPeftModelForCausalLM.from_pretrained(str(adapter))
    finally:
        os.chdir(here)
    with torch.no_grad():
        return model(IDS).logits


def test_adapter_of_a_base_given_as_relative_path_loads_in_peft_from_elsewhere(tmp_path, tiny_checkpoint,
                                                                                monkeypatch):
    from peft import PeftModel

    base = tiny_checkpoint("llama")
    monkeypatch.chdir(base.parent)
    loaded = load_model(base.name)  # a relative folder, as a user types it
    res = train_lora(loaded, copy_task(), tmp_path / "adapter", **TRAIN)
    cfg = json.loads((res.out_dir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base.resolve())
    assert json.loads((res.out_dir / "expertkit.json").read_text())["base"] == str(base.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    got = peft_logits_from(elsewhere, res.out_dir)
    with torch.no_grad():
        want = PeftModel.from_pretrained(load_model(base).model, res.out_dir)(IDS).logits
    assert torch.allclose(got, want, atol=1e-6)


def test_ported_adapter_names_the_new_base_absolutely(tmp_path, tiny_checkpoint, monkeypatch):
    from expertkit.port import port

    old, new = tiny_checkpoint("llama"), tiny_checkpoint("llama", 1)
    res = train_lora(load_model(old), copy_task(), tmp_path / "adapter", **TRAIN)
    monkeypatch.chdir(new.parent)
    ported = port(res.out_dir, new.name, tmp_path / "ported", as_adapter=True, force=True)
    cfg = json.loads((ported.path / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(new.resolve())
    monkeypatch.chdir(tmp_path)
    got = peft_logits_from(tmp_path, ported.path)
    from peft import PeftModel

    with torch.no_grad():
        want = PeftModel.from_pretrained(load_model(new).model, ported.path)(IDS).logits
    assert torch.allclose(got, want, atol=1e-6)


def test_output_under_a_file_fails_before_training(tmp_path, tiny_checkpoint, cli, monkeypatch):
    import expertkit.train.lora as lora

    def no_training(*args, **kwargs):
        raise AssertionError("the output path must be checked before training")

    monkeypatch.setattr(lora, "_train", no_training)
    (tmp_path / "file").write_text("x")
    code, _, err = cli(["--quiet", "train", "gcd", str(tmp_path / "file" / "adapter"), "--model",
                        str(tiny_checkpoint("llama")), "--steps", "1"])
    assert code == 2 and "Traceback" not in err
    assert err.strip() == f"error: Not a directory: {tmp_path / 'file' / 'adapter'} (a part of the path is a file, not a folder)."


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_write_over_the_file_size_limit_is_one_line_and_leaves_nothing(tmp_path, tiny_checkpoint):
    out = tmp_path / "new" / "adapter"
    proc = subprocess.run(
        [sys.executable, "-m", "expertkit.cli.main", "--quiet", "train", "gcd", str(out), "--model",
         str(tiny_checkpoint("llama")), "--steps", "2", "--batch-size", "2", "--rank", "8"],
        capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0] == f"error: File too large: {out} (the file-size limit (ulimit -f) is smaller than this file)."
    assert not (tmp_path / "new").exists()  # no adapter, no temporary folder, no empty parent


@pytest.mark.bundled
def test_bundled_adapter_loads_in_peft_and_old_adapters_still_work(tmp_path):
    from expertkit.merge.zoo.members import discover_zoo
    from expertkit.models.bundled import ensure_bundled
    from expertkit.port import extract_patch

    cached = ensure_bundled("smollm2-135m")
    res = train_lora(load_model("smollm2-135m"), "gcd", tmp_path / "zoo" / "gcd",
                     steps=1, batch_size=1, rank=1, save_every=0, target_modules=["q_proj"])
    cfg_path = res.out_dir / "adapter_config.json"
    assert json.loads(cfg_path.read_text())["base_model_name_or_path"] == str(cached.resolve())
    assert json.loads((res.out_dir / "expertkit.json").read_text())["base"] == "smollm2-135m"
    got = peft_logits_from(tmp_path, res.out_dir)
    from peft import PeftModel

    with torch.no_grad():
        want = PeftModel.from_pretrained(load_model("smollm2-135m").model, res.out_dir)(IDS).logits
    assert torch.allclose(got, want, atol=1e-5)
    # an adapter written before the fix names the bundled model by expertkit's name: still fine for expertkit
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": "smollm2-135m"}))
    patch = extract_patch(res.out_dir)
    assert patch.sketch  # the recorded base was found: the patch carries a sketch of it
    (member,) = [m for m in discover_zoo([tmp_path / "zoo", cached]) if m.kind == "adapter"]
    assert member.base == cached
