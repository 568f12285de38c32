"""Typed bit policies: how many bits each quantization target gets.

Fixed policies give bits directly:

* ``uniform``: every matrix at ``bits``;
* ``rules``: ``default`` bits, overridden by the first matching rule (by structure ``group``: attention,
  mlp, expert, shared_expert; linear ``kind``: attention, gate_up, down; ``layers``; ``experts``; or a
  ``name`` regex), e.g. the paper's "attention 4 bits, experts 2 bits".

Budgeted policies give every matrix a score in [0, 1] (1 = deserves the most bits) and let the
budget solver (:mod:`expertkit.quant.budget`) choose bits from ``choices`` so that the average,
scales and zero-points counted, hits ``target_bits``; a matrix's priority is ``boost ** score`` (with
the default 16, a score of 1 is worth up to two more bits than a score of 0). Matrices outside a
policy's domain (e.g. attention under a per-expert policy) get the neutral score 0.5.

* ``block``: the structures in ``favour`` (attention, expert, shared_expert, mlp) score 1;
* ``expert_frequency``: experts by how often they are routed (rank over all layers' routing shares;
  ``favour: rare`` inverts it), from the calibration pass's router counts or, with ``tasks``, from
  :func:`expertkit.moe.routing_stats` over those tasks;
* ``linear_kind``: the ``favour``-ed feed-forward projections (``down`` or ``gate_up``) score 1;
* ``layer_position``: every matrix of the ``first`` (or ``last``) ``k`` layers scores 1;
* ``outlier``: rank of the linear-weight outlier score (:func:`~expertkit.quant.scorers.outlier_score`);
* ``block_importance``: feed-forward matrices by the rank of their block's importance
  (:class:`~expertkit.quant.scorers.BlockImportance`, measured or predicted);
* ``random``: seeded random scores, the structure-blind baseline at equal bits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, Field, field_validator

from expertkit.config import Config
from expertkit.errors import ConfigError
from expertkit.quant.grid import check_bits
from expertkit.quant.targets import FFN_GROUPS, Target


def _bits(value: int) -> int:
    try:
        return check_bits(value)
    except ConfigError as exc:  # pydantic reports ValueErrors with the field's location
        raise ValueError(str(exc).removeprefix("bits: ")) from None


Bits = Annotated[int, AfterValidator(_bits), Field(description="2..8, or 16 to keep the matrix in 16-bit")]


class UniformPolicy(Config):
    """Every matrix at the same bit width."""

    kind: Literal["uniform"] = "uniform"
    bits: Bits = 4


class Rule(Config):
    """Bits for the matrices that match every given condition."""

    group: Literal["attention", "mlp", "expert", "shared_expert"] | None = None
    kind: Literal["attention", "gate_up", "down"] | None = None
    layers: tuple[int, ...] | None = None
    experts: tuple[int, ...] | None = None
    name: str | None = Field(None, description="regex matched against the whole matrix name")
    bits: Bits

    @field_validator("name")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regex {v!r}: {exc}") from None
        return v

    def matches(self, t: Target) -> bool:
        """True when ``t`` satisfies every condition given."""
        return ((self.group is None or t.group == self.group) and (self.kind is None or t.kind == self.kind)
                and (self.layers is None or t.layer in self.layers)
                and (self.experts is None or t.expert in self.experts)
                and (self.name is None or re.fullmatch(self.name, t.name) is not None))


class RulesPolicy(Config):
    """Explicit bits by structure: the first matching rule wins, else ``default``."""

    kind: Literal["rules"] = "rules"
    default: Bits = 4
    rules: tuple[Rule, ...] = ()


class _Budgeted(Config):
    target_bits: float = Field(gt=0, description="average stored bits per weight, scales and zero-points counted")
    choices: tuple[Bits, ...] = Field((2, 3, 4), min_length=1, description="bit widths the solver may use")
    boost: float = Field(16.0, gt=1, description="priority of a score-1 matrix relative to a score-0 one")


class BlockPolicy(_Budgeted):
    """More bits for whole structures (attention, experts, shared experts, dense MLPs)."""

    kind: Literal["block"] = "block"
    favour: tuple[Literal["attention", "expert", "shared_expert", "mlp"], ...] = ("attention",)


class ExpertFrequencyPolicy(_Budgeted):
    """More bits for frequently (or rarely) routed experts."""

    kind: Literal["expert_frequency"] = "expert_frequency"
    favour: Literal["frequent", "rare"] = "frequent"
    tasks: tuple[str, ...] = Field((), description="read frequencies from routing_stats over these tasks "
                                                   "(default: the calibration pass's router counts)")
    n: int = Field(64, ge=1, description="prompts per task for routing_stats")


class LinearKindPolicy(_Budgeted):
    """More bits for one kind of feed-forward projection."""

    kind: Literal["linear_kind"] = "linear_kind"
    favour: Literal["down", "gate_up"] = "down"


class LayerPositionPolicy(_Budgeted):
    """More bits for the first (or last) ``k`` layers."""

    kind: Literal["layer_position"] = "layer_position"
    favour: Literal["first", "last"] = "first"
    k: int = Field(4, ge=1)


class OutlierPolicy(_Budgeted):
    """More bits for matrices with a high linear-weight outlier score."""

    kind: Literal["outlier"] = "outlier"


class BlockImportancePolicy(_Budgeted):
    """More bits for the feed-forward blocks that change the hidden state most."""

    kind: Literal["block_importance"] = "block_importance"
    predicted: bool = Field(True, description="predict the cosine with a ridge regressor (the paper's scorer) "
                                              "instead of using the measured mean")


class RandomPolicy(_Budgeted):
    """Seeded random priorities: the structure-blind baseline at equal bits."""

    kind: Literal["random"] = "random"
    seed: int = 0


Policy = Annotated[
    UniformPolicy | RulesPolicy | BlockPolicy | ExpertFrequencyPolicy | LinearKindPolicy | LayerPositionPolicy
    | OutlierPolicy | BlockImportancePolicy | RandomPolicy,
    Field(discriminator="kind"),
]
BUDGETED = (BlockPolicy, ExpertFrequencyPolicy, LinearKindPolicy, LayerPositionPolicy, OutlierPolicy,
            BlockImportancePolicy, RandomPolicy)


@dataclass
class PolicyContext:
    """What the data-driven policies read: routing shares per MoE layer, block importances, weights."""

    frequencies: dict[tuple[str | None, int], np.ndarray] = field(default_factory=dict)  # layer -> (E,)
    block_importance: dict[tuple[str | None, int], float] = field(default_factory=dict)
    outliers: dict[str, float] = field(default_factory=dict)  # target name -> outlier score
    info: dict[str, Any] = field(default_factory=dict)


def fixed_bits(policy: Any, targets: list[Target]) -> dict[str, int]:
    """Bits of a fixed (uniform / rules) policy."""
    if isinstance(policy, UniformPolicy):
        return {t.name: policy.bits for t in targets}
    out = {}
    for t in targets:
        rule = next((r for r in policy.rules if r.matches(t)), None)
        out[t.name] = rule.bits if rule is not None else policy.default
    return out


def scores(policy: Any, targets: list[Target], ctx: PolicyContext) -> dict[str, float]:
    """Scores in [0, 1] of a budgeted policy (0.5 outside its domain)."""
    from expertkit.quant.scorers import rank_scores

    if isinstance(policy, BlockPolicy):
        return {t.name: 1.0 if t.group in policy.favour else 0.0 for t in targets}
    if isinstance(policy, LinearKindPolicy):
        return {t.name: (1.0 if t.kind == policy.favour else 0.0) if t.group in FFN_GROUPS else 0.5 for t in targets}
    if isinstance(policy, LayerPositionPolicy):
        order = sorted({t.layer_key for t in targets}, key=lambda k: (k[0] or "", k[1]))
        chosen = set(order[: policy.k] if policy.favour == "first" else order[-policy.k:])
        return {t.name: 1.0 if t.layer_key in chosen else 0.0 for t in targets}
    if isinstance(policy, RandomPolicy):
        rng = np.random.default_rng(policy.seed)
        return {t.name: float(v) for t, v in zip(targets, rng.random(len(targets)), strict=True)}
    if isinstance(policy, OutlierPolicy):
        return rank_scores({t.name: ctx.outliers[t.name] for t in targets})
    if isinstance(policy, ExpertFrequencyPolicy):
        experts = [t for t in targets if t.expert is not None and t.layer_key in ctx.frequencies]
        if not experts:
            raise ConfigError("expert_frequency: the model has no routed experts (or no routing counts); "
                              "use a policy without per-expert scores.")
        ranked = rank_scores({t.name: float(ctx.frequencies[t.layer_key][t.expert]) for t in experts})
        if policy.favour == "rare":
            ranked = {k: 1.0 - v for k, v in ranked.items()}
        return {t.name: ranked.get(t.name, 0.5) for t in targets}
    if isinstance(policy, BlockImportancePolicy):
        ranked = rank_scores(ctx.block_importance)
        return {t.name: ranked[t.layer_key] if t.group in FFN_GROUPS and t.layer_key in ranked else 0.5
                for t in targets}
    raise ConfigError(f"policy {type(policy).__name__} has no scores.")
