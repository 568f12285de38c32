"""The seeded-perturbation engine behind every zeroth-order method.

A random direction ``z`` is never stored: it is regenerated from a seed whenever it is
needed, one tensor at a time, with a private :class:`torch.Generator` (the global RNG is
never touched). Tensor ``i`` of a direction with seed ``s`` is drawn from the generator
seeded with ``derive_seed(s, i)``, so any tensor can be regenerated alone, in any order.

Parameters are changed **in place**: the memory beyond inference is one direction tensor
(the largest trainable tensor) at a time, plus, with ``exact=True``, the few coordinates
that in-place float arithmetic cannot give back. ``θ + δ - δ`` is not always ``θ`` in
floating point (for small ``|θ|`` the addition loses low bits); :meth:`ZOEngine.add` with
``record=True`` notes, chunk by chunk, the coordinates where undoing would not restore the
bits and keeps their original values (about 7% of the coordinates at ``eps=1e-3`` on
weights of size ~0.02; 8 bytes each). :meth:`ZOEngine.undo` subtracts and puts those back,
so a perturbation followed by its undo leaves the parameters bit-identical.

Coordinates: each tensor may be restricted to a set of flat indices (gradient sparsity);
its direction then has one entry per selected coordinate and the rest is never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from expertkit.errors import ConfigError

_MASK64 = (1 << 64) - 1
CHUNK = 1 << 20  # coordinates checked at a time when recording a perturbation


def _mix(x: int) -> int:
    """splitmix64 finalizer: a well-spread 64-bit hash of ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (e.g. run seed, step, block, query, tensor)."""
    h = 0x2545F4914F6CDD1D
    for p in parts:
        h = _mix(h ^ (int(p) & _MASK64))
    return h >> 1


# (tensor id) -> (positions in the target vector, their original values)
Patches = dict[int, tuple[torch.Tensor, torch.Tensor]]
Transform = Callable[[int, torch.Tensor], torch.Tensor | None]


@dataclass
class Slot:
    """One trainable tensor and the coordinates of it that are perturbed (None = all)."""

    param: torch.Tensor
    index: torch.Tensor | None = None  # (k,) int64 flat indices, sorted

    @property
    def size(self) -> int:
        """Number of perturbed coordinates."""
        return self.param.numel() if self.index is None else int(self.index.numel())

    def shape(self) -> tuple[int, ...]:
        """Shape of a direction for this slot."""
        return tuple(self.param.shape) if self.index is None else (self.size,)


class ZOEngine:
    """Seeded in-place perturbations of a list of tensors.

    Args:
        params: the trainable tensors (contiguous); their order fixes the tensor ids.
        exact: record what in-place undo cannot restore, so undo is bit-exact.
    """

    def __init__(self, params: Sequence[torch.Tensor], *, exact: bool = True) -> None:
        for p in params:
            if not p.is_contiguous():
                raise ConfigError("zeroth-order training needs contiguous parameters; call .contiguous() first.")
            if not p.is_floating_point():
                raise ConfigError(f"zeroth-order training needs floating-point parameters, got {p.dtype}.")
        self.slots = [Slot(p) for p in params]
        self.exact = exact

    # ---------------------------------------------------------------- directions
    def set_index(self, i: int, index: torch.Tensor | None) -> None:
        """Perturb only the flat coordinates ``index`` of tensor ``i`` (None: all of them)."""
        self.slots[i].index = None if index is None else index.to(torch.long)

    def direction(self, i: int, seed: int) -> torch.Tensor:
        """Tensor ``i`` of the standard normal direction with ``seed`` (regenerated, not stored)."""
        slot = self.slots[i]
        gen = torch.Generator(device=slot.param.device)
        gen.manual_seed(derive_seed(seed, i))
        return torch.randn(slot.shape(), generator=gen, dtype=slot.param.dtype, device=slot.param.device)

    def combination(self, i: int, seeds: Sequence[int], coeffs: Sequence[float]) -> torch.Tensor:
        """``sum_j coeffs[j] * z_j`` for tensor ``i`` (one direction buffer, plus one when q > 1)."""
        out = self.direction(i, seeds[0]).mul_(coeffs[0])
        for s, c in zip(seeds[1:], coeffs[1:], strict=True):
            out.add_(self.direction(i, s).mul_(c))
        return out

    def dense(self, i: int, values: torch.Tensor) -> torch.Tensor:
        """``values`` of slot ``i`` placed in a zero tensor of the parameter's shape (tests, forward-grad)."""
        slot = self.slots[i]
        if slot.index is None:
            return values.reshape(slot.param.shape)
        out = torch.zeros(slot.param.numel(), dtype=values.dtype, device=values.device)
        out[slot.index] = values
        return out.view(slot.param.shape)

    # ---------------------------------------------------------------- in-place changes
    def add(
        self, ids: Sequence[int], seeds: Sequence[int], coeffs: Sequence[float], *,
        transform: Transform | None = None, record: bool = False,
    ) -> Patches:
        """``θ_i += transform(i, sum_j coeffs[j] z_ij)`` for every tensor id in ``ids``.

        With ``record=True`` (and ``exact``) the returned patches let :meth:`undo` restore the
        parameters bit for bit. ``transform`` (a method's update rule; may keep state) is
        applied to each tensor's combined direction; undo is only defined without it.
        """
        patches: Patches = {}
        with torch.no_grad():
            for i in ids:
                delta = self.combination(i, seeds, coeffs)
                if transform is not None:
                    delta = transform(i, delta)
                    if delta is None:  # the rule chose not to change this tensor
                        continue
                slot = self.slots[i]
                flat = slot.param.view(-1)
                target = flat if slot.index is None else flat[slot.index]  # (k,) copy when indexed
                d = delta.view(-1)
                if record and self.exact:
                    patches[i] = _add_recording(target, d)
                else:
                    target.add_(d)
                if slot.index is not None:
                    flat[slot.index] = target
        return patches

    def undo(self, ids: Sequence[int], seeds: Sequence[int], coeffs: Sequence[float], patches: Patches) -> None:
        """Exact inverse of ``add(ids, seeds, coeffs, record=True)`` given its patches."""
        with torch.no_grad():
            for i in ids:
                slot = self.slots[i]
                d = self.combination(i, seeds, coeffs).view(-1)
                flat = slot.param.view(-1)
                target = flat if slot.index is None else flat[slot.index]
                target.sub_(d)
                if i in patches:
                    pos, vals = patches[i]
                    target[pos.long()] = vals
                if slot.index is not None:
                    flat[slot.index] = target


def _add_recording(target: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``target += d`` chunk by chunk; return the positions (and old values) where ``-= d`` fails."""
    positions, values = [], []
    as_int = {torch.float32: torch.int32, torch.float64: torch.int64,
              torch.float16: torch.int16, torch.bfloat16: torch.int16}[target.dtype]
    for start in range(0, target.numel(), CHUNK):
        t = target[start : start + CHUNK]  # (c,) view into the parameter
        dc = d[start : start + CHUNK]
        moved = t + dc  # (c,)
        back = moved - dc  # exactly what undo will compute
        bad = (back.view(as_int) != t.view(as_int)).nonzero().squeeze(1)  # bitwise: -0.0 and NaN too
        if bad.numel():
            positions.append(bad + start)
            values.append(t[bad].clone())
        t.copy_(moved)
    if not positions:
        return torch.empty(0, dtype=torch.int32), target.new_empty(0)
    pos = torch.cat(positions)
    return (pos.to(torch.int32) if target.numel() < 2**31 else pos), torch.cat(values)
