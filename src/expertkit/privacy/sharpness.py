"""Sharpness: the top Hessian eigenvalue of the training loss, by power iteration.

Hessian-vector products are Pearlmutter's reverse-over-reverse products (``torch.autograd.grad``
of ``grad · v``), with the attention switched to the eager implementation while measuring (the
fused CPU attention kernel has no double backward). Why not ``curvlinops-for-pytorch``: its
Hessian operator multiplies by forward-over-reverse AD (``torch.func.jvp`` of ``jacrev``), and on
torch 2.13 that fails on the SiLU of Llama-style MLPs (``NotImplementedError: forward AD with
aten::silu_backward``; checked on the tiny Llama, December 2026). The gradient graph is built once
and every iteration is one extra backward pass.

Power iteration converges to the eigenvalue of largest magnitude; near a minimum that is the top
one, elsewhere (a negative dominant eigenvalue) a second, shifted power iteration gives the top one.
``block`` restricts the Hessian to part of one parameter (a layer's prefix columns), i.e.
the top eigenvalue of that diagonal block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from expertkit.train.data import per_example_loss


@contextlib.contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Run ``model`` (a transformers model, or a PEFT model around one) with eager attention."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    old = getattr(config, "_attn_implementation", None)
    if config is None or old in (None, "eager") or not hasattr(inner, "set_attn_implementation"):
        yield
        return
    inner.set_attn_implementation("eager")
    try:
        yield
    finally:
        inner.set_attn_implementation(old)


def _restrict(vecs: list[torch.Tensor], block: tuple[int, slice] | None) -> list[torch.Tensor]:
    if block is None:
        return vecs
    index, cols = block
    out = [torch.zeros_like(v) for v in vecs]
    out[index][:, cols] = vecs[index][:, cols]
    return out


def _power(hvp: Any, v: list[torch.Tensor], iters: int, shift: float = 0.0) -> float:
    """Dominant eigenvalue of ``H - shift * I`` by ``iters`` power steps from ``v`` (Rayleigh quotient)."""
    lam = 0.0
    for _ in range(iters):
        norm = torch.sqrt(sum((x.double() ** 2).sum() for x in v))
        if norm == 0:
            return 0.0
        v = [x / norm.to(x.dtype) for x in v]
        hv = [h - shift * x for h, x in zip(hvp(v), v, strict=True)]  # (H - shift I) v
        lam = float(sum((a.double() * b.double()).sum() for a, b in zip(v, hv)))
        v = hv
    return lam


def power_iteration(loss: torch.Tensor, params: Sequence[torch.Tensor], *, iters: int = 20, seed: int = 0,
                    block: tuple[int, slice] | None = None) -> float:
    """Top (largest algebraic) eigenvalue of the Hessian of scalar ``loss`` w.r.t. ``params``.

    Power iteration finds the eigenvalue of largest magnitude, ``d``. When ``d < 0`` (negative
    curvature dominates, as away from a minimum) the top eigenvalue is found by a second power
    iteration on ``H - d I``, whose spectrum ``[0, top - d]`` is nonnegative with ``top - d`` dominant.
    """
    params = list(params)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(seed)
    start = _restrict([torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params], block)

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)  # H v, one backward
        return _restrict([h.detach() for h in hv], block)

    dominant = _power(hvp, start, iters)
    if dominant >= 0:
        return dominant
    return _power(hvp, start, iters, shift=dominant) + dominant


def top_eigenvalue(model: Any, params: Sequence[torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                   *, iters: int = 20, seed: int = 0, block: tuple[int, slice] | None = None) -> float:
    """Top Hessian eigenvalue of the mean per-example loss of ``batch`` = ``(ids, mask, labels)``."""
    was_training = model.training
    model.eval()
    try:
        with eager_attention(model), torch.enable_grad():
            loss = per_example_loss(model, *batch).mean()  # ()
            return power_iteration(loss, params, iters=iters, seed=seed, block=block)
    finally:
        model.train(was_training)
