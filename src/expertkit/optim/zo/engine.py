"""The seeded-perturbation engine behind every zeroth-order method.

A random direction ``z`` is never stored: it is regenerated from a seed whenever it is
needed, with private :class:`torch.Generator` objects (the global RNG is never touched).
The direction of tensor ``i`` is cut into chunks of :data:`CHUNK` coordinates; chunk ``c``
is drawn by a generator seeded with ``derive_seed(s, i, c)`` straight into a reused buffer
(``torch.randn(..., out=buf, generator=g)``). Any chunk can therefore be regenerated alone,
in any order and on any thread: the chunks of a pass are spread over a small thread pool,
which matters because drawing normal numbers is the dominant cost of a full-model step.

Parameters are changed **in place**, chunk by chunk: the memory beyond inference is one
chunk buffer per thread plus, with ``exact=True``, the few coordinates that in-place float
arithmetic cannot give back. ``θ + δ - δ`` is not always ``θ`` in floating point (for
small ``|θ|`` the addition loses low bits); the first pass of a perturbation computes what
the later passes will compute and keeps, for the coordinates where they would not restore
the bits, the original values (about 7% of the coordinates at ``eps=1e-3`` on weights of
size ~0.02; 8 bytes each). The restoring pass puts those back.

The fast path of a two-sided step is MeZO's three passes over the weights:
:meth:`ZOEngine.perturb` (``θ += d``, ``d = fl(ε z)``, recording), forward,
:meth:`ZOEngine.mirror` (``θ - d``: undo exactly, then ``-d``, in one pass), forward, then
one :meth:`ZOEngine.restore` that adds ``d`` back, applies the patches and, fused into the
same pass, the update ``Σ_j k_j z_j`` (the restoring direction is reused, not drawn again). :meth:`add`/:meth:`undo` are the
general in-place changes (any transform) that the other methods use.

Coordinates: each tensor may be restricted to a set of flat indices (gradient sparsity);
its direction then has one entry per selected coordinate and the rest is never touched.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from expertkit.errors import ConfigError

_MASK64 = (1 << 64) - 1
CHUNK = 1 << 18  # coordinates per generator and per unit of work (1 MiB in float32)
PARALLEL_MIN = 4 * CHUNK  # passes over fewer coordinates run on the calling thread
GROUP = 8  # chunks per task handed to the thread pool


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
# (tensor id, chunk) -> (positions in the chunk, their original values): the fast path's record
ChunkPatches = dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]
Transform = Callable[[int, torch.Tensor], torch.Tensor | None]
_INT = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}


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
        threads: worker threads for large passes (default: torch's intra-op thread count, at most 8).
    """

    def __init__(self, params: Sequence[torch.Tensor], *, exact: bool = True, threads: int | None = None) -> None:
        for p in params:
            if not p.is_contiguous():
                raise ConfigError("zeroth-order training needs contiguous parameters; call .contiguous() first.")
            if not p.is_floating_point():
                raise ConfigError(f"zeroth-order training needs floating-point parameters, got {p.dtype}.")
        self.slots = [Slot(p) for p in params]
        self.exact = exact
        on_cpu = all(p.device.type == "cpu" for p in params)
        self.threads = max(1, min(8, torch.get_num_threads())) if threads is None else max(1, threads)
        if not on_cpu:
            self.threads = 1  # kernels are asynchronous there; one host thread feeds them
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()

    # ---------------------------------------------------------------- directions
    def set_index(self, i: int, index: torch.Tensor | None) -> None:
        """Perturb only the flat coordinates ``index`` of tensor ``i`` (None: all of them)."""
        self.slots[i].index = None if index is None else index.to(torch.long)

    def _buffer(self, name: str, n: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """This thread's reusable buffer ``name`` of ``n`` elements of ``like``'s dtype (or ``dtype``) and device."""
        key = (name, dtype or like.dtype, like.device)
        buf = self._local.__dict__.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, CHUNK), dtype=key[1], device=like.device)
            self._local.__dict__[key] = buf
        return buf[:n]

    def _draw(self, i: int, seed: int, c: int, out: torch.Tensor) -> torch.Tensor:
        """Chunk ``c`` of tensor ``i``'s direction with ``seed``, written into ``out``."""
        gen = torch.Generator(device=out.device)
        gen.manual_seed(derive_seed(seed, i, c))
        return torch.randn(out.shape, generator=gen, out=out)

    def _run(self, ids: Sequence[int], work: Callable[[int, int, int], object]) -> list[object]:
        """``work(i, c, start)`` for every chunk of the tensors ``ids``; results in chunk order."""
        jobs = [(i, c, start) for i in ids for c, start in enumerate(range(0, self.slots[i].size, CHUNK))]
        total = sum(self.slots[i].size for i in ids)
        if self.threads == 1 or total < PARALLEL_MIN or len(jobs) < 2:
            with torch.no_grad():
                return [work(*j) for j in jobs]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="zo-engine")
        groups = [jobs[k : k + GROUP] for k in range(0, len(jobs), GROUP)]  # few tasks, still load-balanced
        return [r for rs in self._pool.map(lambda g: _no_grad(work, g), groups) for r in rs]

    def direction(self, i: int, seed: int) -> torch.Tensor:
        """Tensor ``i`` of the standard normal direction with ``seed`` (regenerated, not stored)."""
        slot = self.slots[i]
        out = torch.empty(slot.size, dtype=slot.param.dtype, device=slot.param.device)
        self._run([i], lambda i, c, s: self._draw(i, seed, c, out[s : s + CHUNK]))
        return out.view(slot.shape())

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

    # ---------------------------------------------------------------- fast path (chunked, fused)
    def _target(self, i: int, start: int) -> tuple[torch.Tensor, Callable[[], None]]:
        """Chunk of tensor ``i``'s perturbed coordinates from ``start`` and a function that writes it back."""
        slot = self.slots[i]
        flat = slot.param.view(-1)
        if slot.index is None:
            return flat[start : start + CHUNK], lambda: None  # a view: changed in place
        idx = slot.index[start : start + CHUNK]
        t = flat[idx]  # (c,) gathered copy

        def put() -> None:
            flat[idx] = t

        return t, put

    def _scaled(self, i: int, seed: int, c: int, n: int, scale: float, like: torch.Tensor) -> torch.Tensor:
        """``d = fl(scale * z)`` for chunk ``c`` in this thread's buffer (the arithmetic every pass repeats)."""
        return self._draw(i, seed, c, self._buffer("z", n, like)).mul_(scale)

    def _step(self, t: torch.Tensor, d: torch.Tensor, sign: int, record: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``t += sign * d`` in place; with ``record``, the positions (and old values) where ``-sign * d`` fails."""
        if not (record and self.exact):
            if sign == 1:
                t.add_(d)
            else:
                t.sub_(d)
            return None
        n, as_int = t.numel(), _INT[t.dtype]
        back = self._buffer("b", n, t)  # (c,) reused: no allocation per chunk
        if sign == 1:
            torch.sub(torch.add(t, d, out=back), d, out=back)  # exactly what the undoing pass computes
        else:
            torch.add(torch.sub(t, d, out=back), d, out=back)
        differs = torch.ne(back.view(as_int), t.view(as_int), out=self._buffer("m", n, t, torch.bool))  # bitwise
        bad = differs.nonzero().squeeze(1)
        found = (bad.to(torch.int32), t[bad]) if bad.numel() else None  # positions < CHUNK
        if sign == 1:
            t.add_(d)  # the same rounding as above
        else:
            t.sub_(d)
        return found

    def perturb(self, ids: Sequence[int], seed: int, scale: float, *, record: bool = True) -> ChunkPatches:
        """``θ += d`` with ``d = fl(scale z)``: the first pass of an estimate.

        With ``record`` (and ``exact``) the coordinates are noted where ``(θ + d) - d`` would not
        give back θ's bits; :meth:`mirror` or :meth:`restore` put their original values back.
        """

        def work(i: int, c: int, start: int) -> object:
            t, put = self._target(i, start)
            found = self._step(t, self._scaled(i, seed, c, t.numel(), scale, t), 1, record)
            put()
            return None if found is None else ((i, c), found)

        return dict(f for f in self._run(ids, work) if f is not None)  # type: ignore[misc]

    def mirror(self, ids: Sequence[int], seed: int, scale: float, patches: ChunkPatches) -> ChunkPatches:
        """From ``θ + d`` to ``θ - d`` in one pass: undo exactly (``patches``), then ``-d`` (recorded).

        Subtracting ``2d`` directly would need patches for about half of the coordinates (three
        roundings); restoring first keeps the record as small as a single perturbation's.
        """

        def work(i: int, c: int, start: int) -> object:
            t, put = self._target(i, start)
            d = self._scaled(i, seed, c, t.numel(), scale, t)
            t.sub_(d)
            if (i, c) in patches:
                pos, vals = patches.pop((i, c))  # freed as it is used
                t[pos] = vals
            found = self._step(t, d, -1, True)
            put()
            return None if found is None else ((i, c), found)

        return dict(f for f in self._run(ids, work) if f is not None)  # type: ignore[misc]

    def restore(
        self, ids: Sequence[int], seed: int, scale: float, patches: ChunkPatches, *, mirrored: bool,
        then: tuple[Sequence[int], Sequence[float]] | None = None,
    ) -> None:
        """Undo :meth:`perturb` (``θ + d``) or :meth:`mirror` (``θ - d``) bit-exactly, then optionally update.

        ``then = (seeds, coeffs)`` adds ``Σ_j coeffs[j] z_j`` in the same pass (the update); a seed
        equal to ``seed`` reuses the direction already drawn for the restore.
        """

        def work(i: int, c: int, start: int) -> None:
            t, put = self._target(i, start)
            n = t.numel()
            z = self._draw(i, seed, c, self._buffer("z", n, t))
            d = torch.mul(z, scale, out=self._buffer("d", n, t))
            if mirrored:
                t.add_(d)
            else:
                t.sub_(d)
            if (i, c) in patches:
                pos, vals = patches[(i, c)]
                t[pos] = vals
            if then is not None:
                for s, k in zip(*then, strict=True):
                    if k == 0:
                        continue
                    if s == seed:
                        t.add_(torch.mul(z, k, out=d))  # the restoring direction, not drawn again
                    else:
                        t.add_(self._draw(i, s, c, d).mul_(k))
            put()

        self._run(ids, work)

    # ---------------------------------------------------------------- general in-place changes
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


def _no_grad(work: Callable[[int, int, int], object], jobs: list[tuple[int, int, int]]) -> list[object]:
    with torch.no_grad():  # grad mode is per thread
        return [work(*job) for job in jobs]


def _add_recording(target: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``target += d`` chunk by chunk; return the positions (and old values) where ``-= d`` fails."""
    positions, values = [], []
    as_int = _INT[target.dtype]
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
