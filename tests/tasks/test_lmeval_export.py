"""lm-eval export: YAML parses, the fields lm-eval needs are there, JSONL matches the examples."""

from __future__ import annotations

import json

import pytest
import yaml

from expertkit.errors import ConfigError
from expertkit.tasks import export_lm_eval, get_task


def read(path):
    return yaml.safe_load(path.read_text())


def test_generate_task_export(tmp_path):
    path = export_lm_eval("reverse_words", tmp_path, split="validation", n=7, seed=2)
    assert path == tmp_path / "expertkit_reverse_words.yaml"
    cfg = read(path)
    assert cfg["task"] == "expertkit_reverse_words"
    assert cfg["dataset_path"] == "json" and cfg["test_split"] == "validation"
    data = tmp_path / "reverse_words_validation.jsonl"
    assert cfg["dataset_kwargs"]["data_files"] == {"validation": str(data.resolve())}
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expertkit_gcd.yaml", "gcd_test.jsonl"]
