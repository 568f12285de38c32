"""Knowledge-distillation recovery: a compressed MoE learns its original's next-token distributions.

The student is the compressed model as :func:`expertkit.models.load_model` gives it (fewer experts,
group routing, factored experts as they are); only its experts' parameters train (routers,
attention, norms and embeddings stay frozen, so the routing stays the one the compression chose).
Each step runs the original MoE (the teacher, no gradient) and the student on the same batch: task
rows of the calibration tasks' train split plus BBC News text (the MoE build's own data mix,
:class:`~expertkit.moe.data.ClusterData`), and minimises ``T^2 KL(softmax(t / T) || softmax(s / T))``
averaged over every real token position, with AdamW.

:func:`write_recovered` writes the trained experts back: the compressed folder's tensors, experts
taken from memory, streamed into a new folder (and the stock form beside it, when there is one).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from expertkit.moe.compress.config import Distill
from expertkit.moe.compressed import FACTORS, LAYOUT_KEY, PARTS, FactoredExperts, experts_modules


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """``T^2 KL(teacher || student)`` per token, averaged over real positions; logits ``(B, L, V)``, mask ``(B, L)``."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (B, L, V)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)  # (B, L)
    m = mask.float()
    return temperature**2 * (kl * m).sum() / m.sum().clamp(min=1.0)


def distill(student: Any, teacher: Any, tokenizer: Any, tasks: list[str], config: Distill, *, seed: int = 0,
            pool_per_task: int = 64) -> dict[str, Any]:
    """Train ``student``'s experts for ``config.steps`` steps against ``teacher``; returns losses and time."""
    from expertkit.moe.data import ClusterData, text_rows
    from expertkit.progress import loss_bar
    from expertkit.tasks.base import get_task
    from expertkit.tasks.infer import pad_id_of
    from expertkit.train.data import collate, encode_examples

    rows = {}
    for name in tasks:
        task = get_task(name)
        rows[name] = encode_examples(tokenizer, task, task.examples("train", pool_per_task, seed), 256)
    text = text_rows(tokenizer, config.text_tokens) if config.general_fraction > 0 else []
    data = ClusterData("kd", rows, text)
    trainable = [p for _r, e in experts_modules(student).values() for p in e.parameters()]
    ids_of = {id(p) for p in trainable}
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    for p in student.parameters():
        p.requires_grad_(id(p) in ids_of)
    teacher.eval()
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    losses: list[float] = []
    began = time.perf_counter()
    pad = pad_id_of(tokenizer)
    try:
        with torch.random.fork_rng(devices=[]), loss_bar("Distillation", config.steps) as advance:
            torch.manual_seed(seed)
            student.train()
            for step in range(config.steps):
                ids, mask, _labels = collate(data.batch(step, config.batch_size, config.general_fraction, seed, 0), pad)
                with torch.no_grad():
                    target = teacher(input_ids=ids, attention_mask=mask).logits  # (B, L, V)
                loss = kd_loss(student(input_ids=ids, attention_mask=mask).logits, target, mask, config.temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                advance(losses[-1])
    finally:
        student.eval()
        for n, p in student.named_parameters():
            p.requires_grad_(flags[n])
    return {"steps": config.steps, "losses": losses, "seconds": time.perf_counter() - began,
            "config": config.model_dump(mode="json"), "tasks": list(tasks), "trainable_parameters": sum(
                p.numel() for p in trainable)}


def memory_experts(model: Any, layout: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The on-disk expert tensors of ``model`` (named by ``layout``'s templates), from memory."""
    tmpl = layout["templates"]
    out: dict[str, torch.Tensor] = {}
    for (_stack, layer), (_router, experts) in experts_modules(model).items():
        if isinstance(experts, FactoredExperts):
            for g, ex in enumerate(experts.experts):
                for p in PARTS:
                    for suffix in FACTORS:
                        out[tmpl[p].format(layer=layer, expert=g, suffix=suffix)] = getattr(ex[p], suffix).detach()
            continue
        gu, down = experts.gate_up_proj.detach(), experts.down_proj.detach()  # (G, 2I, H), (G, H, I)
        inter = down.shape[-1]
        for g in range(gu.shape[0]):
            parts = {"gate": gu[g, :inter], "up": gu[g, inter:], "down": down[g]}
            for p in PARTS:
                out[tmpl[p].format(layer=layer, expert=g, suffix="weight")] = parts[p].contiguous()
    return out


def _stock_experts(model: Any, layout: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Dense expert weights under the stock names (factored experts multiplied out)."""
    tmpl = layout["templates"]
    out: dict[str, torch.Tensor] = {}
    for (_stack, layer), (_router, experts) in experts_modules(model).items():
        if not isinstance(experts, FactoredExperts):
            continue
        for g, ex in enumerate(experts.experts):
            for p in PARTS:
                lin = ex[p]
                w = (lin.lowrank_b @ lin.lowrank_a).detach().clone()
                if lin.sparse_index.numel():
                    w[:, lin.sparse_index] += lin.sparse_values.detach()
                out[tmpl[p].format(layer=layer, expert=g, suffix="weight")] = w
    return out


def write_recovered(model: Any, compressed: str | os.PathLike[str], out: str | os.PathLike[str],
                    record: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``compressed`` with its experts replaced by ``model``'s (and ``record`` merged into compress.json)."""
    from expertkit.errors import ConfigError
    from expertkit.fileio import install_folder, write_atomic
    from expertkit.moe.compress.run import RECORD
    from expertkit.weights import Checkpoint, ShardedWriter

    src, out = Path(compressed), Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"output folder exists: {out}. Choose another path or pass --overwrite.")
    layout = json.loads((src / "config.json").read_text())[LAYOUT_KEY]
    mem = memory_experts(model, layout)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        forms = [(src, tmp / "model", mem)]
        if (src / "stock").is_dir():
            forms.append((src / "stock", tmp / "stock", {**mem, **_stock_experts(model, layout)}))
        for folder, dest, tensors in forms:
            with Checkpoint(folder) as ckpt, ShardedWriter(dest, template=folder, max_shard_size="2GB") as writer:
                for name in ckpt.names():
                    t = tensors.get(name)
                    writer.add(name, ckpt.read(name) if t is None else t.to(ckpt.info(name).dtype))
        info = json.loads((src / RECORD).read_text())
        info.update(record)
        write_atomic(tmp / "model" / RECORD, json.dumps(info, indent=1) + "\n")
        if len(forms) > 1:
            os.replace(tmp / "stock", tmp / "model" / "stock")
        install_folder(tmp / "model", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
