"""Evolved bases: continue pretraining a model on another corpus to make its "version 2".

PortLLM's setting is a base model that keeps being updated (continued pretraining, a new
release) while users hold patches made on an older version. Real evolved checkpoints are
rarely at hand offline, so :func:`evolve` makes one: full-parameter causal-LM training of
``base`` on a text corpus for ``steps`` AdamW steps, written as a normal Hugging Face folder
(loadable with transformers and :func:`expertkit.models.load_model`) with

* ``README.md``: a model card saying how the model was made (parent, corpus, steps, lr, seed,
  loss before/after);
* ``expertkit.json``: the same provenance as data (``kind: "evolved"``, the parent's
  fingerprint, the loss curve).

Corpus: ``"bbc"`` (the BBC News articles of the *train* split of the ``bbc_topic`` task, so the
task's validation and test articles are never seen), or a path to a ``.txt`` file (documents
separated by blank lines) or a folder of ``.txt`` files. Documents are tokenised, joined with
the EOS token and cut into blocks of ``seq_len`` tokens; blocks are visited in a seeded
permutation. The output is written to a temporary sibling folder and renamed into place, so an
interrupted run leaves no half-written model.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from expertkit.errors import CheckpointError, ConfigError
from expertkit.fileio import check_writable, staged_folder

META_NAME = "expertkit.json"


@dataclass
class EvolveResult:
    """What :func:`evolve` wrote: the folder, the loss curve and the provenance record."""

    path: Path
    losses: list[float]
    meta: dict[str, Any]


def corpus_documents(corpus: str | os.PathLike[str]) -> list[str]:
    """The documents of ``corpus`` (``"bbc"``, a ``.txt`` file or a folder of them)."""
    if str(corpus) == "bbc":
        from expertkit.tasks.bbc import split_articles

        return [text for items in split_articles("train").values() for _, text in items]
    path = Path(corpus).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ConfigError(f"corpus folder {path} has no .txt files. Pass a folder of .txt files or 'bbc'.")
        return [f.read_text(errors="replace").strip() for f in files if f.read_text(errors="replace").strip()]
    if path.is_file():
        docs = [d.strip() for d in path.read_text(errors="replace").split("\n\n") if d.strip()]
        if not docs:
            raise ConfigError(f"corpus file {path} is empty.")
        return docs
    raise ConfigError(f"corpus '{corpus}' not found. Pass 'bbc', a .txt file or a folder of .txt files.")


def token_blocks(tokenizer: Any, docs: list[str], seq_len: int) -> torch.Tensor:
    """``docs`` tokenised, joined by EOS and cut into ``(n_blocks, seq_len)`` (the tail is dropped)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise ConfigError(f"the corpus has {len(ids)} tokens, fewer than one block of {seq_len}; use a bigger corpus.")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (n_blocks, seq_len)


def _model_card(meta: dict[str, Any]) -> str:
    first, last = meta["loss_first"], meta["loss_last"]
    return (
        f"# {meta['name']}\n\n"
        f"An **evolved base** made by `expertkit evolve`: `{meta['parent']}` (fingerprint "
        f"`{meta['parent_fingerprint']}`) after {meta['steps']} steps of continued causal-LM pretraining "
        f"on the corpus `{meta['corpus']}` ({meta['corpus_blocks']} blocks of {meta['seq_len']} tokens).\n\n"
        f"- optimizer: AdamW, lr {meta['lr']} (linear warm-up over {meta['warmup']} steps, then constant), "
        f"weight decay 0, batch {meta['batch_size']} blocks, seed {meta['seed']}\n"
        f"- training loss: {first:.4f} on the first step, {last:.4f} averaged over the last 10% of steps\n"
        f"- all parameters were trained; the architecture, tokenizer and vocabulary are the parent's.\n\n"
        "It stands in for a new release of the parent model in PortLLM experiments: patches made on the "
        "parent can be ported onto it with `expertkit port apply`.\n"
    )


def _write(model: Any, tokenizer: Any, out_dir: Path, meta: dict[str, Any]) -> None:
    with staged_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(meta))
        (tmp / META_NAME).write_text(json.dumps(meta, indent=1))


def evolve(  # noqa: PLR0913 - keyword options of one training run
    base: Any,
    out_dir: str | os.PathLike[str],
    *,
    corpus: str | os.PathLike[str] = "bbc",
    steps: int = 100,
    lr: float = 5e-5,
    batch_size: int = 4,
    seq_len: int = 128,
    warmup: int = 10,
    seed: int = 0,
    overwrite: bool = False,
) -> EvolveResult:
    """Continue pretraining ``base`` on ``corpus`` and write the evolved model to ``out_dir``.

    Args:
        base: a :class:`~expertkit.models.LoadedModel` (its weights are **not** changed: a copy is
            trained) or any source :func:`~expertkit.models.load_model` accepts.
        out_dir: the folder to create; refused when it exists unless ``overwrite``.
        corpus: ``"bbc"``, a ``.txt`` file or a folder of ``.txt`` files (see the module docstring).
        steps, lr, batch_size, seq_len, warmup, seed: the training run (AdamW, no weight decay).
    """
    import copy

    from expertkit.models.loader import LoadedModel, load_model
    from expertkit.progress import track
    from expertkit.weights.fingerprint import fingerprint

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"output folder exists: {out_dir}. Choose another path, or pass --overwrite (overwrite=True in Python).")
    check_writable(out_dir)  # before training, not after
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len)):
        if value < 1:
            raise ConfigError(f"evolve: {name} must be at least 1, got {value}.")
    if not lr > 0:
        raise ConfigError(f"evolve: lr must be positive, got {lr}.")
    loaded = base if isinstance(base, LoadedModel) else load_model(base)
    if loaded.tokenizer is None:
        raise ConfigError(f"model '{loaded.name}' has no tokenizer; evolve needs one to read the corpus.")
    parent_fp = loaded.fingerprint or fingerprint(dict(loaded.model.state_dict()))
    blocks = token_blocks(loaded.tokenizer, corpus_documents(corpus), seq_len)  # (n_blocks, seq_len)
    model = copy.deepcopy(loaded.model).float()
    model.requires_grad_(True)  # a caller (e.g. LoRA training) may have frozen the base
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=gen)
    losses: list[float] = []
    started = time.perf_counter()
    for step in track(range(steps), f"Evolving {loaded.name}", total=steps):
        idx = [int(order[(step * batch_size + i) % len(order)]) for i in range(batch_size)]
        batch = blocks[idx]  # (batch, seq_len)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup))
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    tail = losses[-max(1, steps // 10):]
    meta = {
        "format": "expertkit-evolved", "kind": "evolved", "name": out_dir.name, "parent": loaded.name,
        "parent_fingerprint": parent_fp, "corpus": str(corpus), "corpus_blocks": len(blocks),
        "steps": steps, "lr": lr, "batch_size": batch_size, "seq_len": seq_len, "warmup": warmup, "seed": seed,
        "loss_first": losses[0], "loss_last": sum(tail) / len(tail), "losses": losses,
        "seconds": time.perf_counter() - started,
    }
    _write(model, loaded.tokenizer, out_dir, meta)
    return EvolveResult(out_dir, losses, meta)
