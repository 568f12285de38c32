"""A write killed with SIGKILL leaves its hidden temporary folder; the next write to the same place
removes it and says so, and never touches the folder of a writer that is still alive."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import expertkit
from expertkit import fileio
from expertkit.weights.reader import Checkpoint
from expertkit.weights.writer import ShardedWriter, save_state_dict

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")

_WRITER = """
import sys, torch
from expertkit.weights.writer import ShardedWriter
w = ShardedWriter(sys.argv[1], layout=[("a", (1_000_000,), torch.float32), ("b", (4,), torch.float32)])
w.add("a", torch.ones(1_000_000))  # 4 MB written, 'b' never comes
print("ready", flush=True)
sys.stdin.read()  # hold the folder until killed (or until stdin closes)
"""


def _children(tmp_path: Path, out: Path, n: int) -> list[subprocess.Popen[str]]:
    """``n`` writer processes (started together), each holding a half-written folder for ``out``."""
    env = {**os.environ, "PYTHONPATH": str(Path(expertkit.__file__).parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path) for _ in range(n)]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return procs


def _hidden(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))


def test_killed_writer_folder_is_swept_live_one_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    dead, live = _children(tmp_path, out, 2)
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        left = _hidden(tmp_path)
        assert len(left) == 2 and all(n.startswith(".out.tmp-") for n in left)
        dead_folder = next(n for n in left if n.startswith(f".out.tmp-{dead.pid}-"))
        live_folder = next(n for n in left if n.startswith(f".out.tmp-{live.pid}-"))
        capsys.readouterr()
        save_state_dict({"x": torch.arange(3.0)}, out)  # the next write to the same place
        notice = capsys.readouterr().err
        assert _hidden(tmp_path) == [live_folder]  # the live writer's folder is untouched
        assert notice.count("\n") == 1 and dead_folder in notice and live_folder not in notice
        assert "removed 1 temporary folder" in notice and "4.0 MB freed" in notice, notice
        with Checkpoint(out) as ckpt:
            assert torch.equal(ckpt.read("x"), torch.arange(3.0))
    finally:
        live.kill()
        live.wait()
    # once the other writer is dead too, the next write sweeps its folder as well
    save_state_dict({"x": torch.ones(1)}, out, overwrite=True)
    assert _hidden(tmp_path) == []
    assert "4.0 MB freed" in capsys.readouterr().err


def _fake(tmp_path: Path, dest: str, kind: str, owner: str) -> Path:
    path = tmp_path / f".{dest}.{kind}-{owner}-0123abcd"
    path.mkdir()
    (path / "data").write_bytes(b"\0" * 8192)
    return path


def test_owner_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pid, host = os.getpid(), fileio.owner_tag().split("-")[2]
    start = int(fileio.owner_tag().split("-")[1])
    ppid = os.getppid()
    parent_start = int(Path(f"/proc/{ppid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    mine = _fake(tmp_path, "m", "tmp", f"{pid}-{start}-{host}")  # this process: alive
    parent = _fake(tmp_path, "m", "template", f"{ppid}-{parent_start}-{host}")  # alive
    reused = _fake(tmp_path, "m", "tmp", f"{ppid}-{parent_start + 1}-{host}")  # same pid, another process
    earlier_me = _fake(tmp_path, "m", "tmp", f"{pid}-{start - 1}-{host}")  # our pid, an earlier process
    elsewhere = _fake(tmp_path, "m", "tmp", f"1-0-{'0' * 8 if host != '0' * 8 else '1' * 8}")  # other boot
    other_dest = _fake(tmp_path, "mm", "tmp", f"{ppid}-{parent_start + 1}-{host}")  # not ours to sweep
    removed = fileio.sweep_stale(tmp_path / "m")
    assert sorted(p.name for p, _ in removed) == sorted([reused.name, earlier_me.name])
    assert all(size >= 8192 for _, size in removed)
    for kept in (mine, parent, elsewhere, other_dest):
        assert kept.is_dir(), kept.name
    assert "removed 2 temporary folder(s)" in capsys.readouterr().err


def test_old_folder_of_a_killed_replace_is_kept_until_the_output_exists(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host = fileio.owner_tag().split("-")[2]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    old = _fake(tmp_path, "m", "old", f"{int(dead.stdout)}-1-{host}")
    assert fileio.sweep_stale(tmp_path / "m") == [] and old.is_dir()  # the only copy of 'm': kept
    err = capsys.readouterr().err
    assert f"kept {old.name}" in err and "rename it to m" in err
    (tmp_path / "m").mkdir()
    assert [p for p, _ in fileio.sweep_stale(tmp_path / "m")] == [old]  # superseded now: removed


def test_temp_names_carry_the_owner(tmp_path: Path) -> None:
    w = ShardedWriter(tmp_path / "out")
    try:
        pid, start, host, rand = w.tmp_dir.name.removeprefix(".out.tmp-").split("-")
        assert int(pid) == os.getpid() and len(host) == 8 and len(rand) == 8
        assert int(start) == int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        assert fileio.sweep_stale(tmp_path / "out") == [] and w.tmp_dir.is_dir()
    finally:
        w.abort()
    assert list(tmp_path.iterdir()) == []
