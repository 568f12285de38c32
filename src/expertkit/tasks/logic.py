"""A sound validity check for categorical syllogisms (used to label the ``syllogism`` task).

reasoning-gym's own check omits the rule that the middle term must be distributed at least
once, so it labels e.g. "All musicians are reptiles. Some reptiles are ants. Therefore some
musicians are ants" valid. Here validity is decided by brute force over Venn-diagram models:
a conclusion follows when it is true in every model where the premises are true. As in
Aristotelian logic (and reasoning-gym's inversions, e.g. "All A are B, so some B are A"), every
term is assumed non-empty (existential import).
"""

from __future__ import annotations

import itertools
import re

from expertkit.errors import ConfigError

_FORMS = (
    (re.compile(r"^all (.+?) are (.+)$", re.I), "all"),
    (re.compile(r"^no (.+?) are (.+)$", re.I), "no"),
    (re.compile(r"^some (.+?) are not (.+)$", re.I), "some_not"),
    (re.compile(r"^some (.+?) are (.+)$", re.I), "some"),
)

Statement = tuple[str, str, str]  # (form, subject, predicate)


def parse_statement(text: str) -> Statement:
    """``"Some cats are not dogs"`` -> ``("some_not", "cats", "dogs")``."""
    text = text.strip().rstrip(".?!").strip()
    for pattern, form in _FORMS:
        match = pattern.match(text)
        if match:
            return form, match.group(1).strip().lower(), match.group(2).strip().lower()
    raise ConfigError(f"not a categorical statement: {text!r}")


def _holds(statement: Statement, regions: list[dict[str, bool]]) -> bool:
    """Truth of a statement given the non-empty regions of a Venn diagram."""
    form, a, b = statement
    if form == "all":
        return not any(r[a] and not r[b] for r in regions)
    if form == "no":
        return not any(r[a] and r[b] for r in regions)
    if form == "some":
        return any(r[a] and r[b] for r in regions)
    return any(r[a] and not r[b] for r in regions)  # some_not


def follows(premises: list[str], conclusion: str) -> bool:
    """Whether ``conclusion`` follows from ``premises`` (every term assumed non-empty)."""
    parsed = [parse_statement(p) for p in premises]
    goal = parse_statement(conclusion)
    terms = sorted({t for _, a, b in [*parsed, goal] for t in (a, b)})
    all_regions = [dict(zip(terms, bits)) for bits in itertools.product((False, True), repeat=len(terms))]
    all_regions = [r for r in all_regions if any(r.values())]  # the outside region is irrelevant
    for mask in itertools.product((False, True), repeat=len(all_regions)):
        regions = [r for r, keep in zip(all_regions, mask) if keep]
        if not all(any(r[t] for r in regions) for t in terms):
            continue  # existential import: every term has a member
        if all(_holds(p, regions) for p in parsed) and not _holds(goal, regions):
            return False
    return True
