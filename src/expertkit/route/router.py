"""Route a base model over an expert library: GLIDER and the baselines behind one interface.

``Router(loaded, library, config, global_router=..., embedder=...)``; ``router.prepare(prompts)``
computes the per-query scores the method needs (written instructions for GLIDER, query embeddings
for retrieval, the task's expert for the oracle) and registers them by the prompts' tokens; inside
``with router as model:`` the model routes every token of those prompts (batched ``generate`` and
scoring alike), and leaves with its own layers back. Arrow runs PEFT 0.21.2's own Arrow router
(``create_arrow_model``), which works with our pins (tested), so it is the peer, not a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from expertkit.errors import ConfigError
from expertkit.route.config import RouteConfig
from expertkit.route.layers import RouteState, attach, query_hook
from expertkit.route.library import ExpertLibrary, LoraStack

_MODE = {"glider": "glider", "phatgoose": "local", "global": "global", "retrieval": "global", "oracle": "global",
         "uniform": "fixed", "lorahub": "lorahub"}


class Router:
    """A base model routed over a library with one method (see :data:`~expertkit.route.config.METHODS`)."""

    def __init__(self, loaded: Any, library: ExpertLibrary, config: RouteConfig | None = None, *,
                 global_router: Any = None, embedder: Any = None) -> None:
        self.loaded = loaded
        self.library = library
        self.config = config or RouteConfig()
        library.check_base(loaded.fingerprint)
        if self.config.method in ("glider", "global") and global_router is None:
            raise ConfigError(f"method '{self.config.method}' needs a global router (an instruction writer and an embedder).")
        if self.config.method == "retrieval" and embedder is None:
            raise ConfigError("method 'retrieval' needs an embedder.")
        if self.config.method in ("glider", "phatgoose") and not library.has_gates:
            raise ConfigError(f"method '{self.config.method}' needs gate vectors; build the library with gates.")
        self.global_router = global_router
        self.embedder = embedder
        k = min(self.config.top_k, len(library.experts))
        top_k = 1 if self.config.method in ("retrieval", "oracle") else k
        self.state = RouteState(mode=_MODE.get(self.config.method, "fixed"), top_k=top_k, alpha=1.0,
                                temperature=self.config.temperature)
        if self.config.method == "uniform":
            self.state.weights = torch.full((len(library.experts),), 1.0 / len(library.experts))
        self._stacks: dict[str, LoraStack] | None = None
        self._exit: list[Any] = []
        self.last: dict[str, Any] = {}  # what the last prepare computed (instructions, scores, alphas)

    @property
    def stacks(self) -> dict[str, LoraStack]:
        """The library's stacked factors (read once)."""
        if self._stacks is None:
            self._stacks = self.library.stacks()
        return self._stacks

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of ``prompts`` as evaluation encodes them; a prompt longer than the context is an error."""
        from expertkit.route.global_router import check_fits, context_length
        from expertkit.tasks.infer import encode_prompts

        limit = context_length(self.loaded.model)
        raw = [list(ids) for ids in self.loaded.tokenizer(list(prompts)).input_ids]
        for ids in raw:
            check_fits(len(ids), limit, "a query")
        return encode_prompts(self.loaded.tokenizer, prompts, self.config.max_prompt_tokens)

    def query_scores(self, prompts: Sequence[str], task: Any = None) -> torch.Tensor:
        """Per-query scores ``(Q, E)`` of the method (GLIDER's already multiplied by each query's alpha)."""
        method, n = self.config.method, len(self.library.experts)
        if method in ("glider", "global"):
            scores, written = self.global_router.scores(prompts)
            alphas = [self.config.alpha_for(float(s.max())) for s in scores]
            self.last = {"instructions": written, "scores": scores, "alphas": alphas}
            return scores * torch.tensor(alphas)[:, None] if method == "glider" else scores
        if method == "retrieval":
            from expertkit.route.global_router import retrieval_scores

            scores = retrieval_scores(self.embedder, prompts, self._expert_inputs())
            self.last = {"scores": scores}
            return scores
        if method == "oracle":
            task = getattr(task, "name", task)
            idx = None if task is None else self.library.expert_for_task(task)
            if idx is None:
                raise ConfigError(f"the oracle needs a held-in task (one with an expert); '{task}' has none.")
            return torch.nn.functional.one_hot(torch.full((len(prompts),), idx), n).float()
        return torch.zeros(len(prompts), n)

    def _expert_inputs(self) -> list[list[str]]:
        from expertkit.route.api import expert_inputs

        return expert_inputs(self.library, self.config.retrieval_examples, self.config.seed) or []

    def prepare(self, prompts: Sequence[str], *, task: Any = None) -> list[list[int]]:
        """Register ``prompts`` for routing (and fit LoraHub's weights on ``task``, a Task or a registered
        name); returns their token ids."""
        ids = self.encode(prompts)
        if self.state.mode in ("glider", "global"):
            scores = self.query_scores(prompts, task)
            for row, s in zip(ids, scores, strict=True):
                self.state.table[tuple(row)] = s
        if self.config.method == "lorahub":
            if task is None:
                raise ConfigError("LoraHub fits its weights on a few examples of the target task; pass task=.")
            from expertkit.route.lorahub import fit_lorahub

            self.state.weights = fit_lorahub(self, task).weights
        return ids

    def __enter__(self) -> Any:
        if self.config.method == "base":
            return self.loaded.model
        if self.config.method == "arrow":
            return self._enter_arrow()
        self._exit.append(attach(self.loaded.model, self.stacks, self.state))
        self._exit.append(query_hook(self.loaded.model, self.state))
        return self.loaded.model

    def _enter_arrow(self) -> Any:
        import warnings

        from peft import ArrowConfig, create_arrow_model

        cfg = ArrowConfig(top_k=min(self.config.top_k, len(self.library.experts)),
                          router_temperature=self.config.arrow_temperature, rng_seed=self.config.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = create_arrow_model(self.loaded.model, [str(e.adapter) for e in self.library.experts], cfg)
        peft_model.eval()
        self._exit.append(peft_model.unload)
        return peft_model

    def __exit__(self, *exc: object) -> None:
        while self._exit:
            self._exit.pop()()

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, *, batch_size: int = 8,
                 task: Any = None) -> list[str]:
        """Greedy routed continuations (first line of each) of ``prompts``, batched."""
        from expertkit.tasks.infer import greedy_generate

        ids = self.prepare(prompts, task=task)
        with self as model:
            return greedy_generate(model, self.loaded.tokenizer, ids, max_new_tokens, batch_size=batch_size)
