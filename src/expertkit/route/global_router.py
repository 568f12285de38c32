"""The global router: an LLM writes each query's task instruction; an embedder compares it to the experts.

* :class:`InstructionWriter`: the (bundled) LLM writes a one-sentence instruction for each query,
  greedily, per query (never per task); answers are cached on disk by the hash of the model's
  fingerprint, the template and the query, so a query costs one generation once.
* :class:`GlobalRouter`: embeds the instruction (the bundled MiniLM by default) and scores every
  expert by the cosine similarity of the instruction with the expert's description: ``(Q, E)``.
* :func:`retrieval_scores`: LoraRetriever-style scores for comparison: the query itself embedded,
  against the mean embedding of a few training inputs of each expert's task.

Anything with ``encode(list[str]) -> array (n, d)`` is an embedder (a ``SentenceTransformer`` is
one); anything with ``__call__(list[str]) -> list[str]`` is a writer. Tests pass small fakes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from expertkit.errors import ConfigError

# Few-shot, with tasks outside the suite: SmolLM2-135M follows this pattern where a bare request mostly
# gets the query answered or echoed (a development probe, not a recorded result: experiments/glider.py
# measures the retrieval accuracy).
TEMPLATE = ("Input: What is the capital of France?\nTask: Name the capital city of a country.\n\n"
            "Input: I loved this movie, it was great!\nTask: Classify the sentiment of a movie review.\n\n"
            "Input: Translate 'cat' to Spanish.\nTask: Translate an English word into Spanish.\n\n"
            "Input: {query}\nTask:")


class Embedder(Protocol):
    """Something that embeds texts: ``encode(texts) -> (n, d)`` array-like."""

    def encode(self, sentences: list[str], **kwargs: Any) -> Any:
        """Embed ``sentences``."""


def embed(embedder: Embedder, texts: Sequence[str]) -> torch.Tensor:
    """Unit-norm embeddings ``(n, d)`` of ``texts``."""
    v = torch.as_tensor(embedder.encode(list(texts)), dtype=torch.float32)  # (n, d)
    if v.dim() != 2 or v.shape[0] != len(texts):
        raise ConfigError(f"the embedder returned shape {tuple(v.shape)} for {len(texts)} texts; expected (n, d).")
    return torch.nn.functional.normalize(v, dim=-1)


def context_length(model: Any) -> int | None:
    """The model's maximum number of positions, when its config says."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_fits(n_tokens: int, limit: int | None, what: str) -> None:
    """A one-line error when ``n_tokens`` do not fit a context of ``limit`` positions."""
    if limit is not None and n_tokens > limit:
        raise ConfigError(f"{what} is {n_tokens} tokens, longer than the model's context of {limit} tokens; "
                          "shorten it (or route with a model of a longer context).")


class InstructionWriter:
    """The LLM that writes one instruction per query (cached by query hash under ``cache_dir``)."""

    def __init__(self, loaded: Any, *, cache_dir: str | os.PathLike[str] | None = None,
                 max_new_tokens: int = 32, template: str = TEMPLATE, batch_size: int = 8,
                 max_query_chars: int = 600, chat: bool = False) -> None:
        self.loaded = loaded
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.max_new_tokens = max_new_tokens
        self.template = template
        self.batch_size = batch_size
        self.max_query_chars = max_query_chars  # a long query (a news article) is cut: its start names the task
        self.chat = chat  # wrap the prompt in the tokenizer's chat template
        self.generated = 0  # queries written by the model (cache misses) in this writer's life
        self._model_key: str | None = None  # model_digest of the writer, computed at the first cache lookup

    def _key(self, query: str) -> str:
        if self._model_key is None:  # every byte of the writer, not its folder's sampled fingerprint
            from expertkit.weights.fingerprint import model_digest

            self._model_key = model_digest(self.loaded.model)
        ident = json.dumps([self._model_key, self.template, self.max_new_tokens, self.max_query_chars,
                            self.chat, query])
        return hashlib.sha256(ident.encode()).hexdigest()[:32]

    def _prompt_ids(self, query: str) -> list[int]:
        tok = self.loaded.tokenizer
        text = self.template.format(query=query[: self.max_query_chars])
        if self.chat and getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
            ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        else:
            ids = list(tok(text).input_ids)
        check_fits(len(ids) + self.max_new_tokens, context_length(self.loaded.model), "the instruction prompt")
        return ids

    def __call__(self, queries: Sequence[str]) -> list[str]:
        """One instruction per query, in order."""
        from expertkit.fileio import write_atomic
        from expertkit.tasks.infer import greedy_generate

        out: list[str | None] = [None] * len(queries)
        todo: dict[str, list[int]] = {}
        for i, q in enumerate(queries):
            key = self._key(q)
            path = None if self.cache_dir is None else self.cache_dir / f"{key}.json"
            if path is not None and path.is_file():
                try:
                    out[i] = json.loads(path.read_text())["instruction"]
                    continue
                except (OSError, ValueError, KeyError, TypeError):
                    pass  # unreadable entry: written again below
            todo.setdefault(q, []).append(i)
        if todo:
            texts = list(todo)
            prompts = [self._prompt_ids(q) for q in texts]
            written = greedy_generate(self.loaded.model, self.loaded.tokenizer, prompts, self.max_new_tokens,
                                      batch_size=self.batch_size, description="Writing instructions")
            self.generated += len(texts)
            for q, text in zip(texts, written, strict=True):
                for i in todo[q]:
                    out[i] = text
                if self.cache_dir is not None:
                    write_atomic(self.cache_dir / f"{self._key(q)}.json", json.dumps({"query": q, "instruction": text}))
        return [o or "" for o in out]


