"""The quantizable weight matrices of a loaded model, found from its architecture descriptor.

A :class:`Target` is one 2-D weight matrix: a whole linear weight (attention, dense MLP, shared
expert, or one expert of an unfused MoE), or one expert's part of a fused 3-D expert tensor
(transformers 5 keeps e.g. Mixtral's experts as ``gate_up_proj (E, 2I, H)`` and ``down_proj (E, H, I)``;
the descriptor's ``parts`` say that rows ``[0, I)`` of expert ``e`` are its ``w1`` and ``[I, 2I)``
its ``w3``). Embeddings, the LM head, norms, routers and single-row gating vectors (Qwen2-MoE's
``shared_expert_gate``) are not targets: they stay in full precision.

Each target knows where its calibration inputs come from (:attr:`Target.hessian`): the module's own
input for plain linears; for experts, the expert's input (``...experts[e].in``) or its intermediate
activation (``...experts[e].mid``), collected from the routed tokens (see
:mod:`expertkit.quant.calibrate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from expertkit.errors import ConfigError

QUANT_GROUPS = ("attention", "mlp", "expert", "shared_expert")
FFN_GROUPS = ("mlp", "expert", "shared_expert")
#: feed-forward output projections (their input is the FFN's intermediate activation) and input
#: projections (their input is the hidden state), by the module names the descriptors give. The
#: name decides; the shape only for a name in neither set, because a shape cannot tell them apart
#: when the intermediate size equals the hidden size (e.g. DeepSeek-style fine-grained experts).
DOWN_MODULES = frozenset({"down_proj", "w2", "wo", "fc2", "c_proj", "dense_4h_to_h"})
UP_MODULES = frozenset({"gate_proj", "up_proj", "gate_up_proj", "w1", "w3", "wi", "wi_0", "wi_1", "fc1", "c_fc",
                        "dense_h_to_4h"})


def takes_hidden(module: str, cols: int, hidden: int) -> bool:
    """True when a feed-forward linear named ``module`` reads the hidden state (gate/up), False when it reads
    the intermediate activation (down)."""
    if module in DOWN_MODULES:
        return False
    if module in UP_MODULES:
        return True
    return cols == hidden


@dataclass(frozen=True)
class Target:
    """One quantizable weight matrix of a loaded model."""

    name: str  # unique: the parameter name, or "<param>[<expert>].<part>" for a part of a fused tensor
    param: str  # the parameter's name in model.named_parameters()
    group: str  # attention | mlp | expert | shared_expert
    stack: str | None
    layer: int
    expert: int | None
    module: str  # q_proj, w1, down_proj, ...: the per-expert (on-disk) module name for fused parts
    kind: str  # attention | gate_up | down: the linear's role (down = input is the FFN's intermediate)
    rows: int
    cols: int
    hessian: str  # key of the calibration Hessian this matrix's inputs accumulate into
    fused_index: tuple[int, int, int] | None = None  # (expert, first row, end row) inside the fused tensor
    transposed: bool = False  # stored (in, out), as GPT-2's Conv1D

    @property
    def numel(self) -> int:
        """Weights in the matrix."""
        return self.rows * self.cols

    @property
    def layer_key(self) -> tuple[str | None, int]:
        """``(stack, layer)``."""
        return self.stack, self.layer

    def read(self, model: Any) -> torch.Tensor:
        """The matrix ``(rows, cols)`` (a copy, fp32)."""
        p = _param(model, self.param)
        if self.fused_index is not None:
            e, a, b = self.fused_index
            return p.data[e, a:b].detach().float().clone()
        w = p.data.detach().float()
        return (w.T if self.transposed else w).clone()

    def write(self, model: Any, value: torch.Tensor) -> None:
        """Put ``value`` ``(rows, cols)`` back into the model, in the parameter's dtype and layout."""
        p = _param(model, self.param)
        with torch.no_grad():
            if self.fused_index is not None:
                e, a, b = self.fused_index
                p.data[e, a:b] = value.to(p.dtype)
            else:
                p.data.copy_((value.T if self.transposed else value).to(p.dtype))


def _param(model: Any, name: str) -> torch.nn.Parameter:
    return model.get_parameter(name)


def _hidden_size(config: Any) -> int:
    for key in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ConfigError(f"{type(config).__name__} gives no hidden size (hidden_size / d_model / n_embd).")


def find_targets(model: Any) -> list[Target]:
    """Every quantizable matrix of ``model``, in parameter order; a model without any is an error."""
    from expertkit.weights.arch import describe

    config = model.config
    hidden = _hidden_size(config)
    params = dict(model.named_parameters())
    summary = describe(params.keys(), config)
    out: list[Target] = []
    for name, role in summary.roles.items():
        if role.group not in QUANT_GROUPS or role.layer is None or not name.endswith(("weight", "_proj")):
            continue
        p = params[name]
        if role.fused:
            out += _fused_targets(name, p, role, hidden)
            continue
        if p.ndim != 2:
            continue
        rows, cols = (p.shape[1], p.shape[0]) if role.fan_in_fan_out else tuple(p.shape)
        if rows < 2:  # a gating vector (e.g. shared_expert_gate), not a projection
            continue
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        reads_hidden = takes_hidden(role.module, cols, hidden)
        kind = "attention" if role.group == "attention" else ("gate_up" if reads_hidden else "down")
        hessian = _expert_key(module, role.expert, reads_hidden) if role.expert is not None else module
        out.append(Target(name, name, role.group, role.stack, role.layer, role.expert, role.module, kind, rows, cols,
                          hessian, transposed=role.fan_in_fan_out))
    if not out:
        raise ConfigError(f"{summary.architecture}: no quantizable linear weights found (attention, MLP or experts); "
                          "is this a transformer the architecture descriptors know?")
    return out


def _expert_key(module: str, expert: int, takes_hidden: bool) -> str:
    """Hessian key of an unfused expert's linear: ``<experts module>[<e>].in|mid``."""
    experts_module = module.rsplit(".", 2)[0]  # ...experts.expert_3.wi -> ...experts
    return f"{experts_module}[{expert}].{'in' if takes_hidden else 'mid'}"


def _fused_targets(name: str, p: torch.Tensor, role: Any, hidden: int) -> list[Target]:
    if p.ndim != 3 or role.expert_dim != 0:
        raise ConfigError(f"{name}: fused experts are expected as (experts, out, in), found shape {tuple(p.shape)} "
                          f"with experts along dim {role.expert_dim}.")
    n_exp, out_dim, cols = p.shape
    parts = role.parts or (role.module,)
    if role.part_dim not in (None, 1) or out_dim % len(parts):
        raise ConfigError(f"{name}: cannot split {out_dim} output rows into the parts {list(parts)}.")
    step = out_dim // len(parts)
    experts_module = name.rsplit(".", 1)[0]
    reads_hidden = takes_hidden(role.module, cols, hidden)
    out = []
    for e in range(n_exp):
        for j, part in enumerate(parts):
            out.append(Target(f"{name}[{e}].{part}", name, role.group, role.stack, role.layer, e, part,
                              "gate_up" if reads_hidden else "down", step, cols,
                              f"{experts_module}[{e}].{'in' if reads_hidden else 'mid'}", (e, j * step, (j + 1) * step)))
    return out


def total_weights(targets: list[Target]) -> int:
    """Weights in all ``targets``."""
    return sum(t.numel for t in targets)
