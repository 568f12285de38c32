"""Scorers on hand-made cases: correct, correct + trailing junk, wrong, numeric forms, empty."""

from __future__ import annotations

import pytest

from expertkit.tasks import Example, get_task
from expertkit.tasks.scoring import (
    final_number,
    first_line,
    list_scorer,
    normalize,
    split_list,
    numeric_scorer,
    text_scorer,
    word_scorer,
)


def ex(answer: str, **meta) -> Example:
    return Example(prompt="Q\nAnswer:", answer=answer, meta=meta)


def test_helpers():
    assert first_line("  7\nQuestion: 8") == "7"
    assert normalize(' "Hello  World." ') == "hello world"
    assert split_list("['a', 'B']") == ["a", "B"]
    assert split_list("7 16 26") == ["7", "16", "26"]


@pytest.mark.parametrize("prediction,score", [
    (" 7", 1.0), ("7.0", 1.0), (" 7.00\nQuestion: what is 2+2?\nAnswer: 4", 1.0), (" 7 apples", 1.0),
    (" The answer is 7.", 1.0), (" 8", 0.0), ("", 0.0), ("   \n7", 1.0), (" seven", 0.0), (" 77", 0.0),
])
def test_numeric(prediction, score):
    assert numeric_scorer()(ex("7"), prediction) == score


def test_numeric_negative_and_decimal():
    assert numeric_scorer()(ex("-4"), " -4, because") == 1.0
    assert numeric_scorer()(ex("-4"), " 4") == 0.0
    assert numeric_scorer()(ex("0.5"), " .5") == 1.0


@pytest.mark.parametrize("prediction,score", [
    (" Yes", 1.0), (" yes.", 1.0), (" Yes, because all A are B", 1.0), (" Yes\nNo", 1.0),
    (" No", 0.0), (" Yesterday", 0.0), ("", 0.0),
])
def test_word(prediction, score):
    assert word_scorer()(ex("Yes"), prediction) == score


def test_word_case_sensitive_and_hyphens():
    assert word_scorer(casefold=False)(ex("aremiD"), " aremiD and more") == 1.0
    assert word_scorer(casefold=False)(ex("aremiD"), " aremid") == 0.0
    assert word_scorer()(ex("mother-in-law"), " mother-in-law.") == 1.0
    assert word_scorer()(ex("mother-in-law"), " mother") == 0.0


@pytest.mark.parametrize("prediction,score", [
    (" told, rules, century", 1.0), (" Told, Rules, Century.", 1.0), (" [told, rules, century]", 1.0),
    (" ['told', 'rules', 'century']", 1.0), (" told, rules, century\nSort these words: a, b", 1.0),
    (" told, century, rules", 0.0), (" told, rules", 0.0), (" told, rules, century, extra", 0.0), ("", 0.0),
])
def test_list_text(prediction, score):
    assert list_scorer()(ex("told, rules, century"), prediction) == score


def test_list_numeric():
    scorer = list_scorer(numeric=True)
    assert scorer(ex("7, 16, 26"), " 7.0, 16, 26.0") == 1.0
    assert scorer(ex("7, 16, 26"), " 7, 16, 26\n\nNext") == 1.0
    assert scorer(ex("7, 16, 26"), " 7 16 26") == 1.0  # space-separated is read as a list too
    assert scorer(ex("7, 16, 26"), " 16, 7, 26") == 0.0
    assert scorer(ex("7, 16, 26"), " 7, 16, x") == 0.0


def test_text():
    assert text_scorer()(ex("HELLO WORLD"), " hello world.\nmore") == 1.0
    assert text_scorer()(ex("HELLO WORLD"), " hello world again") == 0.0
    assert text_scorer()(ex("HELLO WORLD"), "") == 0.0


def test_gsm8k_final_number():
    assert final_number("She sells 9 eggs.\n9 * 2 = 18\n#### 18") == 18
    assert final_number("#### 1,200 dollars") == 1200
    assert final_number(" 16 - 3 - 4 = 9, so 9 * 2 = 18.\nQuestion: A robe takes 2 bolts") == 18
    assert final_number(" The answer is $18. Next we compute 3 + 4 = 7") == 18
    assert final_number("no numbers here") is None
    task = get_task("gsm8k")
    gold = Example("Question: q\nAnswer:", "18")
    assert task.score(gold, " 18") == 1.0 and task.score(gold, " 18.0") == 1.0
    assert task.score(gold, " 17") == 0.0 and task.score(gold, "") == 0.0


def test_task_scorers_accept_trailing_junk():
    cases = {
        "add_sub": (" 171\nQuestion: What is 2 + 2?", " 170"),
        "reverse_words": (" cannot, as, his, the\n\nReverse", " the, his, as, cannot"),
        "spell_backward": (" derot is the word", " toder"),
        "syllogism": (" Yes, it follows.", " No"),
        "to_binary": (" 0b1101\nConvert", " 1011"),
    }
    answers = {"add_sub": "171", "reverse_words": "cannot, as, his, the", "spell_backward": "derot",
               "syllogism": "Yes", "to_binary": "1101"}
    for name, (good, bad) in cases.items():
        task = get_task(name)
        example = task.examples("test", 1, 0)[0]
        example = Example(example.prompt, answers[name], example.choices, dict(example.meta))
        if name == "to_binary":
            example.meta["entry"] = {"metadata": {"target_base": 2}}
        assert task.score(example, good) == 1.0, name
        assert task.score(example, bad) == 0.0, name
        assert task.score(example, "") == 0.0, name


def test_to_binary_reads_numbers_in_the_target_base():
    task = get_task("to_binary")
    for example in task.examples("test", 10, 0):
        base = example.meta["entry"]["metadata"]["target_base"]
        value = int(example.answer, base)
        if base == 2:
            assert task.score(example, " 0" + example.answer) == 1.0  # leading zero
            assert task.score(example, " 0b" + example.answer) == 1.0
        assert task.score(example, " " + format(value + 1, "b" if base == 2 else "d")) == 0.0


def test_reasoning_gym_score_answer_is_a_second_route():
    task = get_task("sort_words")
    example = task.examples("test", 1, 0)[0]
    # reasoning-gym's own scorer accepts the list without spaces after the commas
    assert task.score(example, " " + example.answer.replace(", ", ",")) == 1.0
