"""Shared tensors and helpers of the reader and writer tests."""

from __future__ import annotations

from pathlib import Path

import torch

from expertkit.weights.reader import Checkpoint
from expertkit.weights.writer import ShardedWriter


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(7, 5, generator=g),
        "bf16": torch.randn(3, 11, generator=g).to(torch.bfloat16),
        "f16": torch.randn(13, generator=g).to(torch.float16),
        "f64": torch.randn(2, 3, 4, generator=g, dtype=torch.float64),
        "i64": torch.arange(-20, 17, dtype=torch.int64),
        "i32": torch.tensor([[1, -2], [3, 2**31 - 1]], dtype=torch.int32),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255, 7], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True, True, False]),
        "scalar_f32": torch.tensor(3.25),
        "scalar_i64": torch.tensor(-9, dtype=torch.int64),
        "empty": torch.empty(0, 4),
        "empty_bf16": torch.empty(3, 0, dtype=torch.bfloat16),
        "big": torch.randn(40, 10, generator=g),  # 1600 bytes: bigger than the shard size below
        "noncontig": torch.arange(24, dtype=torch.float32).reshape(4, 6).t(),
    }


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


def read_all(path: Path) -> dict[str, torch.Tensor]:
    with Checkpoint(path) as ckpt:
        return dict(ckpt.iter_tensors())


def write_ckpt(out: Path, tensors: dict[str, torch.Tensor], *, layout: bool, **kw) -> Path:
    lay = [(n, t.shape, t.dtype) for n, t in tensors.items()] if layout else None
    with ShardedWriter(out, layout=lay, **kw) as w:
        for name, t in tensors.items():
            w.add(name, t)
    return out


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())
