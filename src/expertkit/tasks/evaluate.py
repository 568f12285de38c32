"""Evaluate a model (optionally with a LoRA adapter) on a task: accuracy with a 95 % interval.

* ``choice`` tasks: every choice is scored by the summed log-probability of
  ``" " + choice`` after the prompt, the prompt run once per example and its KV cache
  shared by the choices (:func:`~expertkit.tasks.infer.shared_prefix_logprobs`);
  the prediction is the argmax (first on ties) and scores via ``task.score``.
* ``generate`` tasks: batched greedy generation with left padding of at most
  ``task.max_new_tokens`` tokens; the prediction (first non-empty line of the new
  text) is scored by ``task.score``.

Accuracy is the mean score; its interval is the Wilson score interval. With a
``cache_dir``, results are stored as JSON keyed by a digest of every byte of the model's
weights as they are in memory when it is evaluated, and its configuration (not the sampled
fingerprint of the folder it came from: a model trained or edited after loading, or two models
differing only in tensors a fingerprint does not sample, must not share scores), the
adapter identity (resolved path and SHA-256 of its files), the task, split, n,
seed and ``max_new_tokens``; a cache hit returns without running the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from expertkit.errors import CheckpointError, ConfigError, InputTypeError
from expertkit.fileio import sha256_file, write_atomic
from expertkit.tasks.base import Example, Task
from expertkit.tasks.infer import (
    encode_continuations,
    encode_prompts,
    greedy_generate,
    pad_id_of,
    shared_prefix_logprobs,
)
from expertkit.tasks.stats import wilson_interval

CACHE_VERSION = 2  # 2: the model key is a full content digest (was the sampled fingerprint)


@dataclass
class ExampleResult:
    """One evaluated example: what was asked, what the model said, and its score."""

    prompt: str
    answer: str
    prediction: str
    score: float
    choice_logprobs: list[float] | None = None  # choice tasks: summed log p of each choice


@dataclass
class EvalResult:
    """Accuracy of a model on ``n`` examples of one task split, with per-example detail."""

    task: str
    split: str
    n: int
    seed: int
    accuracy: float
    ci_low: float
    ci_high: float
    seconds: float
    examples: list[ExampleResult] = field(default_factory=list)
    model_fingerprint: str | None = None
    adapter: str | None = None
    cached: bool = False

    @property
    def ci(self) -> tuple[float, float]:
        """The 95 % Wilson score interval of the accuracy."""
        return self.ci_low, self.ci_high

    @property
    def predictions(self) -> list[str]:
        """Model predictions, in example order."""
        return [e.prediction for e in self.examples]

    @property
    def scores(self) -> list[float]:
        """Per-example scores, in example order."""
        return [e.score for e in self.examples]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``cached`` is left out: it describes how a result was obtained)."""
        d = asdict(self)
        d.pop("cached")
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, cached: bool = False) -> EvalResult:
        """Rebuild a result written by :meth:`to_dict`."""
        data = dict(data)
        data["examples"] = [ExampleResult(**e) for e in data.get("examples", [])]
        return cls(**data, cached=cached)

    def summary(self) -> str:
        """One line: task, accuracy and interval."""
        return (
            f"{self.task} [{self.split}, n={self.n}]: accuracy {self.accuracy:.3f} "
            f"(95% CI {self.ci_low:.3f}-{self.ci_high:.3f}), {self.seconds:.1f} s"
        )



def adapter_identity(adapter: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies a PEFT adapter folder for caching: resolved path and hashes of its files."""
    path = Path(adapter).expanduser().resolve()
    if not (path / "adapter_config.json").is_file():
        raise CheckpointError(f"{path} is not a PEFT adapter folder (no adapter_config.json).")
    files = {
        p.name: sha256_file(p)
        for p in sorted(path.iterdir())
        if p.is_file() and p.name.startswith("adapter_")
    }
    return {"path": str(path), "files": files}


def cache_key(
    *, model_fingerprint: str, adapter: dict[str, Any] | None, task: Task, split: str, n: int, seed: int
) -> dict[str, Any]:
    """The dict whose JSON (sorted keys) identifies one evaluation in the cache."""
    return {
        "version": CACHE_VERSION,
        "model": model_fingerprint,
        "adapter": adapter,
        "task": task.name,
        "kind": task.kind,
        "split": split,
        "n": n,
        "seed": seed,
        "max_new_tokens": task.max_new_tokens if task.kind == "generate" else None,
    }


def cache_path(cache_dir: str | os.PathLike[str], key: dict[str, Any]) -> Path:
    """The JSON file under ``cache_dir`` that holds the result for ``key``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(key["task"]))
    return Path(cache_dir) / f"eval-{safe}-{key['split']}-{digest}.json"


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=1))