def pack_instructions(cache_dir: str | os.PathLike[str], pack: str | os.PathLike[str]) -> int:
    """Write every instruction cached under ``cache_dir`` into one JSON-lines file ``pack`` (``{"key",
    "instruction"}`` per line, sorted by key; the queries themselves are left out), so that a cache that
    took an hour to write can be committed and carried to another machine. Returns the entries written."""
    from expertkit.fileio import write_atomic

    rows = []
    for path in sorted(Path(cache_dir).glob("*.json")):
        try:
            rows.append({"key": path.stem, "instruction": json.loads(path.read_text())["instruction"]})
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an unreadable entry is written again by the next run that needs it
    write_atomic(Path(pack), "".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def unpack_instructions(pack: str | os.PathLike[str], cache_dir: str | os.PathLike[str]) -> int:
    """Put the entries of a :func:`pack_instructions` file into ``cache_dir`` where that key is missing
    (entries already there are kept). The keys hold the writer's model digest, template and query, so
    an entry is only ever read back for the same writer and query. Returns the entries added."""
    from expertkit.errors import CheckpointError
    from expertkit.fileio import write_atomic

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    added = 0
    for i, line in enumerate(Path(pack).read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            key, text = str(row["key"]), str(row["instruction"])
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{pack}, line {i}: not an instruction entry ({{\"key\", \"instruction\"}}); "
                                  "make the file again with pack_instructions.") from None
        if len(key) != 32 or not all(c in "0123456789abcdef" for c in key):
            raise CheckpointError(f"{pack}, line {i}: key '{key[:40]}' is not a 32-digit hex query hash.")
        path = cache_dir / f"{key}.json"
        if not path.is_file():
            write_atomic(path, json.dumps({"instruction": text}))
            added += 1
    return added


class GlobalRouter:
    """Global scores ``(Q, E)``: cosine of each query's written instruction with each expert's description."""

    def __init__(self, descriptions: Sequence[str], writer: Callable[[list[str]], list[str]],
                 embedder: Embedder, expert_queries: Sequence[Sequence[str]] | None = None) -> None:
        """``expert_queries[e]``: a few training inputs of expert ``e``; when given, the writer writes their
        instructions too and the expert's vector is the normalised mean of its description's and their
        embeddings (as GLIDER makes an expert's global vector from instructions written for its data)."""
        if not descriptions:
            raise ConfigError("the global router needs at least one expert description.")
        self.writer = writer
        self.embedder = embedder
        vectors = embed(embedder, descriptions)  # (E, d)
        if expert_queries is not None:
            if len(expert_queries) != len(descriptions):
                raise ConfigError("expert_queries needs one list of inputs per expert.")
            rows = []
            for vec, queries in zip(vectors, expert_queries, strict=True):
                written = embed(embedder, writer(list(queries))) if queries else vec[None]  # (m, d)
                rows.append(torch.cat([vec[None], written]).mean(0))
            vectors = torch.nn.functional.normalize(torch.stack(rows), dim=-1)
        self.expert_vectors = vectors

    def instructions(self, queries: Sequence[str]) -> list[str]:
        """The written instruction of each query."""
        return list(self.writer(list(queries)))

    def scores(self, queries: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
        """``(scores (Q, E), instructions)``."""
        written = self.instructions(queries)
        return self.score_instructions(written), written

    def score_instructions(self, instructions: Sequence[str]) -> torch.Tensor:
        """Cosine similarities ``(Q, E)`` of given instructions with the expert descriptions."""
        return embed(self.embedder, instructions) @ self.expert_vectors.T  # (Q, d) @ (d, E)


def retrieval_scores(embedder: Embedder, queries: Sequence[str], expert_examples: Sequence[Sequence[str]]) -> torch.Tensor:
    """LoraRetriever-style scores ``(Q, E)``: the query embedded against each expert's mean embedding of
    a few of its training inputs (normalised)."""
    if not expert_examples or any(not ex for ex in expert_examples):
        raise ConfigError("retrieval needs at least one example input per expert.")
    centroids = torch.stack([embed(embedder, ex).mean(0) for ex in expert_examples])  # (E, d)
    centroids = torch.nn.functional.normalize(centroids, dim=-1)
    return embed(embedder, queries) @ centroids.T  # (Q, E)
