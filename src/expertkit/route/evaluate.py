"""Score a routed (or plain) model on task examples, the same way for every method.

Choice tasks score each ``prompt + " " + choice`` as one right-padded row (:func:`choice_logprobs`:
every row starts with its prompt, so per-query routing finds it); generate tasks use batched greedy
generation with left padding. Every method of a comparison goes through :func:`evaluate_router` on
the same examples, so paired tests compare like with like.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from expertkit.errors import ConfigError
from expertkit.tasks.base import Example, Task
from expertkit.tasks.evaluate import ExampleResult


def score_examples(model: Any, tokenizer: Any, task: Task, examples: Sequence[Example], prompt_ids: list[list[int]],
                   *, batch_size: int = 16) -> list[ExampleResult]:
    """Per-example results of ``model`` on ``examples`` whose prompts encode to ``prompt_ids``."""
    from expertkit.tasks.infer import choice_logprobs, encode_continuations, greedy_generate, pad_id_of

    if task.kind == "choice":
        pairs, spans = [], []
        for ex, ids in zip(examples, prompt_ids, strict=True):
            if not ex.choices:
                raise ConfigError(f"task '{task.name}' is a choice task but an example has no choices.")
            conts = encode_continuations(tokenizer, [" " + c for c in ex.choices])
            spans.append((len(pairs), len(conts)))
            pairs += [(ids, c) for c in conts]
        lps = choice_logprobs(model, pairs, pad_id_of(tokenizer), batch_size=batch_size, description=f"Scoring {task.name}")
        out = []
        for ex, (start, k) in zip(examples, spans, strict=True):
            lp = lps[start : start + k]
            pred = ex.choices[max(range(k), key=lambda j: (lp[j], -j))]  # argmax, first on ties
            out.append(ExampleResult(ex.prompt, ex.answer, pred, task.score(ex, pred), lp))
        return out
    preds = greedy_generate(model, tokenizer, prompt_ids, task.max_new_tokens, batch_size=batch_size,
                            description=f"Generating {task.name}")
    return [ExampleResult(e.prompt, e.answer, p, task.score(e, p)) for e, p in zip(examples, preds, strict=True)]


def evaluate_router(router: Any, task: Task | str, examples: Sequence[Example], *, batch_size: int = 16) -> list[ExampleResult]:
    """Results of ``router`` (its method) on ``examples`` of ``task``: prepare the queries, route, score."""
    from expertkit.tasks.base import get_task

    task = get_task(task) if isinstance(task, str) else task
    if not examples:
        raise ConfigError(f"no examples of task '{task.name}' to evaluate.")
    ids = router.prepare([task.format_prompt(e) for e in examples], task=task)
    with router as model:
        return score_examples(model, router.loaded.tokenizer, task, examples, ids, batch_size=batch_size)
