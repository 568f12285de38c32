"""Branch and train: one expert's MLPs trained at full rank on its cluster, resumably.

Only the tensors of the ``mlp`` group (from the architecture descriptor: gate/up/down projections
of every layer) are trained, every element of them (no low-rank adapter), with AdamW; attention,
norms and embeddings stay the base's, so the mixture shares them exactly. The caller's model gets
its MLP weights back afterwards.

An expert is written as one safetensors file of its MLP tensors (atomically; its metadata holds
the identity of its recipe), so a finished expert is reused, and progress is saved every
``save_every`` steps into a checkpoint next to it (:mod:`expertkit.train.state`), from which an
interrupted build resumes with the same result as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from expertkit.errors import ConfigError
from expertkit.fileio import fsync_path, umask, writing
from expertkit.moe.config import MoeBuildConfig
from expertkit.moe.data import ClusterData
from expertkit.train.data import collate, per_example_loss
from expertkit.train.state import load_checkpoint, save_checkpoint

META_KEY = "expertkit.moe_expert"


def mlp_names(model: Any) -> list[str]:
    """Names of the model's dense MLP weights (the descriptor's ``mlp`` group), in model order."""
    from expertkit.weights.arch import InferredArchitectureWarning, describe

    names = [n for n, _ in model.named_parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InferredArchitectureWarning)
        summary = describe(names, model.config)
    found = [n for n in names if summary.roles[n].group == "mlp"]
    if not found:
        raise ConfigError(f"model_type {model.config.model_type!r} has no dense MLP tensors to branch into experts.")
    return found


def identity(config: MoeBuildConfig, index: int, base_fingerprint: str) -> str:
    """Hash of everything that determines expert ``index``'s weights."""
    text = json.dumps({"recipe": config.expert_fields(index), "base": base_fingerprint}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def finished(path: Path, ident: str) -> bool:
    """Whether ``path`` holds a finished expert of recipe ``ident``."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get(META_KEY, "{}"))
    except (OSError, ValueError):
        return False
    return meta.get("identity") == ident


@contextlib.contextmanager
def _branch(model: Any, names: list[str]) -> Iterator[list[torch.nn.Parameter]]:
    """Make only ``names`` trainable; restore their values and every flag afterwards."""
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    saved = {n: params[n].detach().clone() for n in names}  # one copy of the MLPs (~0.3 GB for 135M)
    for p in params.values():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
    try:
        yield [params[n] for n in names]
    finally:
        with torch.no_grad():
            for n in names:
                params[n].copy_(saved[n])
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.eval()


def train_expert(model: Any, tokenizer: Any, data: ClusterData, config: MoeBuildConfig, index: int,
                 out: Path, ident: str) -> dict[str, Any]:
    """Train expert ``index`` and write its MLP tensors to ``out``; returns its record (losses, seconds)."""
    from safetensors.torch import save_file

    from expertkit.progress import loss_bar
    from expertkit.tasks.infer import pad_id_of

    if finished(out, ident):
        return _record(out)
    names = mlp_names(model)
    ckpt = out.with_name(f".{out.stem}.state.safetensors")
    pad = pad_id_of(tokenizer)
    with torch.random.fork_rng(devices=[]), _branch(model, names) as params:
        torch.manual_seed(config.seed + 1000 * index)
        opt = torch.optim.AdamW(params, lr=config.expert_lr, weight_decay=0.0)
        start, losses, prior = 0, [], 0.0
        if ckpt.is_file():
            trainable, opt_state, rng, record = load_checkpoint(ckpt)
            if record.get("identity") == ident and sorted(trainable) == sorted(names):
                with torch.no_grad():
                    for n, p in zip(names, params, strict=True):
                        p.copy_(trainable[n])
                opt.load_state_dict(opt_state)
                torch.set_rng_state(rng)
                start, losses, prior = record["step"], list(record["losses"]), record["seconds"]
        began = time.perf_counter()
        model.train()
        with loss_bar(f"Expert {index} ({data.name})", config.expert_steps, start) as advance:
            for step in range(start, config.expert_steps):
                rows = data.batch(step, config.batch_size, config.general_fraction, config.seed, index)
                ids, mask, labels = collate(rows, pad)
                loss = per_example_loss(model, ids, mask, labels).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                advance(losses[-1])
                done = step + 1
                if config.save_every and done % config.save_every == 0 and done < config.expert_steps:
                    save_checkpoint(ckpt, trainable=dict(zip(names, params, strict=True)),
                                    optimizer_state=opt.state_dict(), rng_state=torch.get_rng_state(),
                                    record={"identity": ident, "step": done, "losses": losses,
                                            "seconds": prior + time.perf_counter() - began})
        model.eval()
        record = {"identity": ident, "index": index, "cluster": data.name, "tasks": sorted(data.tasks),
                  "steps": config.expert_steps, "losses": losses,
                  "seconds": prior + time.perf_counter() - began}
        tensors = {n: p.detach().contiguous().clone() for n, p in zip(names, params, strict=True)}
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600
        os.close(fd)
        try:
            with writing(out):
                save_file(tensors, tmp, metadata={META_KEY: json.dumps(record)})
            fsync_path(Path(tmp))
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    ckpt.unlink(missing_ok=True)
    return record


def _record(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return json.loads((fh.metadata() or {})[META_KEY])


def write_dense_expert(base_folder: Path, mlp_file: Path, out_dir: Path) -> Path:
    """A full dense model folder: the base with its MLP tensors replaced by ``mlp_file``'s (streamed)."""
    from expertkit.fileio import staged_folder
    from expertkit.weights import Checkpoint, ShardedWriter

    with staged_folder(out_dir) as tmp, Checkpoint(base_folder) as base, Checkpoint(mlp_file) as mlp:
        replaced = set(mlp.names())
        missing = replaced - set(base.names())
        if missing:
            raise ConfigError(f"{mlp_file}: tensors {sorted(missing)[:3]} are not in the base {base_folder}.")
        with ShardedWriter(tmp, template=base_folder, layout=base.infos(), max_shard_size="2GB",
                           overwrite=True) as writer:
            for name in base.names():
                writer.add(name, mlp.read(name) if name in replaced else base.read(name))
    return out_dir
