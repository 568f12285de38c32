"""Atomic writes leave the old file or the new one, never a half-written one."""

from __future__ import annotations

import hashlib

import pytest

from expertkit import fileio


def test_write_atomic_replaces_and_cleans(tmp_path):
    target = tmp_path / "sub" / "a.json"
    fileio.write_atomic(target, "one")
    fileio.write_atomic(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_write_atomic_failure_keeps_old(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    fileio.write_atomic(target, "old")

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        fileio.write_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_sha256_file(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"abc" * 1000)
    assert fileio.sha256_file(path) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_install_folder_replaces_only_when_complete(tmp_path):
    from expertkit.fileio import install_folder

    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    tmp = tmp_path / ".out.tmp-1"
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    install_folder(tmp, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old folder left


def test_write_atomic_bytes_with_owner_only_mode(tmp_path):
    import stat

    from expertkit.fileio import write_atomic

    path = tmp_path / "secret.key"
    write_atomic(path, b"\x00\x01key", mode=0o600)
    assert path.read_bytes() == b"\x00\x01key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]


def test_human_bytes():
    from expertkit.fileio import human_bytes

    assert [human_bytes(n) for n in (0, 999, 1000, 4_001_792, 2.5e9, 3e12)] == \
        ["0 B", "999 B", "1.0 KB", "4.0 MB", "2.5 GB", "3.0 TB"]


def test_install_folder_failed_rename_restores_the_old_folder(tmp_path, monkeypatch):
    from expertkit.fileio import install_folder, temp_sibling

    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    tmp = temp_sibling(dest)
    (tmp / "new.txt").write_text("new")
    real = fileio.os.replace

    def refuse_install(src, dst):
        if str(src) == str(tmp):
            raise OSError("read-only file system")
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", refuse_install)
    with pytest.raises(OSError, match="read-only"):
        install_folder(tmp, dest)
    assert (dest / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [tmp.name, "out"]  # no .old- folder left


def test_temp_sibling_refuses_odd_kinds(tmp_path):
    from expertkit.fileio import temp_sibling

    with pytest.raises(ValueError, match="lower-case"):
        temp_sibling(tmp_path / "out", "tmp-1")
    assert list(tmp_path.iterdir()) == []


def test_files_and_folders_get_the_usual_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        fileio.write_atomic(tmp_path / "a.txt", "x")
        with fileio.staged_folder(tmp_path / "model") as tmp:
            (tmp / "w.bin").write_bytes(b"1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644  # mkstemp alone gives 0600
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755  # mkdtemp alone gives 0700


def test_umask_is_read_without_changing_it():
    import os

    old = os.umask(0o027)
    try:
        assert fileio.umask() == 0o027
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(old)


def test_writing_names_the_path_in_errors_that_do_not(tmp_path):
    import errno

    with pytest.raises(OSError) as info, fileio.writing(tmp_path / "out"):
        raise OSError(errno.EFBIG, "File too large")  # what a write() under a file-size limit raises
    assert info.value.errno == errno.EFBIG and info.value.filename == str(tmp_path / "out")

    class SafetensorError(Exception):  # safetensors' Rust I/O errors carry only the OS code
        pass

    with pytest.raises(OSError) as info, fileio.writing(tmp_path / "w.safetensors"):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError) as named, fileio.writing(tmp_path / "out"):
        open(tmp_path / "missing" / "x")  # noqa: SIM115 - already names its file: unchanged
    assert named.value.filename == str(tmp_path / "missing" / "x")


def test_failed_staged_folder_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), fileio.staged_folder(tmp_path / "a" / "b" / "model") as tmp:
        (tmp / "half.bin").write_bytes(b"1")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []  # no temporary folder, no parents made for it


def test_check_writable_finds_a_parent_that_is_a_file(tmp_path):
    import errno

    (tmp_path / "file").write_text("x")
    fileio.check_writable(tmp_path / "new" / "deeper" / "out")  # missing parents are fine
    with pytest.raises(NotADirectoryError) as info:
        fileio.check_writable(tmp_path / "file" / "deeper" / "out")
    assert info.value.errno == errno.ENOTDIR and info.value.filename == str(tmp_path / "file" / "deeper" / "out")
