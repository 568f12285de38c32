"""Which zoo members can be merged with which, and why not.

Two members are *compatible* (weight-mergeable) when their architecture (``model_type``), their
tensor names, every tensor's shape, and ``tie_word_embeddings`` agree. Compatibility is an
equivalence here (same signature), so the zoo splits into compatibility classes; clustering
never puts two classes into one cluster, and every pair of classes gets an explanation of its
mismatches (reported in the plan, never dropped). The check reads headers only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_SHOW = 3


@dataclass(frozen=True)
class Signature:
    """What must agree for two models to be merged weight by weight."""

    model_type: str | None
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    tied: bool
    vocab_size: int | None

    @classmethod
    def of(cls, names: Sequence[str], shape: Any, config: dict[str, Any]) -> Signature:
        """From tensor names, a ``name -> shape`` callable and ``config.json``."""
        return cls(
            config.get("model_type"),
            tuple(sorted((n, tuple(shape(n))) for n in names)),
            bool(config.get("tie_word_embeddings", False)),
            config.get("vocab_size"),
        )


def _listing(items: list[str]) -> str:
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def explain(a: Signature, b: Signature, name_a: str = "a", name_b: str = "b") -> list[str]:
    """Every reason ``a`` and ``b`` cannot be merged weight by weight (empty when compatible)."""
    reasons = []
    if a.model_type != b.model_type:
        reasons.append(f"architectures differ: {name_a} is {a.model_type!r}, {name_b} is {b.model_type!r}")
    if a.vocab_size != b.vocab_size:
        reasons.append(
            f"vocabularies differ: {a.vocab_size} vs {b.vocab_size} tokens (if one tokenizer only adds "
            "tokens to the other, align the vocabularies with the merge engine first)"
        )
    if a.tied != b.tied:
        reasons.append(f"tie_word_embeddings differs: {a.tied} vs {b.tied}")
    sa, sb = dict(a.shapes), dict(b.shapes)
    only_a = sorted(set(sa) - set(sb))
    only_b = sorted(set(sb) - set(sa))
    if only_a:
        reasons.append(f"{len(only_a)} tensors only in {name_a}: {_listing(only_a)}")
    if only_b:
        reasons.append(f"{len(only_b)} tensors only in {name_b}: {_listing(only_b)}")
    bad = [f"{n} {list(sa[n])} vs {list(sb[n])}" for n in sorted(set(sa) & set(sb)) if sa[n] != sb[n]]
    if bad:
        reasons.append(f"{len(bad)} tensors differ in shape: {_listing(bad)}")
    return reasons


def compatibility_classes(signatures: Sequence[Signature]) -> list[list[int]]:
    """Indices grouped by identical signature, in order of first appearance."""
    classes: dict[Signature, list[int]] = {}
    for i, sig in enumerate(signatures):
        classes.setdefault(sig, []).append(i)
    return list(classes.values())


def incompatibility_report(signatures: Sequence[Signature], names: Sequence[str]) -> list[str]:
    """One line per pair of compatibility classes: their first members and every mismatch."""
    classes = compatibility_classes(signatures)
    lines = []
    for x in range(len(classes)):
        for y in range(x + 1, len(classes)):
            i, j = classes[x][0], classes[y][0]
            left = ", ".join(names[k] for k in classes[x])
            right = ", ".join(names[k] for k in classes[y])
            why = "; ".join(explain(signatures[i], signatures[j], names[i], names[j]))
            lines.append(f"[{left}] cannot be merged with [{right}]: {why}.")
    return lines
