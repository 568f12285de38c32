"""Corrupt safetensors files are refused at open, naming the file and the tensor; every dtype the
safetensors library writes round-trips bit-exactly."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from expertkit.errors import CheckpointError
from expertkit.weights._format import MAX_HEADER
from expertkit.weights.fingerprint import fingerprint
from expertkit.weights.reader import Checkpoint
from expertkit.weights.writer import SINGLE_SHARD, save_state_dict


def _file(header: dict | None, data: bytes, raw: bytes | None = None) -> bytes:
    blob = raw if raw is not None else json.dumps(header).encode()
    blob += b" " * ((-(8 + len(blob))) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


def _t(begin: int, end: int, shape: object = (2,), dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": [begin, end]}


Z8, Z16 = b"\0" * 8, b"\0" * 16
# (case, file bytes, text the error must contain)
CORRUPT = [
    ("bytes != numel * size", _file({"a": _t(0, 8), "w": _t(8, 20)}, b"\0" * 20), "'w'.*hold 12 bytes.*needs 8"),
    # the short read at the end of the file: 4 bytes given for a (2,) F32 tensor, nothing after it
    ("too few bytes at EOF", _file({"a": _t(0, 8), "w": _t(8, 12)}, b"\0" * 12), "'w'.*hold 4 bytes.*needs 8"),
    ("begin > end", _file({"w": _t(8, 0)}, Z8), "'w'.*end before they begin"),
    ("overlap", _file({"a": _t(0, 8), "w": _t(4, 12, (2,))}, b"\0" * 12), "'w'.*overlaps"),
    ("same bytes twice", _file({"a": _t(0, 8), "w": _t(0, 8)}, Z8), "'w'.*overlaps"),
    ("gap between tensors", _file({"a": _t(0, 8), "w": _t(12, 20)}, b"\0" * 20), "'w'.*gap at byte 8"),
    ("gap at the start", _file({"w": _t(4, 12)}, b"\0" * 12), "'w'.*gap at byte 0"),
    ("empty tensor inside another", _file({"a": _t(0, 8), "w": _t(4, 4, (0,))}, Z8), "'w'.*overlaps"),
    ("bytes after the last tensor", _file({"w": _t(0, 8)}, b"\0" * 12), "4 bytes after the last tensor.*'w'"),
    ("offsets past the end", _file({"a": _t(0, 8), "w": _t(8, 16)}, b"\0" * 12), "'w' ends at data byte 16.*truncated"),
    ("negative dimension", _file({"w": _t(0, 8, [-2])}, Z8), "'w'.*shape.*non-negative"),
    ("float dimension", _file({"w": _t(0, 8, [2.0])}, Z8), "'w'.*shape.*non-negative"),
    ("bool dimension", _file({"w": _t(0, 8, [True, True])}, Z8), "'w'.*shape.*non-negative"),
    ("string dimension", _file({"w": _t(0, 8, ["2"])}, Z8), "'w'.*shape.*non-negative"),
    ("shape not a list", _file({"w": _t(0, 8, 2)}, Z8), "'w'.*shape.*non-negative"),
    ("negative offset", _file({"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}, Z8),
     "'w'.*data_offsets"),
    ("three offsets", _file({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, Z8),
     "'w'.*data_offsets"),
    ("missing offsets", _file({"w": {"dtype": "F32", "shape": [2]}}, Z8), "'w'.*lacks data_offsets"),
    ("entry not an object", _file({"w": [1, 2]}, Z8), "'w'.*not an object"),
    ("unknown dtype", _file({"w": _t(0, 8, (2,), "F33")}, Z8), "'w'.*unknown dtype 'F33'"),
    ("lower-case dtype", _file({"w": _t(0, 8, (2,), "f32")}, Z8), "'w'.*unknown dtype 'f32'"),
    ("sub-byte size", _file({"w": _t(0, 2, (3,), "F4")}, b"\0" * 2), "'w'.*12 bits"),
    ("shape overflowing 64 bits", _file({"w": _t(0, 8, [2**40, 2**40])}, Z8), "'w'.*hold 8 bytes"),
    ("metadata value not a string", _file({"__metadata__": {"k": 1}, "w": _t(0, 8)}, Z8), "__metadata__"),
    ("metadata a list", _file({"__metadata__": ["k"], "w": _t(0, 8)}, Z8), "__metadata__"),
    ("header length past the end", struct.pack("<Q", 1000) + b"{}", "header length 1000 runs past"),
    ("header length too large", struct.pack("<Q", MAX_HEADER + 1) + b"{}", "over the safetensors limit"),
    ("header not JSON", _file(None, b"", raw=b'{"w": {'), "corrupt safetensors header"),
    ("header not UTF-8", _file(None, b"", raw=b'{"\xff": 1}'), "corrupt safetensors header"),
    ("header not an object", _file([1], b""), "not a JSON object"),
    ("trailing garbage", _file(None, Z8, raw=json.dumps({"w": _t(0, 8)}).encode() + b"xx"),
     "corrupt safetensors header"),
    ("shorter than 8 bytes", b"\0" * 5, "shorter than 8 bytes"),
]


@pytest.mark.parametrize(("case", "data", "message"), CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_file_refused_at_open(tmp_path: Path, case: str, data: bytes, message: str) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=message) as info:
        Checkpoint(path)
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(path)), text
    # the safetensors library refuses the same file: we match its rules, not looser ones
    with pytest.raises(SafetensorError):
        with safe_open(path, "pt") as fh:
            for key in fh.keys():
                fh.get_tensor(key)


def test_duplicate_name_refused_although_the_library_keeps_the_last(tmp_path: Path) -> None:
    entry = json.dumps(_t(0, 8))
    path = tmp_path / "m.safetensors"
    path.write_bytes(_file(None, Z8, raw=f'{{"w": {entry}, "w": {entry}}}'.encode()))
    with pytest.raises(CheckpointError, match="'w' appears twice"):
        Checkpoint(path)


@pytest.mark.parametrize("case", [
    ("empty tensors sharing an offset", {"a": _t(0, 0, (0,)), "b": _t(0, 0, (0, 3)), "c": _t(0, 8)}, Z8),
    ("empty tensor at the end", {"a": _t(0, 8), "b": _t(8, 8, (0,))}, Z8),
    ("null metadata and an unknown key", {"__metadata__": None, "a": {**_t(0, 8), "extra": 1}}, Z8),
    ("no tensors", {}, b""),
    ("offsets out of name order", {"b": _t(8, 16), "a": _t(0, 8)}, Z16),
], ids=lambda c: c[0])
def test_valid_edge_cases_accepted_as_the_library_accepts_them(tmp_path: Path, case: tuple) -> None:
    _, header, data = case
    path = tmp_path / "m.safetensors"
    path.write_bytes(_file(header, data))
    want = load_file(path)  # the library accepts it
    with Checkpoint(path) as ckpt:
        got = dict(ckpt.iter_tensors())
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].shape == t.shape and torch.equal(got[name], t), name


def _every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (2, 6, 8), generator=g, dtype=torch.uint8)  # (2, 6, 8) random bytes
    out = {}
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64,
                  torch.int64, torch.int32, torch.int16, torch.int8, torch.uint64, torch.uint32,
                  torch.uint16, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2,
                  torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu,
                  torch.float4_e2m1fn_x2):
        size = dtype.itemsize
        out[str(dtype).removeprefix("torch.")] = raw.reshape(2, -1).clone() \
            .view(dtype)  # arbitrary bit patterns, NaNs included
    out["bool"] = (raw[0, 0] % 2).bool()
    out["scalar_u64"] = torch.tensor(2**64 - 1, dtype=torch.uint64)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1).to(torch.uint8)


def test_every_dtype_the_library_writes_round_trips_bit_exactly(tmp_path: Path) -> None:
    tensors = _every_dtype()
    lib = tmp_path / "lib.safetensors"
    save_file(tensors, lib, metadata={"format": "pt"})
    with Checkpoint(lib) as ckpt:
        assert sorted(ckpt.names()) == sorted(tensors)
        for name, t in tensors.items():
            for got in (ckpt.read(name), ckpt.view(name)):
                assert got.dtype == t.dtype and got.shape == t.shape, name
                assert torch.equal(_bits(got), _bits(t)), name
        assert fingerprint(ckpt) == fingerprint(tensors)  # every dtype samples (float4 and complex too)
    # and back: expertkit writes them, the library reads them bit-exactly
    ours = save_state_dict(tensors, tmp_path / "ours") / SINGLE_SHARD
    back = load_file(ours)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(_bits(back[name]), _bits(t)), name


def test_dtype_without_torch_equivalent_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(_file({"w": _t(0, 3, (4,), "F6_E2M3")}, b"\0" * 3))
    with pytest.raises(CheckpointError, match="'w' is F6_E2M3, which torch cannot hold"):
        Checkpoint(path)


def test_truncated_file_is_refused_not_read(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(100), "z": torch.randn(50)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    data = path.read_bytes()
    for cut in (1, 150, 200 + 4):  # inside 'z', at its start, inside 'a'
        path.write_bytes(data[:-cut])
        with pytest.raises(CheckpointError, match="truncated"):
            Checkpoint(path)


def test_file_truncated_after_open_is_a_short_read(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(100), "b": torch.randn(10)}, path)
    data = path.read_bytes()
    with Checkpoint(path) as ckpt:
        path.write_bytes(data[:-8])  # same inode, now shorter
        assert ckpt.names()[-1] == "b"
        with pytest.raises(CheckpointError, match="short read of 'b'"):
            ckpt.read("b")


def test_index_naming_a_file_outside_the_folder_is_refused(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "outside.safetensors")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    with pytest.raises(CheckpointError, match="index.*'../outside.safetensors'.*not a file name"):
        Checkpoint(folder)
