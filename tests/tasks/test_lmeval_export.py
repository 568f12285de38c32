"""lm-eval export: YAML parses, the fields lm-eval needs are there, JSONL matches the examples."""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import shutil
import stat
import subprocess
import sys

import pytest
import yaml

from expertkit.errors import ConfigError
from expertkit.tasks import export_lm_eval, get_task


class TaskLoader(yaml.SafeLoader):
    """Reads lm-eval task YAML: ``!function x.y`` becomes the string ``!function x.y``."""


TaskLoader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))


def read(path):
    return yaml.load(path.read_text(), Loader=TaskLoader)  # noqa: S506 - a SafeLoader subclass


def test_generate_task_export(tmp_path):
    path = export_lm_eval("reverse_words", tmp_path, split="validation", n=7, seed=2)
    assert path == tmp_path / "expertkit_reverse_words.yaml"
    cfg = read(path)
    assert cfg["task"] == "expertkit_reverse_words"
    assert cfg["custom_dataset"] == "!function expertkit_lmeval_data.load" and cfg["test_split"] == "validation"
    data = tmp_path / "reverse_words_validation.jsonl"
    assert cfg["dataset_kwargs"]["data_files"] == {"validation": "reverse_words_validation.jsonl"}
    assert str(tmp_path) not in path.read_text()  # relocatable: no absolute path
    assert cfg["output_type"] == "generate_until"
    assert cfg["doc_to_text"] == "prompt" and cfg["doc_to_target"] == "answer"
    assert cfg["generation_kwargs"]["until"] == ["\n"]
    assert cfg["generation_kwargs"]["max_gen_toks"] == get_task("reverse_words").max_new_tokens
    assert cfg["metric_list"][0]["metric"] == "exact_match"
    assert cfg["filter_list"][0]["filter"][0]["function"] == "remove_whitespace"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    examples = get_task("reverse_words").examples("validation", 7, 2)
    assert rows == [{"prompt": e.prompt, "answer": e.answer} for e in examples]


def test_choice_task_export(tmp_path):
    path = export_lm_eval(get_task("bbc_topic"), tmp_path / "out", n=10)
    cfg = read(path)
    assert cfg["output_type"] == "multiple_choice"
    assert cfg["doc_to_choice"] == "choices" and cfg["doc_to_target"] == "label"
    assert {m["metric"] for m in cfg["metric_list"]} == {"acc", "acc_norm"}
    assert "generation_kwargs" not in cfg
    rows = [json.loads(line) for line in (tmp_path / "out" / "bbc_topic_test.jsonl").read_text().splitlines()]
    assert len(rows) == 10
    for row, ex in zip(rows, get_task("bbc_topic").examples("test", 10, 0)):
        assert row["prompt"] == ex.prompt and row["choices"][row["label"]] == ex.answer == row["answer"]


def test_gsm8k_export_uses_answer_extraction(tmp_path):
    cfg = read(export_lm_eval("gsm8k", tmp_path, n=3))
    assert {f["name"] for f in cfg["filter_list"]} == {"strict-match", "flexible-extract"}
    assert cfg["generation_kwargs"]["max_gen_toks"] == get_task("gsm8k").max_new_tokens


def test_export_refuses_bad_requests_and_leaves_no_files(tmp_path):
    with pytest.raises(ConfigError):
        export_lm_eval("gsm8k", tmp_path / "a", split="train", n=3)
    with pytest.raises(ConfigError):
        export_lm_eval("gcd", tmp_path / "b", n=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    export_lm_eval("gcd", tmp_path, n=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expertkit_gcd.yaml", "expertkit_lmeval_data.py",
                                                          "gcd_test.jsonl"]


def test_export_is_readable_by_others_as_the_umask_allows(tmp_path):
    old = os.umask(0o022)
    try:
        export_lm_eval("gcd", tmp_path / "new" / "tasks", n=2)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new" / "tasks").stat().st_mode) == 0o755
    for name in ("expertkit_gcd.yaml", "gcd_test.jsonl", "expertkit_lmeval_data.py"):
        assert stat.S_IMODE((tmp_path / "new" / "tasks" / name).stat().st_mode) == 0o644, name
    old = os.umask(0o077)
    try:
        export_lm_eval("gcd", tmp_path / "private", n=2)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private" / "gcd_test.jsonl").stat().st_mode) == 0o600


def test_moved_export_loads_from_another_directory(tmp_path, monkeypatch):
    """The loader the YAML names finds the data beside itself wherever the folder goes."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    export_lm_eval("bbc_topic", tmp_path / "first", n=4, seed=3)
    moved = shutil.move(tmp_path / "first", tmp_path / "moved")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = read(moved / "expertkit_bbc_topic.yaml")
    module, func = cfg["custom_dataset"].removeprefix("!function ").rsplit(".", 1)
    spec = importlib.util.spec_from_file_location(module, moved / f"{module}.py")  # as lm-eval resolves it
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    data = getattr(loader, func)(**cfg["metadata"], **cfg["dataset_kwargs"])  # lm-eval's call
    rows = list(data["test"])
    examples = get_task("bbc_topic").examples("test", 4, 3)
    assert [r["prompt"] for r in rows] == [get_task("bbc_topic").format_prompt(e) for e in examples]
    assert [r["choices"][r["label"]] for r in rows] == [e.answer for e in examples]


@pytest.mark.peers
def test_lm_eval_reads_a_moved_export(tmp_path, monkeypatch):
    """lm-eval 0.4.13 itself: its task manager finds the moved task and reads its documents."""
    lm_eval_tasks = pytest.importorskip("lm_eval.tasks")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    export_lm_eval("gcd", tmp_path / "first", n=5)
    moved = shutil.move(tmp_path / "first", tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    manager = lm_eval_tasks.TaskManager(include_path=str(moved))
    task = lm_eval_tasks.get_task_dict(["expertkit_gcd"], manager)["expertkit_gcd"]
    docs = list(task.test_docs())
    examples = get_task("gcd").examples("test", 5, 0)
    assert [task.doc_to_text(d) for d in docs] == [get_task("gcd").format_prompt(e) for e in examples]
    assert [task.doc_to_target(d) for d in docs] == [e.answer for e in examples]


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_export_over_the_file_size_limit_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "tasks"
    proc = subprocess.run([sys.executable, "-m", "expertkit.cli.main", "tasks", "export", "gcd", str(out), "-n", "300"],
                          capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "File too large" in lines[0] and str(out / "gcd_test.jsonl") in lines[0] and "ulimit -f" in lines[0]
    assert not (tmp_path / "new").exists()


def test_export_under_a_file_is_one_line(tmp_path, cli):
    (tmp_path / "file").write_text("x")
    code, _, err = cli(["tasks", "export", "gcd", str(tmp_path / "file" / "out"), "-n", "2"])
    assert code == 2 and "Not a directory" in err and str(tmp_path / "file" / "out") in err
    assert len(err.strip().splitlines()) == 1
