"""The generated tasks: reasoning-gym generators with configs and compact prompts.

Each task is a :class:`~expertkit.tasks.gym.GymSpec`. Configs keep prompts short (most under
64 tokens of the SmolLM2 tokenizer) and answers short (at most ``max_new_tokens``); where the
generator's own question is long, the prompt is rewritten from the entry's metadata. Every
prompt ends with ``"\\nAnswer:"`` and the model must continue with ``" " + answer``.
Families differ enough for LoRA experts to specialise: arithmetic, algebra, number theory,
counting, sorting, string manipulation, logic, calendar, relations, induction, encoding.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from expertkit.tasks.gym import GymSpec
from expertkit.tasks.logic import follows
from expertkit.tasks.scoring import (
    base_number_scorer,
    choice_scorer,
    list_scorer,
    numeric_scorer,
    word_scorer,
)

YES_NO = ("Yes", "No")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
RELATIONS = ("husband", "wife", "father", "mother", "son", "daughter")
_IRREGULAR = {"woodlouse": "woodlice", "sheep": "sheep", "deer": "deer", "starfish": "starfish",
              "jellyfish": "jellyfish", "shrimp": "shrimp", "praying mantis": "praying mantises"}


def _meta(entry: dict[str, Any]) -> dict[str, Any]:
    return entry["metadata"]


def _int_text(value: str | float) -> str:
    """``"73.0"`` -> ``"73"``; other numbers unchanged."""
    number = float(value)
    return str(int(number)) if number.is_integer() else str(value)


def _plural(animal: str, count: int) -> str:
    if count == 1:
        return animal
    if animal in _IRREGULAR:
        return _IRREGULAR[animal]
    if animal.endswith("y") and animal[-2] not in "aeiou":
        return animal[:-1] + "ies"
    if animal.endswith(("s", "x", "ch", "sh")):
        return animal + "es"
    return animal + "s"


def _legs_prompt(entry: dict[str, Any]) -> str:
    animals = [f"{count} {_plural(animal, count)}" for animal, count in _meta(entry)["animals"].items()]
    return f"How many legs do {' and '.join(animals)} have in total?"


def _date_text(iso: str) -> tuple[str, str]:
    day = _dt.date.fromisoformat(iso)
    return WEEKDAYS[day.weekday()], f"{day:%B} {day.day}, {day.year}"


def _weekday_prompt(entry: dict[str, Any]) -> str:
    weekday, date = _date_text(_meta(entry)["start_date"])
    offset = int(_meta(entry)["offset_days"])
    when = f"in {offset} days" if offset >= 0 else f"{-offset} days ago"
    verb = "will it be" if offset >= 0 else "was it"
    return f"Today is {weekday}, {date}. What weekday {verb} {when}?"


def _syllogism_prompt(entry: dict[str, Any]) -> str:
    m = _meta(entry)
    conclusion = m["conclusion"][0].lower() + m["conclusion"][1:]
    return f"{m['premise1']}. {m['premise2']}. Does it follow that {conclusion}? Yes or No?"


def _syllogism_answer(entry: dict[str, Any]) -> str:
    """Yes/No by a sound check (reasoning-gym's own label accepts an undistributed middle)."""
    m = _meta(entry)
    return "Yes" if follows([m["premise1"], m["premise2"]], m["conclusion"]) else "No"


def _family_prompt(entry: dict[str, Any]) -> str:
    story = entry["question"].split("\n\n", 1)[0].strip()
    m = _meta(entry)
    return f"{story} What is {m['person1']} to {m['person2']}?"


def _base_ok(entry: dict[str, Any]) -> bool:
    m = _meta(entry)
    return {m["source_base"], m["target_base"]} == {2, 10}


def _base_prompt(entry: dict[str, Any]) -> str:
    m = _meta(entry)
    names = {2: "binary", 10: "decimal"}
    return f"Convert the {names[m['source_base']]} number {m['source_repr']} to {names[m['target_base']]}."


def _target_base(example: Any) -> int:
    return int(example.meta.get("entry", {}).get("metadata", {}).get("target_base", 10))


def _sorted_numbers(entry: dict[str, Any]) -> str:
    return ", ".join(_int_text(x) for x in _meta(entry)["sorted_numbers"])


def _number_sort_prompt(entry: dict[str, Any]) -> str:
    numbers = ", ".join(_int_text(x) for x in _meta(entry)["original_numbers"])
    return f"Sort these numbers in {_meta(entry)['direction']} order: {numbers}"


def _word_sort_prompt(entry: dict[str, Any]) -> str:
    words = ", ".join(_meta(entry)["transformed_words"])
    order = "alphabetical" if _meta(entry)["direction"] == "ascending" else "reverse alphabetical"
    return f"Sort these words in {order} order: {words}"


def _lowercase() -> Any:
    from reasoning_gym.algorithmic.word_sorting import TextTransformation

    return TextTransformation.LOWERCASE


def _word_for(entry: dict[str, Any]) -> str:
    return entry["metadata"]["word"]


SPECS: tuple[GymSpec, ...] = (
    GymSpec(
        name="add_sub", generator="chain_sum", family="arithmetic",
        description="Add and subtract two or three numbers below 100.",
        config=dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
        prompt=lambda e: f"What is {_meta(e)['expression']}?",
        scorer=numeric_scorer(), max_new_tokens=6,
    ),
    GymSpec(
        name="arith_mixed", generator="basic_arithmetic", family="arithmetic",
        description="Two or three one-digit numbers with +, - and * (operator precedence applies).",
        config=dict(min_terms=2, max_terms=3, min_digits=1, max_digits=1, operators=("+", "-", "*"),
                    allow_parentheses=False, allow_negation=False),
        prompt=lambda e: f"What is {_meta(e)['expression']}?",
        scorer=numeric_scorer(), max_new_tokens=6,
    ),
    GymSpec(
        name="solve_x", generator="simple_equations", family="algebra",
        description="Solve a one-step or two-step linear equation with small integers.",
        config=dict(min_terms=2, max_terms=2, min_value=1, max_value=20),
        prompt=lambda e: f"Solve for {_meta(e)['variable']}: {_meta(e)['equation']}",
        scorer=numeric_scorer(), max_new_tokens=6,
    ),
    GymSpec(
        name="gcd", generator="gcd", family="number_theory",
        description="Greatest common divisor of two numbers up to 100.",
        config=dict(min_numbers=2, max_numbers=2, min_value=1, max_value=100),
        prompt=lambda e: "What is the greatest common divisor of {} and {}?".format(*_meta(e)["numbers"]),
        scorer=numeric_scorer(), max_new_tokens=5,
    ),
    GymSpec(
        name="letter_count", generator="letter_counting", family="counting",
        description="Count the occurrences of a letter in three to five words.",
        config=dict(min_words=3, max_words=5),
        prompt=lambda e: 'How many times does the letter "{}" appear in "{}"?'.format(
            _meta(e)["target_letter"], " ".join(_meta(e)["span"])),
        scorer=numeric_scorer(), max_new_tokens=4,
    ),
    GymSpec(
        name="count_bits", generator="count_bits", family="counting",
        description="Count the 1 bits in the binary form of a number below 4096.",
        config=dict(min_n=1, max_n=4095),
        prompt=lambda e: f"How many 1 bits does {_meta(e)['number']} have in binary?",
        scorer=numeric_scorer(), max_new_tokens=4,
    ),
    GymSpec(
        name="leg_count", generator="leg_counting", family="counting",
        description="Total legs of one or two kinds of animals (needs world knowledge).",
        config=dict(min_animals=1, max_animals=2, min_instances=1, max_instances=5),
        prompt=_legs_prompt, scorer=numeric_scorer(), max_new_tokens=5,
    ),
    GymSpec(
        name="sort_numbers", generator="number_sorting", family="sorting",
        description="Sort three integers below 100 ascending or descending.",
        config=dict(min_numbers=3, max_numbers=3, min_decimals=0, max_decimals=0, min_value=0, max_value=99),
        prompt=_number_sort_prompt, answer=_sorted_numbers,
        scorer=list_scorer(numeric=True), max_new_tokens=12,
    ),
    GymSpec(
        name="sort_words", generator="word_sorting", family="sorting",
        description="Sort three or four lowercase words alphabetically or in reverse.",
        config=dict(min_words=3, max_words=4, min_word_length=3, max_word_length=7, transformation=_lowercase),
        accept=lambda e: all(w.isascii() and w.isalpha() for w in _meta(e)["transformed_words"]),
        prompt=_word_sort_prompt, answer=lambda e: ", ".join(_meta(e)["sorted_words"]),
        scorer=list_scorer(), max_new_tokens=12, rg_score=True,
    ),
    GymSpec(
        name="spell_backward", generator="spell_backward", family="string",
        description="Spell a word of three to six letters backward.",
        config=dict(min_word_len=3, max_word_len=6),
        prompt=lambda e: f"Spell the word backward: {_word_for(e)}",
        scorer=word_scorer(casefold=False), max_new_tokens=8, rg_score=True,
    ),
    GymSpec(
        name="reverse_words", generator="word_sequence_reversal", family="string",
        description="Reverse the order of a comma-separated list of three or four words.",
        config=dict(min_words=3, max_words=4),
        prompt=lambda e: f"Reverse the order of these words: {', '.join(_meta(e)['words'])}",
        scorer=list_scorer(casefold=False), max_new_tokens=12, rg_score=True,
    ),
    GymSpec(
        name="to_binary", generator="base_conversion", family="encoding",
        description="Convert a number below 1024 between decimal and binary.",
        config=dict(min_base=2, max_base=10, min_value=0, max_value=1023), accept=_base_ok,
        prompt=_base_prompt, scorer=base_number_scorer(_target_base), max_new_tokens=12,
    ),
    GymSpec(
        name="next_number", generator="number_sequence", family="induction",
        description="Continue a four- or five-term integer sequence made by one simple rule.",
        config=dict(min_terms=4, max_terms=5, min_value=-100, max_value=100, max_complexity=1),
        prompt=lambda e: "What number comes next: {}?".format(", ".join(str(x) for x in _meta(e)["sequence"][:-1])),
        scorer=numeric_scorer(), max_new_tokens=6,
    ),
    GymSpec(
        name="syllogism", generator="syllogism", family="logic",
        description="Does a conclusion follow from two categorical premises? (Yes/No, about 40% Yes)",
        config=dict(invalid_ratio=0.5),
        prompt=_syllogism_prompt, answer=_syllogism_answer, scorer=choice_scorer(), kind="choice",
        choices=YES_NO, max_new_tokens=2,
    ),
    GymSpec(
        name="leap_year", generator="calendar_arithmetic", family="calendar",
        description="Is a year between 22 and 4022 a leap year? (Yes/No)",
        config=dict(tasks=["is_leap_year"], leap_year_range=4000),
        prompt=lambda e: f"Is {_meta(e)['year']} a leap year? Yes or No?",
        scorer=choice_scorer(), kind="choice", choices=YES_NO, max_new_tokens=2,
    ),
    GymSpec(
        name="weekday_offset", generator="calendar_arithmetic", family="calendar",
        description="The weekday up to 30 days before or after a given date (7 choices).",
        config=dict(tasks=["weekday_offset"], offset_upper_bound=30),
        prompt=_weekday_prompt, scorer=choice_scorer(), kind="choice", choices=WEEKDAYS,
        max_new_tokens=3,
    ),
    GymSpec(
        name="family_relation", generator="family_relationships", family="relations",
        description="Spouse / parent / child relation in a family of three (6 choices).",
        config=dict(min_family_size=3, max_family_size=3),
        prompt=_family_prompt, scorer=choice_scorer(), kind="choice", choices=RELATIONS,
        max_new_tokens=3, rg_score=True,
    ),
)
