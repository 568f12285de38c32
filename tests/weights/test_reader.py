"""Reading checkpoints: listing without reading, handles, buffer reuse, pickles, truncation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from expertkit.errors import CheckpointError, PickleRefusedError
from expertkit.weights.reader import Checkpoint
from expertkit.weights.writer import SINGLE_SHARD, save_state_dict

from .rw_helpers import assert_same, read_all, sample_tensors, write_ckpt


# ------------------------------------------------------------------- reader
def test_reader_lists_without_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = sample_tensors()
    out = write_ckpt(tmp_path / "out", tensors, layout=True, max_shard_size=300)

    def no_read(*a: object, **k: object) -> None:
        raise AssertionError("data was read")

    with Checkpoint(out) as ckpt:
        monkeypatch.setattr(Checkpoint, "read", no_read)
        assert sorted(ckpt.names()) == sorted(tensors)
        for name, t in tensors.items():
            info = ckpt.info(name)
            assert info.shape == tuple(t.shape) and info.dtype == t.dtype
            assert info.nbytes == t.numel() * t.element_size()
        assert ckpt.num_parameters == sum(t.numel() for t in tensors.values())
        assert ckpt._handles == {}


def test_reader_one_handle_per_shard(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.full((8,), float(i)) for i in range(40)}
    out = write_ckpt(tmp_path / "out", tensors, layout=False, max_shard_size=100)
    with Checkpoint(out) as ckpt:
        assert len(ckpt.shards) > 5
        for _ in range(3):
            for name in reversed(ckpt.names()):
                assert torch.equal(ckpt.read(name), tensors[name])
        assert len(ckpt._handles) <= len(ckpt.shards)
    assert ckpt._handles == {}


def test_iter_tensors_reusing_one_buffer(tmp_path: Path) -> None:
    tensors = sample_tensors()
    out = write_ckpt(tmp_path / "out", tensors, layout=True, max_shard_size=300)
    ptrs = set()
    with Checkpoint(out) as ckpt:
        got = {}
        for name, t in ckpt.iter_tensors(reuse_buffer=True):
            got[name] = t.clone()  # valid only until the next one: keep a copy
            if t.numel():
                ptrs.add(t.data_ptr())
        biggest = max(i.nbytes for i in ckpt.infos())
    assert_same(got, tensors)
    assert len(ptrs) == 1  # every tensor was read into the same memory
    with Checkpoint(out) as ckpt:  # a subset, in a given order
        names = ["i8", "f64", "empty"]
        assert [(n, t.shape) for n, t in ckpt.iter_tensors(names, reuse_buffer=True)] == \
            [(n, tensors[n].shape) for n in names]
    assert biggest == tensors["big"].numel() * 4


def test_reader_refuses_pickles(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(4.0), "b": torch.tensor([1, 2], dtype=torch.int64)}
    for suffix in (".bin", ".pt"):
        folder = tmp_path / suffix.strip(".")
        folder.mkdir()
        torch.save(tensors, folder / f"pytorch_model{suffix}")
        for path in (folder, folder / f"pytorch_model{suffix}"):
            with pytest.raises(PickleRefusedError, match="allow_pickle"):
                Checkpoint(path)
        with Checkpoint(folder, allow_pickle=True) as ckpt:
            assert_same(dict(ckpt.iter_tensors()), tensors)
            assert_same({n: t.clone() for n, t in ckpt.iter_tensors(reuse_buffer=True)}, tensors)


def test_truncated_shard_errors(tmp_path: Path) -> None:
    out = save_state_dict({"a": torch.randn(100), "b": torch.randn(100)}, tmp_path / "out")
    shard = out / SINGLE_SHARD
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(out)
    shard.write_bytes(data[:20])
    with pytest.raises(CheckpointError):
        Checkpoint(out)


def test_reader_reads_safetensors_library_output(tmp_path: Path) -> None:
    tensors = sample_tensors()
    tensors["noncontig"] = tensors["noncontig"].contiguous()
    (tmp_path / "m").mkdir()
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    assert_same(read_all(tmp_path / "m"), tensors)
