"""Export a task split to lm-evaluation-harness's local-file task format.

:func:`export_lm_eval` writes, into ``out_dir``:

* ``<task>_<split>.jsonl``: one line per example, ``{"prompt", "answer"}`` plus, for choice
  tasks, ``"choices"`` (list) and ``"label"`` (index of the answer);
* ``expertkit_<task>.yaml``: an lm-eval (0.4.x) task config that reads that file;
* ``expertkit_lmeval_data.py``: the loader the YAML names (``custom_dataset: !function
  expertkit_lmeval_data.load``), which opens the data files next to itself.

The export is relocatable: no absolute path is written. lm-eval 0.4.13 hands ``data_files`` to
``datasets.load_dataset`` unchanged, so a relative path there would be read from the current
directory; a ``!function`` reference, however, is resolved next to the YAML file, so the loader
finds the JSONL files wherever the folder is moved. Files are written 0644 (less the umask).

Generation tasks use ``output_type: generate_until`` (stop at a newline, greedy, at most the
task's ``max_new_tokens``), a ``remove_whitespace`` + ``take_first`` filter (lm-eval appends
nothing between prompt and generation, and our answers follow a space) and ``exact_match``
ignoring case. GSM8K keeps lm-eval's usual answer-extraction regexes. Choice tasks use
``output_type: multiple_choice`` with ``doc_to_choice: choices`` and ``doc_to_target: label``;
lm-eval puts its default ``target_delimiter`` (a space) between prompt and choice, exactly like
:meth:`~expertkit.tasks.base.Task.target`; metrics ``acc`` and ``acc_norm``.

Run it with ``lm_eval --model hf --model_args pretrained=DIR --include_path OUT_DIR --tasks
expertkit_<task>`` from any directory. lm-eval is a peer tool, never a runtime dependency of expertkit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from expertkit.errors import ConfigError
from expertkit.fileio import new_folders, write_atomic
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


#: the loader module written beside the task YAML files (see the module docstring)
LOADER_MODULE = "expertkit_lmeval_data"
LOADER_SOURCE = '''"""Loads the data of tasks written by `expertkit tasks export`, from the folder of this file.

lm-eval resolves `custom_dataset: !function expertkit_lmeval_data.load` next to the task YAML
and calls it with the task's dataset_kwargs (and metadata): the data file names are relative
to this folder, so the export can be moved or shared.
"""

from pathlib import Path


def load(data_files, **metadata):
    """The task's splits as a datasets.DatasetDict, read from the JSONL files beside this file."""
    import datasets

    here = Path(__file__).resolve().parent
    return datasets.load_dataset("json", data_files={split: str(here / name) for split, name in data_files.items()})
'''


class FunctionRef(str):
    """A ``!function module.name`` reference of an lm-eval task YAML."""


class _TaskDumper(yaml.SafeDumper):
    """Safe YAML dumper that writes :class:`FunctionRef` values with lm-eval's ``!function`` tag."""


_TaskDumper.add_representer(FunctionRef, lambda dumper, ref: dumper.represent_scalar("!function", str(ref)))


def task_config(task: Task, data_file: Path, split: str) -> dict[str, Any]:
    """The lm-eval task config (as a dict) for ``task`` reading ``data_file`` (found beside the
    YAML by its name) as ``split``."""
    config: dict[str, Any] = {
        "task": f"expertkit_{task.name}",
        "custom_dataset": FunctionRef(f"{LOADER_MODULE}.load"),
        "dataset_kwargs": {"data_files": {split: data_file.name}},
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
    lines = [json.dumps(example_record(task, ex), ensure_ascii=False) for ex in examples]
    out = Path(out_dir)
    data_file, yaml_file = out / f"{task.name}_{split}.jsonl", out / f"expertkit_{task.name}.yaml"
    files = {
        data_file: "\n".join(lines) + "\n",
        out / f"{LOADER_MODULE}.py": LOADER_SOURCE,
        yaml_file: yaml.dump(task_config(task, data_file, split), Dumper=_TaskDumper, sort_keys=False,
                             allow_unicode=True),
    }
    with new_folders(out):
        fresh = [path for path in files if not path.exists()]
        try:
            for path, text in files.items():
                write_atomic(path, text)
        except BaseException:
            for path in fresh:  # a failed export leaves none of its new files behind
                path.unlink(missing_ok=True)
            raise
    return yaml_file