def _read_cache(path: Path, key: dict[str, Any]) -> EvalResult | None:
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return None
        return EvalResult.from_dict(data["result"], cached=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or unreadable cache entries are simply recomputed


def _run(model: Any, tokenizer: Any, task: Task, examples: list[Example], batch_size: int,
         max_prompt_tokens: int | None) -> list[ExampleResult]:
    prompts = encode_prompts(tokenizer, [task.format_prompt(e) for e in examples], max_prompt_tokens)
    if task.kind == "choice":
        conts = []
        for ex in examples:
            if not ex.choices:
                raise ConfigError(f"task '{task.name}' is a choice task but an example has no choices: {ex.prompt!r}")
            conts.append(encode_continuations(tokenizer, [" " + c for c in ex.choices]))
        per_ex = shared_prefix_logprobs(
            model, prompts, conts, pad_id_of(tokenizer), batch_size=batch_size,
            description=f"Evaluating {task.name}",
        )
        out = []
        for ex, lp in zip(examples, per_ex, strict=True):
            pred = ex.choices[max(range(len(lp)), key=lambda j: (lp[j], -j))]  # argmax, first on ties
            out.append(ExampleResult(ex.prompt, ex.answer, pred, task.score(ex, pred), lp))
        return out
    if task.kind == "generate":
        preds = greedy_generate(
            model, tokenizer, prompts, task.max_new_tokens, batch_size=batch_size,
            description=f"Evaluating {task.name}",
        )
        return [ExampleResult(e.prompt, e.answer, p, task.score(e, p)) for e, p in zip(examples, preds, strict=True)]
    raise ConfigError(f"task '{task.name}' has unknown kind '{task.kind}'; expected 'generate' or 'choice'.")


@contextlib.contextmanager
def with_adapter(model: Any, adapter: str | os.PathLike[str] | None) -> Iterator[Any]:
    """``model`` in eval mode with the PEFT ``adapter`` folder applied (``None``: as it is); on exit
    the adapter is taken out again (the base weights are never changed) and the mode restored."""
    was_training = model.training
    runner, peft_model = model, None
    if adapter is not None:
        import warnings

        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers helper
            peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        runner = peft_model
    try:
        runner.eval()
        yield runner
    finally:
        if peft_model is not None and not peft_model.active_peft_config.is_prompt_learning:
            peft_model.unload()  # take the LoRA layers out again; the base weights were never changed
        # (prompt/prefix tuning only wrapped the model: nothing was put into it)
        model.train(was_training)


def evaluate(
    model: Any,
    tokenizer: Any,
    task: Task | str,
    *,
    split: str = "test",
    n: int = 100,
    seed: int = 0,
    batch_size: int = 16,
    adapter: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    model_fingerprint: str | None = None,
    max_prompt_tokens: int | None = 1024,
) -> EvalResult:
    """Evaluate ``model`` on ``n`` examples of ``task``'s ``split`` (drawn with ``seed``).

    Args:
        model: a causal LM (transformers / PEFT model), or a
            :class:`~expertkit.models.LoadedModel` (then ``tokenizer`` may be ``None``).
        tokenizer: its tokenizer.
        task: a :class:`Task` or a registered task name.
        split, n, seed: which examples (``task.examples(split, n, seed)``).
        batch_size: examples per forward pass.
        adapter: a PEFT adapter folder applied for this evaluation only and removed after.
        cache_dir: where results are cached as JSON; ``None`` disables the cache.
        model_fingerprint: a name for the model in the cache key, which the caller vouches
            for (e.g. a content hash of a folder); when ``None`` and a cache is used, a digest
            of every weight in memory and of the config is computed (about 1 s per GB).
        max_prompt_tokens: prompts longer than this keep their last tokens.

    The model runs in eval mode under ``torch.inference_mode``; its mode is restored after.
    """
    from expertkit.models.loader import LoadedModel

    if isinstance(model, LoadedModel):
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        model = model.model  # its folder's sampled fingerprint is not used: the weights may have changed
    if tokenizer is None:
        raise InputTypeError("evaluate() needs a tokenizer; pass one (the model has none).")
    if isinstance(task, str):
        from expertkit.tasks.base import get_task

        task = get_task(task)
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}.")
    started = time.perf_counter()
    ident = adapter_identity(adapter) if adapter is not None else None
    path = key = None
    if cache_dir is not None:
        from expertkit.weights.fingerprint import model_digest

        model_fingerprint = model_fingerprint or model_digest(model)
        key = cache_key(model_fingerprint=model_fingerprint, adapter=ident, task=task, split=split, n=n, seed=seed)
        path = cache_path(cache_dir, key)
        hit = _read_cache(path, key)
        if hit is not None:
            return hit
    examples = task.examples(split, n, seed)
    if not examples:
        raise ConfigError(f"task '{task.name}' gave no examples for split '{split}'.")
    with with_adapter(model, adapter) as runner:
        results = _run(runner, tokenizer, task, examples, batch_size, max_prompt_tokens)
    total = sum(r.score for r in results)
    lo, hi = wilson_interval(total, len(results))
    result = EvalResult(
        task=task.name, split=split, n=len(results), seed=seed, accuracy=total / len(results),
        ci_low=lo, ci_high=hi, seconds=time.perf_counter() - started, examples=results,
        model_fingerprint=model_fingerprint, adapter=ident["path"] if ident else None,
    )
    if path is not None:
        _write_json_atomic(path, {"key": key, "result": result.to_dict()})
    return result
