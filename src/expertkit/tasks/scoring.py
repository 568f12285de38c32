"""Scorers: turn a model's continuation into a score in [0, 1].

A model keeps generating after its answer (a newline and another question, a full stop and a
remark), so every scorer first *extracts* the answer and then compares it with the gold one:

* :func:`first_line` is the prediction with leading whitespace removed, cut at the first newline.
* :func:`normalize` case-folds (where asked), collapses whitespace, and strips surrounding quotes,
  brackets and trailing punctuation (``.,;:!?``).

The scorer factories below return ``scorer(example, prediction) -> float`` callables for
:class:`~expertkit.tasks.base.Task`; each documents its rule. All return 0.0 on an empty
prediction.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from expertkit.tasks.base import Example

Scorer = Callable[[Example, str], float]

_NUMBER = re.compile(r"[-+−]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_NUMBER_WITH_COMMAS = re.compile(r"[-+−]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_WORD = re.compile(r"[\w'’-]+")
_STRIP = " \t\"'`“”‘’[](){}<>*"
_TRAILING = ".,;:!?"


def first_line(prediction: str) -> str:
    """The prediction without leading whitespace, up to (not including) the first newline."""
    return prediction.lstrip().split("\n", 1)[0].strip()


def normalize(text: str, casefold: bool = True) -> str:
    """Collapse whitespace, strip quotes/brackets and trailing punctuation, optionally case-fold."""
    text = " ".join(text.split())
    previous = None
    while previous != text:  # peel quotes, brackets and end punctuation in any order
        previous = text
        text = text.strip(_STRIP).rstrip(_TRAILING)
    return text.casefold() if casefold else text


def parse_number(text: str) -> float | None:
    """A float from ``text`` ("7", "7.0", "-4", "1e3", "1,234", "$18"), or ``None``."""
    cleaned = text.strip().replace("−", "-").replace("$", "").replace(",", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def numbers_equal(a: float, b: float) -> bool:
    """Numeric equality with a relative tolerance of 1e-6 (so ``7 == 7.0``)."""
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def first_number(text: str) -> float | None:
    """The first number in ``text`` (commas are not part of it), or ``None``."""
    match = _NUMBER.search(text)
    return parse_number(match.group(0)) if match else None


def first_word(text: str) -> str:
    """The first word-like token (letters, digits, ``'`` and ``-``) of ``text``, or ``""``."""
    match = _WORD.search(text)
    return match.group(0) if match else ""


def numeric_scorer() -> Scorer:
    """Rule: the first number on the first line equals the gold number numerically.

    ``" 7"``, ``" 7.0"``, ``" 7\\nQuestion: ..."`` and ``" 7 apples"`` score 1 for gold ``7``;
    ``" 8"`` and ``""`` score 0.
    """

    def score(example: Example, prediction: str) -> float:
        gold = parse_number(example.answer)
        got = first_number(first_line(prediction))
        return float(gold is not None and got is not None and numbers_equal(gold, got))

    return score


def word_scorer(casefold: bool = True) -> Scorer:
    """Rule: the first word of the prediction equals the (single-word) gold answer.

    Words keep letters, digits, ``'`` and ``-`` (so ``mother-in-law`` is one word); case-folded
    unless ``casefold=False``. ``" Yes."``, ``" yes, because ..."`` and ``" Yes\\n..."`` score 1
    for gold ``Yes``.
    """

    def score(example: Example, prediction: str) -> float:
        got = first_word(first_line(prediction))
        gold = example.answer.strip()
        if casefold:
            got, gold = got.casefold(), gold.casefold()
        return float(bool(got) and got == gold)

    return score


def text_scorer(casefold: bool = True) -> Scorer:
    """Rule: the normalized first line equals the normalized gold text.

    For multi-word answers: extra words on the first line make the answer wrong; anything after
    the first newline is ignored. ``" hello world."`` scores 1 for gold ``HELLO WORLD``.
    """

    def score(example: Example, prediction: str) -> float:
        got = normalize(first_line(prediction), casefold)
        return float(bool(got) and got == normalize(example.answer, casefold))

    return score


def split_list(text: str) -> list[str]:
    """Elements of a list answer: ``"a, b, c"``, ``"[a, b, c]"`` or ``"['a', 'b']"``."""
    body = normalize(text, casefold=False)
    if not body:
        return []
    parts = body.split(",") if "," in body else body.split()
    return [normalize(part, casefold=False) for part in parts]


def list_scorer(numeric: bool = False, casefold: bool = True) -> Scorer:
    """Rule: the first line, split on commas, equals the gold list element by element.

    Brackets and quotes around the list or its elements and a trailing full stop are ignored;
    the length must match (an extra element is a wrong answer, not junk). Elements are compared
    numerically when ``numeric`` (``"3.0"`` equals ``"3"``), else as case-folded text.
    """

    def same(a: str, b: str) -> bool:
        if numeric:
            x, y = parse_number(a), parse_number(b)
            return x is not None and y is not None and numbers_equal(x, y)
        return a.casefold() == b.casefold() if casefold else a == b

    def score(example: Example, prediction: str) -> float:
        got = split_list(first_line(prediction))
        gold = split_list(example.answer)
        return float(len(got) == len(gold) > 0 and all(same(a, b) for a, b in zip(got, gold)))

    return score


def base_number_scorer(base_of: Callable[[Example], int]) -> Scorer:
    """Rule: the first word, read as an integer in the example's target base, equals the gold.

    ``base_of(example)`` gives the base (2, 10, 16, ...); ``0b``/``0x`` prefixes and leading
    zeros are accepted (``" 01101"`` equals ``1101`` in base 2).
    """

    def read(text: str, base: int) -> int | None:
        text = text.strip().casefold()
        if base == 2 and text.startswith("0b") or base == 16 and text.startswith("0x"):
            text = text[2:]
        try:
            return int(text, base)
        except ValueError:
            return None

    def score(example: Example, prediction: str) -> float:
        base = base_of(example)
        got = read(first_word(first_line(prediction)), base)
        return float(got is not None and got == read(example.answer, base))

    return score


def choice_scorer() -> Scorer:
    """Rule: the normalized first line starts with the gold choice (a whole word), case-folded.

    Used when a choice task is scored from generated text instead of log-likelihoods; the
    choice must be followed by the end of the line or a non-word character.
    """

    def score(example: Example, prediction: str) -> float:
        got = normalize(first_line(prediction))
        gold = normalize(example.answer)
        if not got or not gold or not got.startswith(gold):
            return 0.0
        rest = got[len(gold):]
        return float(not rest or not (rest[0].isalnum() or rest[0] in "-_'"))

    return score


_FINAL = re.compile(r"####\s*(" + _NUMBER_WITH_COMMAS.pattern + ")")
_ANSWER_IS = re.compile(r"answer is[:\s]*(" + _NUMBER_WITH_COMMAS.pattern + ")", re.IGNORECASE)


def final_number(prediction: str) -> float | None:
    """GSM8K-style extraction of the final numeric answer from a worked solution.

    Order: the number after the first ``####``; else the text is cut where the model starts a new
    question (``Question:``) and the number after the last "answer is" is taken; else the last
    number in that text. Thousands separators and ``$`` are ignored.
    """
    match = _FINAL.search(prediction)
    if match:
        return parse_number(match.group(1))
    text = re.split(r"\n\s*Question:", prediction, maxsplit=1)[0]
    found = _ANSWER_IS.findall(text)
    if found:
        return parse_number(found[-1])
    numbers = _NUMBER_WITH_COMMAS.findall(text)
    return parse_number(numbers[-1]) if numbers else None


def final_number_scorer() -> Scorer:
    """Rule: :func:`final_number` of the prediction equals the gold number numerically."""

    def score(example: Example, prediction: str) -> float:
        gold = parse_number(example.answer)
        got = final_number(prediction)
        return float(gold is not None and got is not None and numbers_equal(gold, got))

    return score
