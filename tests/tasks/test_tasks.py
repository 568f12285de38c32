"""The task suite: registry, determinism, disjoint splits, example sanity, data sources."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

import pytest

from expertkit.errors import ConfigError, UnknownNameError
from expertkit.tasks import QUICKSTART_TASKS, SPLITS, TASKS, all_tasks, get_task
from expertkit.tasks import bbc, gsm8k
from expertkit.tasks.gym import split_of

TASK_NAMES = [t.name for t in all_tasks()]
SPLITS_OF = {name: [s for s in SPLITS if not (get_task(name).eval_only and s == "train")
                    and get_task(name).size.get(s) != 0] for name in TASK_NAMES}


def test_at_least_twelve_reasoning_gym_tasks_in_several_families():
    gym = [t for t in all_tasks() if t.source.startswith("reasoning-gym:")]
    assert len(gym) >= 12
    assert len({t.family for t in gym}) >= 8
    assert {"bbc_topic", "gsm8k"} <= set(TASK_NAMES)
    assert set(QUICKSTART_TASKS) <= set(TASK_NAMES)


def test_task_metadata_is_complete():
    for task in all_tasks():
        assert task.family and task.source and task.license and task.description, task.name
        assert task.kind in ("generate", "choice")
        assert set(task.size) == set(SPLITS)
        assert 1 <= task.max_new_tokens <= (256 if task.eval_only else 12), task.name


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_task_yields_n_valid_examples(name):
    task = get_task(name)
    for split in SPLITS_OF[name]:
        examples = task.examples(split, 12, seed=0)
        assert len(examples) == 12
        assert len({e.prompt for e in examples}) == 12, "examples repeat within a split"
        for ex in examples:
            assert ex.prompt.strip() and ex.answer.strip()
            assert task.format_prompt(ex).endswith(":"), "prompts end with 'Answer:' / 'Topic:'"
            assert task.target(ex) == " " + ex.answer
            if task.kind == "choice":
                assert ex.choices and ex.answer in ex.choices
            assert task.score(ex, task.target(ex)) == 1.0, (ex.prompt, ex.answer)
            assert task.score(ex, "") == 0.0


@pytest.mark.parametrize("name", TASK_NAMES)
def test_same_seed_same_examples_different_seed_different(name):
    task = get_task(name)
    split = "test"
    first = task.examples(split, 10, seed=3)
    again = task.examples(split, 10, seed=3)
    other = task.examples(split, 10, seed=4)
    assert first == again
    assert [e.prompt for e in first] != [e.prompt for e in other]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_splits_are_disjoint(name):
    task = get_task(name)
    prompts = {}
    for split in SPLITS_OF[name]:
        prompts[split] = {e.prompt for seed in (0, 1) for e in task.examples(split, 40, seed)}
    splits = list(prompts)
    for i, a in enumerate(splits):
        for b in splits[i + 1:]:
            assert not prompts[a] & prompts[b], (name, a, b)


def test_larger_n_extends_smaller_n():
    task = get_task("gcd")
    assert task.examples("train", 20, 0)[:5] == task.examples("train", 5, 0)


def test_generated_splits_follow_the_prompt_hash():
    for ex in get_task("add_sub").examples("validation", 30, 7):
        assert split_of("add_sub", ex.prompt) == "validation"


def test_examples_identical_across_processes_with_different_hash_seeds():
    code = ("import hashlib; from expertkit.tasks import all_tasks\n"
            "h = hashlib.sha256()\n"
            "for t in all_tasks():\n"
            "    for e in t.examples('test', 5, 11): h.update((e.prompt + '|' + e.answer).encode())\n"
            "print(h.hexdigest())")
    digests = set()
    for hash_seed in ("1", "2"):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                env={**os.environ, "PYTHONHASHSEED": hash_seed})
        digests.add(result.stdout.strip())
    assert len(digests) == 1


def test_unknown_task_suggests_the_nearest_name():
    with pytest.raises(UnknownNameError, match="Did you mean 'gcd'"):
        get_task("gdc")
    with pytest.raises(UnknownNameError, match="reverse_words"):
        get_task("reverse_word")


def test_unknown_split_and_negative_n_are_errors():
    with pytest.raises(UnknownNameError, match="split"):
        get_task("gcd").examples("dev", 3)
    with pytest.raises(ConfigError):
        get_task("gcd").examples("train", -1)


def test_gsm8k_refuses_train_and_validation():
    task = get_task("gsm8k")
    assert task.eval_only
    with pytest.raises(ConfigError, match="evaluation only"):
        task.examples("train", 3)
    with pytest.raises(ConfigError, match="test split only"):
        task.examples("validation", 3)


def test_gsm8k_data():
    problems = gsm8k.load_problems()
    assert len(problems) == gsm8k.TEST_SIZE == 1319
    first = problems[0]
    assert first.prompt.startswith("Question: Janet") and first.prompt.endswith("\nAnswer:")
    assert first.answer == "18"
    assert all(p.answer.lstrip("-").replace(".", "", 1).isdigit() for p in problems)
    with pytest.raises(ConfigError, match="1319"):
        get_task("gsm8k").examples("test", 2000)
    assert gsm8k.gold_number("so 1,200 dollars\n#### 1,200") == "1200"


def test_bbc_sizes_and_stratification():
    assert bbc.split_sizes() == get_task("bbc_topic").size == bbc.SIZES
    assert sum(bbc.SIZES.values()) == 2125  # 2,225 articles less 100 exact duplicates
    texts = [t for items in bbc.load_articles().values() for _, t in items]
    assert len(texts) == len(set(texts))
    examples = get_task("bbc_topic").examples("test", 100, 0)
    counts = {topic: sum(e.answer == topic for e in examples) for topic in bbc.TOPICS}
    assert all(15 <= c <= 25 for c in counts.values()), counts  # proportional, all topics present
    assert all(e.choices == bbc.TOPICS for e in examples)
    with pytest.raises(ConfigError, match="426"):
        get_task("bbc_topic").examples("test", 427)


def test_bbc_prompt_is_truncated_article():
    prompt = bbc.make_prompt("Headline here\n\n" + "word " * 100)
    assert prompt.endswith(" ...\nTopic:")
    assert len(prompt.split()) == bbc.PROMPT_WORDS + 2


def test_syllogism_labels_are_sound():
    from expertkit.tasks.logic import follows

    assert follows(["All a are b", "All b are c"], "All a are c")
    assert follows(["No a are b", "All c are b"], "No c are a")
    assert follows(["All a are b"], "Some b are a")  # existential import, as in reasoning-gym
    assert not follows(["All a are b", "Some b are c"], "Some a are c")  # undistributed middle
    assert not follows(["Some a are b", "Some b are c"], "Some a are c")
    answers = [e.answer for e in get_task("syllogism").examples("train", 200, 0)]
    assert 0.25 < answers.count("Yes") / len(answers) < 0.6


def test_registry_refuses_duplicate_task():
    from expertkit.errors import ExpertkitError
    from expertkit.tasks import register_task

    with pytest.raises(ExpertkitError, match="twice"):
        register_task(get_task("gcd"))
    assert "gcd" in TASKS


@pytest.mark.bundled
def test_prompts_and_answers_are_short_in_bundled_tokens():
    from transformers import AutoTokenizer

    from expertkit.models.bundled import ensure_bundled

    tokenizer = AutoTokenizer.from_pretrained(ensure_bundled("smollm2-135m"))  # honours EXPERTKIT_CACHE
    for task in all_tasks():
        examples = task.examples("test", 40, 0)
        lengths = [len(tokenizer(task.format_prompt(e))["input_ids"]) for e in examples]
        if not task.eval_only:  # GSM8K problems are long by nature (median about 66 tokens)
            assert statistics.median(lengths) < 64, (task.name, statistics.median(lengths))
        if task.kind == "generate" and not task.eval_only:
            answers = [len(tokenizer(task.target(e), add_special_tokens=False)["input_ids"]) for e in examples]
            assert max(answers) <= task.max_new_tokens, (task.name, max(answers))
