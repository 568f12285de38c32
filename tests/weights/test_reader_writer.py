"""Round trips through ShardedWriter and Checkpoint, atomicity, and the pickle guard."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from expertkit.errors import CheckpointError, ConfigError, PickleRefusedError, UnknownNameError
from expertkit.weights.reader import Checkpoint
from expertkit.weights.writer import (
    INDEX_NAME,
    SINGLE_SHARD,
    TEMPLATE_FILES,
    ShardedWriter,
    parse_size,
    save_state_dict,
    shard_file_name,
)

from .rw_helpers import assert_same, read_all, siblings, sample_tensors, write_ckpt


# ----------------------------------------------------------------- round trips
@pytest.mark.parametrize("layout", [False, True])
def test_sharded_round_trip(tmp_path: Path, layout: bool) -> None:
    tensors = sample_tensors()
    out = write_ckpt(tmp_path / "out", tensors, layout=layout, max_shard_size=300)
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and INDEX_NAME in files
    assert files == sorted(shards + [INDEX_NAME])  # no spill or temp files left
    assert shards == [shard_file_name(i, len(shards)) for i in range(len(shards))]
    assert_same(read_all(out), tensors)
    # the safetensors library reads every shard, and the index is right
    index = json.loads((out / INDEX_NAME).read_text())
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_size"] == total
    assert sorted(index["weight_map"]) == sorted(tensors)
    loaded: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = load_file(out / shard)
        assert all(index["weight_map"][n] == shard for n in part)
        loaded.update(part)
        with safe_open(out / shard, "pt") as f:
            assert f.metadata()["format"] == "pt"
    assert_same(loaded, tensors)
    assert siblings(out) == ["out"]  # no temporary folder left


def test_shard_limits(tmp_path: Path) -> None:
    tensors = {"a": torch.zeros(25), "b": torch.zeros(25), "huge": torch.zeros(100), "c": torch.zeros(10)}
    out = write_ckpt(tmp_path / "o", tensors, layout=False, max_shard_size=200)
    wm = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    # a+b fill the first shard (200 bytes), huge (400 bytes) gets its own, c starts a new one
    assert wm == {"a": shard_file_name(0, 3), "b": shard_file_name(0, 3),
                  "huge": shard_file_name(1, 3), "c": shard_file_name(2, 3)}


def test_single_shard_has_no_index(tmp_path: Path) -> None:
    tensors = sample_tensors()
    out = save_state_dict(tensors, tmp_path / "one", metadata={"note": "hi"})
    assert sorted(p.name for p in out.iterdir()) == [SINGLE_SHARD]
    assert_same(load_file(out / SINGLE_SHARD), tensors)
    with Checkpoint(out) as ckpt:
        assert ckpt.metadata == {"format": "pt", "note": "hi"}


def test_layout_and_stream_give_identical_bytes(tmp_path: Path) -> None:
    tensors = sample_tensors()
    a = write_ckpt(tmp_path / "a", tensors, layout=False, max_shard_size=500)
    b = write_ckpt(tmp_path / "b", tensors, layout=True, max_shard_size=500)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_data_is_aligned(tmp_path: Path) -> None:
    tensors = {"flag": torch.tensor([True, False, True]), "w": torch.arange(5, dtype=torch.float64)}
    out = save_state_dict(tensors, tmp_path / "o")
    with Checkpoint(out) as ckpt:
        for info in ckpt.infos():
            assert info.offset % info.dtype.itemsize == 0, info


def test_layout_any_order(tmp_path: Path) -> None:
    tensors = sample_tensors()
    layout = [(n, t.shape, t.dtype) for n, t in tensors.items()]
    with ShardedWriter(tmp_path / "o", layout=layout, max_shard_size=300) as w:
        for name in reversed(list(tensors)):
            w.add(name, tensors[name])
    assert_same(read_all(tmp_path / "o"), tensors)


def test_progress_hook(tmp_path: Path) -> None:
    seen: list[str] = []
    save_state_dict({"x": torch.ones(2), "y": torch.zeros(3)}, tmp_path / "o", on_tensor=seen.append)
    assert seen == ["x", "y"]


# ----------------------------------------------------------------- atomicity
@pytest.mark.parametrize("layout", [False, True])
def test_exception_mid_write_leaves_nothing(tmp_path: Path, layout: bool) -> None:
    tensors = sample_tensors()
    lay = [(n, t.shape, t.dtype) for n, t in tensors.items()] if layout else None
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedWriter(tmp_path / "out", layout=lay, max_shard_size=300) as w:
            for i, (name, t) in enumerate(tensors.items()):
                if i == 6:
                    raise RuntimeError("boom")
                w.add(name, t)
    assert list(tmp_path.iterdir()) == []


def test_missing_layout_tensor_errors_and_leaves_nothing(tmp_path: Path) -> None:
    layout = [("a", (2,), torch.float32), ("b", (3,), torch.float32)]
    with pytest.raises(CheckpointError, match="never added"):
        with ShardedWriter(tmp_path / "out", layout=layout) as w:
            w.add("a", torch.ones(2))
    assert list(tmp_path.iterdir()) == []


def test_layout_mismatch_and_unknown_name(tmp_path: Path) -> None:
    w = ShardedWriter(tmp_path / "out", layout=[("a", (2,), torch.float32)])
    with pytest.raises(CheckpointError, match="layout declares"):
        w.add("a", torch.ones(3))
    with pytest.raises(UnknownNameError, match="Did you mean 'a'"):
        w.add("aa", torch.ones(2))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_duplicate_name_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="already added"):
        with ShardedWriter(tmp_path / "out") as w:
            w.add("x", torch.ones(2))
            w.add("x", torch.ones(2))
    with pytest.raises(CheckpointError, match="twice in the layout"):
        ShardedWriter(tmp_path / "out", layout=[("x", (1,), torch.float32)] * 2)
    assert list(tmp_path.iterdir()) == []


def test_no_tensors_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no tensors"):
        with ShardedWriter(tmp_path / "out"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_overwrite_semantics(tmp_path: Path) -> None:
    out = save_state_dict({"v": torch.tensor([1.0])}, tmp_path / "out")
    with pytest.raises(CheckpointError, match="exists.*overwrite=True"):
        ShardedWriter(out)
    # a failed overwrite keeps the old folder untouched
    with pytest.raises(RuntimeError):
        with ShardedWriter(out, overwrite=True) as w:
            w.add("v", torch.tensor([2.0]))
            raise RuntimeError("fail")
    assert torch.equal(load_file(out / SINGLE_SHARD)["v"], torch.tensor([1.0]))
    # the old folder stays in place until the new one is complete
    w = ShardedWriter(out, overwrite=True, max_shard_size=4)
    w.add("v", torch.tensor([3.0]))
    w.add("u", torch.tensor([4.0]))
    assert torch.equal(load_file(out / SINGLE_SHARD)["v"], torch.tensor([1.0]))
    assert w.finish() == out
    assert_same(read_all(out), {"v": torch.tensor([3.0]), "u": torch.tensor([4.0])})
    assert not (out / SINGLE_SHARD).exists()  # nothing stale from the old folder
    assert siblings(out) == ["out"]
    with pytest.raises(CheckpointError, match="finished"):
        w.add("z", torch.ones(1))


def test_template_files_copied(tmp_path: Path) -> None:
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    (tpl / "config.json").write_text('{"a": 1}')
    (tpl / "tokenizer.json").write_text("{}")
    (tpl / "model.safetensors").write_bytes(b"not copied")
    (tpl / "notes.txt").write_text("not copied")
    out = save_state_dict({"x": torch.ones(1)}, tmp_path / "out", template=tpl)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (out / "config.json").read_text() == '{"a": 1}'
    assert "config.json" in TEMPLATE_FILES and "merges.txt" in TEMPLATE_FILES
    with pytest.raises(CheckpointError, match="template"):
        ShardedWriter(tmp_path / "x", template=tmp_path / "nope")


@pytest.mark.parametrize(
    ("text", "value"),
    [(123, 123), ("500MB", 500 * 10**6), ("2GB", 2 * 10**9), ("1.5GiB", 3 * 2**29),
     ("10 kib", 10240), ("7", 7), ("64B", 64)],
)
def test_parse_size(text: int | str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "2XB", "GB", "-1MB", 0, -5, 1.5, True])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ConfigError):
        parse_size(bad)  # type: ignore[arg-type]


# ------------------------------------------------------------- transformers
def test_transformers_round_trip(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    src = tmp_path / "src"
    model.save_pretrained(src)
    with Checkpoint(src) as ckpt:
        layout = [(i.name, i.shape, i.dtype) for i in ckpt.infos()]
        with ShardedWriter(tmp_path / "dst", template=src, layout=layout, max_shard_size="20KB") as w:
            for name, t in ckpt.iter_tensors():
                w.add(name, t)
    dst = tmp_path / "dst"
    assert (dst / "config.json").exists() and (dst / INDEX_NAME).exists()
    assert len(list(dst.glob("*.safetensors"))) > 2
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        got = reloaded(ids).logits
    assert torch.equal(got, want)
    ref = model.state_dict()
    for name, t in reloaded.state_dict().items():
        assert torch.equal(t, ref[name]), name


def test_rewrite_in_place_from_reader_infos(tmp_path: Path) -> None:
    tensors = sample_tensors()
    out = write_ckpt(tmp_path / "m", tensors, layout=False, max_shard_size=300)
    (out / "config.json").write_text("{}")
    with Checkpoint(out) as ckpt:  # read the old folder while its replacement is written
        with ShardedWriter(out, layout=ckpt.infos(), template=out, overwrite=True, max_shard_size="1MB") as w:
            for name in ckpt.names():
                w.add(name, ckpt.read(name))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", SINGLE_SHARD]
    assert_same(load_file(out / SINGLE_SHARD), tensors)
    assert siblings(out) == ["m"]


def test_stream_mode_without_copy_file_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(*a: object) -> int:
        raise OSError(38, "copy_file_range not supported")

    monkeypatch.setattr("expertkit.weights.writer.os.copy_file_range", unsupported)
    tensors = sample_tensors()
    out = write_ckpt(tmp_path / "out", tensors, layout=False, max_shard_size=300)
    assert_same(read_all(out), tensors)


def test_abandoned_writer_cleans_up(tmp_path: Path) -> None:
    w = ShardedWriter(tmp_path / "out")
    w.add("x", torch.ones(3))
    assert len(list(tmp_path.iterdir())) == 1  # the hidden temporary folder
    del w
    import gc

    gc.collect()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layout", [False, True])
def test_shards_are_not_executable(tmp_path: Path, layout: bool) -> None:
    out = write_ckpt(tmp_path / "out", sample_tensors(), layout=layout, max_shard_size=300)
    for p in out.iterdir():
        assert p.stat().st_mode & 0o111 == 0, p.name


def test_full_disk_fails_at_the_start_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes
    import errno

    from expertkit.weights import _shardio

    calls: list[int] = []

    def no_space(fd: int, mode: int, offset: int, size: int) -> int:
        calls.append(size)
        ctypes.set_errno(errno.ENOSPC)
        return -1

    monkeypatch.setattr(_shardio, "_FALLOCATE", no_space)
    layout = [("a", (1000,), torch.float32)]
    with pytest.raises(OSError, match="cannot allocate 4[0-9]{3} bytes: No space left") as info:
        ShardedWriter(tmp_path / "out", layout=layout)
    assert info.value.errno == errno.ENOSPC and calls  # refused before any tensor was written
    assert list(tmp_path.iterdir()) == []


def test_unsupported_preallocation_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes
    import errno

    from expertkit.weights import _shardio

    def unsupported(fd: int, mode: int, offset: int, size: int) -> int:
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(_shardio, "_FALLOCATE", unsupported)
    tensors = sample_tensors()
    assert_same(read_all(write_ckpt(tmp_path / "out", tensors, layout=True, max_shard_size=300)), tensors)


@pytest.mark.parametrize("layout", [False, True])
def test_background_fsync_failure_fails_the_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  layout: bool) -> None:
    import threading

    from expertkit.weights import _shardio

    real_fsync = os.fsync
    threads: set[str] = set()

    def failing_fsync(fd: int) -> None:
        threads.add(threading.current_thread().name)
        if threading.current_thread() is not threading.main_thread():
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(_shardio.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        write_ckpt(tmp_path / "out", sample_tensors(), layout=layout, max_shard_size=300)
    assert any(n.startswith("expertkit-fsync") for n in threads)  # shards were flushed in the background
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- file-to-file copies
@pytest.mark.parametrize("layout", [False, True])
@pytest.mark.parametrize("kernel_copy", [True, False])
def test_add_from_copies_tensors_file_to_file_without_reading_them(tmp_path: Path, layout: bool, kernel_copy: bool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = sample_tensors()
    src = write_ckpt(tmp_path / "src", tensors, layout=False, max_shard_size=300)  # several source shards
    if not kernel_copy:  # the pread / pwrite fallback gives the same bytes
        def unsupported(*a: object) -> int:
            raise OSError(38, "copy_file_range not supported")
        monkeypatch.setattr("expertkit.weights._shardio.os.copy_file_range", unsupported)
    with Checkpoint(src) as ckpt:
        def no_read(*a: object, **k: object) -> None:
            raise AssertionError("add_from read a tensor into memory")
        monkeypatch.setattr(ckpt, "read", no_read)
        names = list(reversed(ckpt.names()))  # any order
        lay = [("copy." + n, ckpt.info(n).shape, ckpt.info(n).dtype) for n in names] if layout else None
        with ShardedWriter(tmp_path / "out", layout=lay, max_shard_size=500) as w:
            for n in names:
                w.add_from("copy." + n, ckpt, n)
    assert_same(read_all(tmp_path / "out"), {"copy." + n: t for n, t in tensors.items()})
    loaded: dict[str, torch.Tensor] = {}  # and the safetensors library reads what was copied
    for shard in (tmp_path / "out").glob("*.safetensors"):
        loaded.update(load_file(shard))
    assert_same(loaded, {"copy." + n: t for n, t in tensors.items()})


def test_add_from_checks_names_and_reads_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    want = {"a": torch.arange(6.0).reshape(2, 3)}
    torch.save(want, folder / "pytorch_model.bin")
    with Checkpoint(folder, allow_pickle=True) as ckpt:
        assert ckpt.file_range("a") is None  # no bytes on disk to copy: read and added instead
        with ShardedWriter(tmp_path / "out") as w:
            w.add_from("a", ckpt)
        with pytest.raises(CheckpointError, match="already added"), ShardedWriter(tmp_path / "dup") as w:
            w.add_from("a", ckpt)
            w.add_from("a", ckpt)
        with pytest.raises(UnknownNameError), ShardedWriter(tmp_path / "lay", layout=[("b", (2, 3), torch.float32)]) as w:
            w.add_from("a", ckpt)
    assert_same(read_all(tmp_path / "out"), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "pickled"]  # the failed writers left nothing
