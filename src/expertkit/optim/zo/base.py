"""The zeroth-order training step shared by every method (a :class:`TrainOptimizer`).

One step, at learning rate ``lr``:

1. every ``mask_every`` steps, resample the sparsity mask (when ``sparsity > 0``);
2. for each block (one block unless ``block`` is set): draw ``q`` seeds from
   ``(run seed, step, block, query)``, estimate the projected gradient ``g_j`` of each
   direction ``z_j`` (:meth:`ZOMethod.estimate`: two forwards per query, parameters
   perturbed in place and restored), then update the block (:meth:`ZOMethod.update`)
   by regenerating the directions from their seeds;
3. hybrid ZO/FO: the parameters named by ``fo_modules`` take one back-propagated step.

Every forward of a step sees the same dropout (the global RNG is rewound before each).
A method changes the rule by overriding :meth:`coefficients` (scalar weights of the
directions, default ``g_j / q``) and :meth:`transform` (per-tensor rule, default
``-lr * ĝ``), or :meth:`estimate` / :meth:`update` as a whole.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from expertkit.errors import ConfigError
from expertkit.optim.zo.blocks import group_blocks
from expertkit.optim.zo.engine import ZOEngine, derive_seed
from expertkit.optim.zo.params import ZOParams
from expertkit.optim.zo.sparsity import select_coordinates

Loss = Callable[[], float]


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision losses are averaged in float32 (float64 stays float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def split_hybrid(names: Sequence[str] | None, n: int, fo_modules: Sequence[str]) -> tuple[list[int], list[int]]:
    """Tensor ids trained zeroth-order and first-order; ``fo_modules`` are name substrings."""
    if not fo_modules:
        return list(range(n)), []
    if names is None:
        raise ConfigError("fo_modules (hybrid ZO/FO) needs parameter names; build the optimizer with names=...")
    fo = [i for i, nm in enumerate(names) if any(m in nm for m in fo_modules)]
    if not fo:
        raise ConfigError(f"fo_modules {list(fo_modules)} match no trainable parameter; names look like {names[0]!r}.")
    if len(fo) == n:
        raise ConfigError(f"fo_modules {list(fo_modules)} match every trainable parameter; nothing is left for ZO.")
    return [i for i in range(n) if i not in set(fo)], fo


class ZOMethod:
    """Base of the zeroth-order methods (ZO-SGD's rule unless overridden)."""

    params_model: type[ZOParams] = ZOParams

    def __init__(
        self, params: Sequence[torch.nn.Parameter], hp: ZOParams, *, seed: int = 0,
        names: Sequence[str] | None = None, model: Any = None,
    ) -> None:
        self.params = list(params)
        if not self.params:
            raise ConfigError("a zeroth-order optimizer got no trainable parameters.")
        if names is not None and len(names) != len(self.params):
            raise ConfigError(f"got {len(names)} names for {len(self.params)} parameters.")
        self.hp, self.seed, self.names, self.model = hp, seed, list(names) if names else None, model
        zo_ids, self.fo_ids = split_hybrid(self.names, len(self.params), hp.fo_modules)
        self.engine = ZOEngine(self.params, exact=hp.exact_restore)
        zo_names = [self.names[i] for i in zo_ids] if self.names else None
        self.blocks = [(k, [zo_ids[j] for j in ids]) for k, ids in group_blocks(zo_names, len(zo_ids), hp.block)]
        self.zo_ids = zo_ids
        self.t = 0
        self.state: dict[str, dict[int, torch.Tensor]] = {}
        self.fo_opt = self._fo_optimizer() if self.fo_ids else None
        self.forwards = 0  # forward passes run so far (a jvp counts as one)
        self._pending: tuple[int, dict, bool] | None = None  # last query awaiting its fused restore

    # ---------------------------------------------------------------- step
    def step(self, loss_fn: Callable[[], torch.Tensor], lr: float) -> float:
        """One zeroth-order step at ``lr``; returns the loss at the unperturbed parameters (estimate)."""
        hp = self.hp
        if hp.sparsity > 0 and (self.t % hp.mask_every == 0 or self.engine.slots[self.zo_ids[0]].index is None):
            self.resample_mask()
        rng = torch.get_rng_state()

        def loss() -> float:
            torch.set_rng_state(rng)
            self.forwards += 1
            with torch.no_grad():
                return float(_upcast(loss_fn()).mean())

        loss.rng = rng  # type: ignore[attr-defined]  # forward-grad rewinds its jvp forward too
        step_seed = derive_seed(self.seed, self.t)
        reported = None
        for b, (_, ids) in enumerate(self.blocks):
            seeds = [derive_seed(step_seed, b, j) for j in range(hp.q)]
            if self.fused:
                grads, value = self.estimate(ids, seeds, loss, loss_fn, defer=True)
                self._restore_and_update(ids, seeds, grads, lr)
            else:
                grads, value = self.estimate(ids, seeds, loss, loss_fn)
                self.update(ids, seeds, grads, lr, loss)
            reported = value if reported is None else reported
        if self.fo_opt is not None:
            torch.set_rng_state(rng)
            self._fo_step(loss_fn, lr)
        self.t += 1
        return float(reported)

    @property
    def fused(self) -> bool:
        """Whether the step uses the fused path (the base estimate, update and linear rule)."""
        cls = type(self)
        return cls.estimate is ZOMethod.estimate and cls.update is ZOMethod.update and cls.transform is ZOMethod.transform

    def estimate(
        self, ids: list[int], seeds: list[int], loss: Loss, loss_fn: Callable[[], torch.Tensor], *,
        defer: bool = False,
    ) -> tuple[list[float], float]:
        """Projected gradients ``g_j`` along the directions of ``seeds``, and the loss estimate at θ.

        Two-sided, per query: ``θ + εz`` (recording what the restore needs), forward, ``θ - εz``
        (one pass: exact undo, then ``-εz``), forward, restore. With ``defer`` the last restore is left to
        :meth:`_restore_and_update`, which fuses it with the update (MeZO's three passes).
        """
        eps, engine = self.hp.eps, self.engine
        two = self.hp.estimator == "two-sided"
        base = None if two else loss()
        grads, seen = [], []
        for k, s in enumerate(seeds):
            patches = engine.perturb(ids, s, eps)
            plus = loss()
            if two:
                patches = engine.mirror(ids, s, eps, patches)
                minus = loss()
                grads.append((plus - minus) / (2 * eps))
                seen.append((plus + minus) / 2)
            else:
                grads.append((plus - base) / eps)
            if defer and k == len(seeds) - 1:
                self._pending = (s, patches, two)
            else:
                engine.restore(ids, s, eps, patches, mirrored=two)
        return grads, base if base is not None else sum(seen) / len(seen)

    def _restore_and_update(self, ids: list[int], seeds: list[int], grads: list[float], lr: float) -> None:
        """One pass: undo the last query's perturbation (bit-exact) and add ``-lr * ĝ``."""
        s, patches, two = self._pending
        self._pending = None
        then = None if lr == 0 else (seeds, [-lr * c for c in self.coefficients(grads)])  # lr = 0: θ bit-identical
        self.engine.restore(ids, s, self.hp.eps, patches, mirrored=two, then=then)

    def coefficients(self, grads: list[float]) -> list[float]:
        """Weights of the directions in the combined estimate ``ĝ = sum_j c_j z_j``."""
        return [g / len(grads) for g in grads]

    def transform(self, i: int, ghat: torch.Tensor, lr: float) -> torch.Tensor:
        """The change of tensor ``i`` given its estimate ``ĝ`` (ZO-SGD: ``-lr * ĝ``)."""
        return ghat.mul_(-lr)

    def update(self, ids: list[int], seeds: list[int], grads: list[float], lr: float, loss: Loss) -> None:
        """Apply the rule to the block ``ids`` (directions replayed from ``seeds``)."""

        def rule(i: int, ghat: torch.Tensor) -> torch.Tensor | None:
            change = self.transform(i, ghat, lr)
            return None if lr == 0 else change  # lr = 0 leaves θ bit-identical (even -0.0)

        self.engine.add(ids, seeds, self.coefficients(grads), transform=rule)

    # ---------------------------------------------------------------- sparsity, hybrid
    def resample_mask(self) -> None:
        """Choose the perturbed coordinates of the ZO tensors anew (seeded by run seed and step)."""
        params = [self.params[i] for i in self.zo_ids]
        hp = self.hp
        index = select_coordinates(params, hp.sparsity, scope=hp.sparsity_scope, by=hp.sparsity_by,
                                   seed=derive_seed(self.seed, self.t, 0x5A))
        for i, idx in zip(self.zo_ids, index, strict=True):
            self.engine.set_index(i, idx)
        self.state = {}  # per-coordinate state (momentum, moments) no longer lines up

    def _fo_optimizer(self) -> torch.optim.Optimizer:
        fo = [self.params[i] for i in self.fo_ids]
        if self.hp.fo_optimizer == "adam":
            return torch.optim.Adam(fo, lr=self.hp.fo_lr)
        return torch.optim.SGD(fo, lr=self.hp.fo_lr)

    def _fo_step(self, loss_fn: Callable[[], torch.Tensor], lr: float) -> None:
        """Back-propagate into the FO tensors only (ZO tensors are frozen during the backward)."""
        flags = [p.requires_grad for p in self.params]
        try:
            for i in self.zo_ids:
                self.params[i].requires_grad_(False)
            for i in self.fo_ids:
                self.params[i].requires_grad_(True)
            self.fo_opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                self.forwards += 1
                _upcast(loss_fn()).mean().backward()
            self.fo_opt.step()
            self.fo_opt.zero_grad(set_to_none=True)
        finally:
            for p, f in zip(self.params, flags, strict=True):
                p.requires_grad_(f)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Step counter, masks, method state and the FO optimizer's state."""
        return {
            "t": self.t, "forwards": self.forwards,
            "index": {i: s.index for i, s in enumerate(self.engine.slots) if s.index is not None},
            "state": self.state, "fo": self.fo_opt.state_dict() if self.fo_opt is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s result."""
        self.t, self.forwards = int(state["t"]), int(state.get("forwards", 0))
        for i, slot in enumerate(self.engine.slots):
            slot.index = state["index"].get(i)
        self.state = {k: dict(v) for k, v in state["state"].items()}
        if self.fo_opt is not None and state.get("fo") is not None:
            self.fo_opt.load_state_dict(state["fo"])


def register(name: str, *, summary: str, paper: str) -> Callable[[type[ZOMethod]], type[ZOMethod]]:
    """Register a :class:`ZOMethod` subclass in ``expertkit.train.OPTIMIZERS`` as ``name``."""
    from expertkit.train.optimizers import OPTIMIZERS, OptimizerSetup

    def deco(cls: type[ZOMethod]) -> type[ZOMethod]:
        def factory(params: list[torch.nn.Parameter], setup: OptimizerSetup) -> ZOMethod:
            return cls(params, setup.hparams, seed=setup.seed, names=getattr(setup, "names", None),
                       model=getattr(setup, "model", None))

        factory.__doc__ = cls.__doc__
        OPTIMIZERS.add(name, factory, summary=summary, paper=paper, params=cls.params_model, zo=True, cls=cls)
        return cls

    return deco
