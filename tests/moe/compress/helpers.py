"""Hand-made MoE layers and tiny MoE folders with known answers, shared by the compression tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from expertkit.moe.compress import LayerInput, StackedExperts


def expert(inter: int = 24, hidden: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random SwiGLU expert: gate, up ``(I, H)`` and down ``(H, I)``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(inter, hidden, generator=g), torch.randn(inter, hidden, generator=g),
            torch.randn(hidden, inter, generator=g))


def permuted_copies(n: int, inter: int = 24, hidden: int = 12, seed: int = 0):
    """``(gate (n, I, H), up, down (n, H, I), perms)``: expert 0 and ``n - 1`` neuron-permuted copies of it."""
    gate, up, down = expert(inter, hidden, seed)
    g = torch.Generator().manual_seed(seed + 1)
    perms = [torch.arange(inter)] + [torch.randperm(inter, generator=g) for _ in range(n - 1)]
    return (torch.stack([gate[p] for p in perms]), torch.stack([up[p] for p in perms]),
            torch.stack([down[:, p] for p in perms]), perms)


def layer(gate, up, down, *, keep: int, frequencies=None, similarity=None, output_mean=None, reap=None,
          seed: int = 0) -> LayerInput:
    """A :class:`LayerInput` over the given experts (uniform frequencies, identity similarity by default)."""
    e, _i, h = gate.shape
    freq = np.full(e, 1.0 / e) if frequencies is None else np.asarray(frequencies, dtype=float)
    sim = np.eye(e) if similarity is None else np.asarray(similarity, dtype=float)
    router = torch.randn(e, h, generator=torch.Generator().manual_seed(seed))
    return LayerInput("0", StackedExperts(gate, up, down), router, freq, sim, output_mean, reap, keep, np.random.default_rng(seed))


def swiglu(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One expert's output ``(N, H)`` on ``x (N, H)``."""
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T


def save_with_permuted_experts(arch: str, path: Path, seed: int = 0) -> Path:
    """A tiny ``arch`` MoE whose experts in every layer are neuron-permuted copies of its expert 0."""
    from expertkit.models.tiny import tiny_model, tiny_tokenizer
    from expertkit.moe.compressed import experts_modules

    model = tiny_model(arch, seed)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for _router, experts in experts_modules(model).values():
            gu, down = experts.gate_up_proj, experts.down_proj  # (E, 2I, H), (E, H, I)
            inter = down.shape[-1]
            for e in range(1, gu.shape[0]):
                p = torch.randperm(inter, generator=g)
                gu[e, :inter] = gu[0, :inter][p]
                gu[e, inter:] = gu[0, inter:][p]
                down[e] = down[0][:, p]
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def save_with_strong_experts(arch: str, path: Path, scale: float = 6.0, seed: int = 0) -> Path:
    """A tiny ``arch`` MoE whose expert weights are ``scale`` times the random init, so that the experts
    (and what compression does to them) visibly move the logits of the otherwise near-uniform model."""
    from expertkit.models.tiny import tiny_model, tiny_tokenizer
    from expertkit.moe.compressed import experts_modules

    model = tiny_model(arch, seed)
    with torch.no_grad():
        for _router, experts in experts_modules(model).values():
            experts.gate_up_proj.mul_(scale)  # (E, 2I, H)
            experts.down_proj.mul_(scale)  # (E, H, I)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
