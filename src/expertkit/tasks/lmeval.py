"""Export a task split to lm-evaluation-harness's local-file task format.

:func:`export_lm_eval` writes, into ``out_dir``:

* ``<task>_<split>.jsonl``: one line per example, ``{"prompt", "answer"}`` plus, for choice
  tasks, ``"choices"`` (list) and ``"label"`` (index of the answer);
* ``expertkit_<task>.yaml``: an lm-eval (0.4.x) task config that reads that file through
  ``dataset_path: json`` and ``dataset_kwargs.data_files``.

Generation tasks use ``output_type: generate_until`` (stop at a newline, greedy, at most the
task's ``max_new_tokens``), a ``remove_whitespace`` + ``take_first`` filter (lm-eval appends
nothing between prompt and generation, and our answers follow a space) and ``exact_match``
ignoring case. GSM8K keeps lm-eval's usual answer-extraction regexes. Choice tasks use
``output_type: multiple_choice`` with ``doc_to_choice: choices`` and ``doc_to_target: label``;
lm-eval puts its default ``target_delimiter`` (a space) between prompt and choice, exactly like
:meth:`~expertkit.tasks.base.Task.target`; metrics ``acc`` and ``acc_norm``.

Run it with ``lm_eval --model hf --model_args pretrained=DIR --include_path OUT_DIR --tasks
expertkit_<task>``. lm-eval is a peer tool, never a runtime dependency of expertkit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from expertkit.errors import ConfigError
from expertkit.fileio import write_atomic
from expertkit.tasks.base import Example, Task, get_task

GSM8K_FILTERS = [
    {"name": "strict-match", "filter": [
        {"function": "regex", "regex_pattern": r"#### (\-?[0-9\.\,]+)"}, {"function": "take_first"}]},
    {"name": "flexible-extract", "filter": [
        {"function": "regex", "group_select": -1, "regex_pattern": r"(-?[$0-9.,]{2,})|(-?[0-9]+)"},
        {"function": "take_first"}]},
]



def example_record(task: Task, example: Example) -> dict[str, Any]:
    """The JSONL record of one example: prompt, answer and, for choice tasks, choices and label."""
    record: dict[str, Any] = {"prompt": task.format_prompt(example), "answer": example.answer}
    if task.kind == "choice":
        choices = list(example.choices or ())
        if example.answer not in choices:
            raise ConfigError(f"task '{task.name}': answer {example.answer!r} is not among its choices {choices}.")
        record["choices"] = choices
        record["label"] = choices.index(example.answer)
    return record


def task_config(task: Task, data_file: Path, split: str) -> dict[str, Any]:
    """The lm-eval task config (as a dict) for ``task`` reading ``data_file`` as ``split``."""
    config: dict[str, Any] = {
        "task": f"expertkit_{task.name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {split: str(data_file.resolve())}},
        "test_split": split,
        "doc_to_text": "prompt",
    }
    if task.kind == "choice":
        config.update({
            "output_type": "multiple_choice",
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            ],
        })
    else:
        until = ["Question:", "</s>", "<|im_end|>"] if task.name == "gsm8k" else ["\n"]
        config.update({
            "output_type": "generate_until",
            "doc_to_target": "answer",
            "generation_kwargs": {"until": until, "do_sample": False, "max_gen_toks": task.max_new_tokens},
            "filter_list": GSM8K_FILTERS if task.name == "gsm8k" else [
                {"name": "first-line", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": True, "ignore_punctuation": False}],
        })
    config["metadata"] = {"version": 1.0, "source": task.source, "license": task.license,
                          "description": task.description}
    return config


def export_lm_eval(task: Task | str, out_dir: str | Path, split: str = "test", n: int = 200, seed: int = 0) -> Path:
    """Write ``n`` examples of ``split`` (for ``seed``) as an lm-eval local task; return the YAML path.

    ``task`` is a :class:`~expertkit.tasks.base.Task` or a registered task name. ``out_dir`` is
    created if needed; existing files of the same task and split are replaced atomically.
    """
    task = get_task(task) if isinstance(task, str) else task
    if n <= 0:
        raise ConfigError(f"n must be positive, got {n}.")
    examples = task.examples(split, n, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_file = out / f"{task.name}_{split}.jsonl"
    lines = [json.dumps(example_record(task, ex), ensure_ascii=False) for ex in examples]
    write_atomic(data_file, "\n".join(lines) + "\n")
    yaml_file = out / f"expertkit_{task.name}.yaml"
    write_atomic(yaml_file, yaml.safe_dump(task_config(task, data_file, split), sort_keys=False, allow_unicode=True))
    return yaml_file
