"""The client's local work: its data shard, LoRA state in and out, local training, evaluation.

Each process keeps one base model wrapped with PEFT LoRA (:func:`workspace`); a round loads the
global LoRA tensors into it, trains ``local_steps`` AdamW steps on the client's shard (loss on
the target tokens, :mod:`expertkit.train.data`), and returns the new LoRA tensors. The LoRA init
is seeded, so every process starts from the same global adapter. With ``proximal_mu > 0`` (FedProx)
the loss gets ``mu / 2 * ||w - w_global||^2``.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from expertkit.errors import ConfigError
from expertkit.federated.config import FlConfig

_SPACES: dict[tuple[Any, ...], Workspace] = {}


def get_fl_task(name: str) -> Any:
    """A registered task, or ``toy:copy`` / ``toy:lohi`` (test tasks)."""
    if name.startswith("toy:"):
        from expertkit.tasks import toy

        builders = {"copy": toy.copy_task, "lohi": toy.lohi_task}
        if name[4:] not in builders:
            from expertkit.errors import unknown

            raise unknown("toy task", name, [f"toy:{k}" for k in builders])
        return builders[name[4:]]()
    from expertkit.tasks import get_task

    return get_task(name)


def _load(model: str) -> tuple[Any, Any]:
    if model.startswith("tiny:"):
        from expertkit.models.tiny import tiny_model, tiny_tokenizer

        return tiny_model(model[5:], seed=0), tiny_tokenizer()
    from expertkit.models import load_model

    loaded = load_model(model)
    if loaded.tokenizer is None:
        raise ConfigError(f"model '{model}' has no tokenizer; federated training needs one.")
    return loaded.model, loaded.tokenizer


@dataclass
class Workspace:
    """A LoRA-wrapped model of one process, shared by the clients (and server) running there."""

    model: Any  # peft model
    tokenizer: Any
    names: list[str]  # LoRA parameter names, in a fixed order
    initial: OrderedDict[str, np.ndarray] | None = None  # the seeded LoRA init (the first global adapter)

    def get_state(self) -> OrderedDict[str, np.ndarray]:
        """The LoRA tensors as numpy arrays (copies)."""
        params = dict(self.model.named_parameters())
        return OrderedDict((n, params[n].detach().cpu().numpy().copy()) for n in self.names)

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Load LoRA tensors; the names must be exactly this model's LoRA parameters."""
        if set(state) != set(self.names):
            missing, extra = sorted(set(self.names) - set(state)), sorted(set(state) - set(self.names))
            raise ConfigError(f"LoRA state does not match the model (missing {missing[:3]}, unexpected {extra[:3]}).")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n in self.names:
                params[n].copy_(torch.from_numpy(np.asarray(state[n])))


def workspace(cfg: FlConfig) -> Workspace:
    """This process's LoRA-wrapped model for ``cfg`` (built once, seeded LoRA init)."""
    key = (cfg.model, cfg.rank, cfg.alpha, tuple(cfg.target_modules), cfg.seed)
    if key not in _SPACES:
        import warnings

        from peft import LoraConfig, get_peft_model

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        model, tok = _load(cfg.model)
        lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=list(cfg.target_modules),
                          bias="none", task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.manual_seed(cfg.seed)
            peft_model = get_peft_model(model, lora)
        peft_model.eval()
        names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        if not names:
            raise ConfigError(f"target_modules {list(cfg.target_modules)} match no layer of {cfg.model}.")
        _SPACES.clear()  # one model per process
        ws = Workspace(peft_model, tok, names)
        ws.initial = ws.get_state()
        _SPACES[key] = ws
    return _SPACES[key]


def shard(cfg: FlConfig, partition: int) -> list[Any]:
    """Client ``partition``'s training examples: IID (shuffled) or non-IID (sorted by answer) split."""
    if not 0 <= partition < cfg.clients:
        raise ConfigError(f"partition {partition} is outside 0..{cfg.clients - 1}.")
    task = get_fl_task(cfg.task)
    pool = task.examples("train", cfg.examples_per_client * cfg.clients, cfg.seed)
    if cfg.split == "iid":
        random.Random(cfg.seed).shuffle(pool)
        return pool[partition :: cfg.clients]
    pool = sorted(pool, key=lambda e: (str(e.answer), e.prompt))  # label skew: each client sees few answers
    size = len(pool) // cfg.clients
    return pool[partition * size : (partition + 1) * size]


def train_local(cfg: FlConfig, partition: int, state: dict[str, np.ndarray], server_round: int,
                proximal_mu: float = 0.0) -> tuple[OrderedDict[str, np.ndarray], int, float]:
    """Train the client's shard from the global ``state``; returns (new state, examples, mean loss)."""
    from expertkit.train.data import batch_indices, encode_examples, make_loss_fn

    ws = workspace(cfg)
    task = get_fl_task(cfg.task)
    examples = shard(cfg, partition)
    rows = encode_examples(ws.tokenizer, task, examples, cfg.max_prompt_tokens)
    ws.set_state(state)
    params = dict(ws.model.named_parameters())
    trainable = [params[n] for n in ws.names]
    anchor = [p.detach().clone() for p in trainable] if proximal_mu > 0 else None
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    losses = []
    data_seed = cfg.seed * 1000 + partition
    ws.model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(data_seed * 100_003 + server_round)
        for k in range(cfg.local_steps):
            step = (server_round - 1) * cfg.local_steps + k
            batch = [rows[i] for i in batch_indices(step, cfg.batch_size, len(rows), data_seed)]
            loss = make_loss_fn(ws.model, ws.tokenizer, batch)().mean()
            if anchor is not None:
                loss = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(trainable, anchor, strict=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    ws.model.eval()
    return ws.get_state(), len(rows), float(np.mean(losses))


def evaluate_state(cfg: FlConfig, state: dict[str, np.ndarray] | None) -> Any:
    """The :class:`~expertkit.tasks.evaluate.EvalResult` (per-example predictions and scores) of the global
    LoRA ``state`` on ``eval_n`` test examples (seed 0: the same examples in every run, for paired tests)."""
    from expertkit.tasks.evaluate import evaluate

    ws = workspace(cfg)
    if state is not None:
        ws.set_state(state)
    with torch.no_grad():
        return evaluate(ws.model, ws.tokenizer, get_fl_task(cfg.task), split="test", n=cfg.eval_n, seed=0,
                        max_prompt_tokens=cfg.max_prompt_tokens)
