"""Dense models to one sparse mixture of experts: each dense model's MLP becomes one expert.

The target is chosen by the dense models' ``model_type`` (:data:`TARGETS`); the result loads with
transformers' own class:

* dense Llama / Mistral -> ``MixtralForCausalLM``: expert ``e`` of layer ``L`` is dense model
  ``e``'s SwiGLU MLP of layer ``L`` (``gate_proj -> w1``, ``up_proj -> w3``, ``down_proj -> w2``,
  on-disk names ``model.layers.L.block_sparse_moe.experts.e.w{1,2,3}.weight``), router
  ``model.layers.L.block_sparse_moe.gate.weight``; config ``num_local_experts = E``,
  ``num_experts_per_tok = top_k``, no router jitter.
* dense Qwen2 -> ``Qwen2MoeForCausalLM``: expert ``e`` is dense model ``e``'s MLP under its own
  names (``model.layers.L.mlp.experts.e.{gate,up,down}_proj.weight``), router
  ``model.layers.L.mlp.gate.weight``; config ``num_experts = E``, ``moe_intermediate_size`` = the
  dense ``intermediate_size``, every layer sparse (``decoder_sparse_step 1``, no
  ``mlp_only_layers``) and ``norm_topk_prob: true``. Qwen2-MoE also has a *shared expert* that
  every token passes through, scaled by ``sigmoid(shared_expert_gate(x))``. The dense models
  have no such part, so it is **disabled**: ``shared_expert_intermediate_size: 0`` (zero-size
  projections whose output is exactly 0) and a zero ``shared_expert_gate``. Putting the mean MLP
  there instead would add a half-weighted extra MLP to every token (``sigmoid(0) = 0.5``) and
  break the equivalence below.

Every other tensor (embeddings, attention and its biases, norms, head) is the **mean** of the
dense models' (computed in float32, cast back), as Branch-Train-MiX and Model-GLUE's mixture do;
a tensor the dense models share exactly is copied as it is (its float mean could differ in the
last bit). Routers ``(E, hidden)`` are given per layer (see :mod:`~expertkit.merge.mixture.router_init`), zeros by default.

A dense Llama/Mistral zoo can also be asked for the Qwen2-MoE form (``target="qwen2_moe"``; its
attention then has no biases, ``qkv_bias: false``), and a ``shared`` dense model's MLP can fill
the shared expert (``shared_expert_intermediate_size`` = the dense ``intermediate_size``): every
token then gets ``sigmoid(g x) * shared(x) + sum_k w_k expert_k(x)``. With the gate ``g`` at zero
(``sigmoid = 0.5``) and the routed experts' ``down_proj`` scaled by ``expert_scale`` (0.5 by
default) the layer starts as the average of the shared MLP and the routed mixture; training the
routers and gates (``expertkit moe build``) moves it from there. This form is not equivalent to
the Mixtral one.

Both targets route with ``softmax`` over the router logits and keep the top-k, renormalised
(Mixtral always; Qwen2-MoE through ``norm_topk_prob``), so with ``top_k = 1`` each token gets
exactly one expert at weight 1: the mixture with a router that always picks expert ``k``
computes dense model ``k`` (when the non-MLP tensors are shared), and a mixture of identical
dense models computes that model whatever the router. Architectures without an MoE counterpart
here (GPT-2, T5, models with MLP biases) are refused with a :class:`ConfigError`.
Tensors are streamed one at a time (``E`` tensors in memory); the folder is written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from expertkit.errors import ConfigError, IncompatibleModelsError


@dataclass(frozen=True)
class MoeTarget:
    """How dense MLPs of one family become experts of one transformers MoE class (data, not code)."""

    model_type: str
    architecture: str
    expert: str  # output name of one expert weight: {prefix} (``model.layers.L``), {e}, {module}
    router: str  # output name of the router weight: {prefix}
    modules: dict[str, str]  # dense MLP module -> expert module
    config: dict[str, object]  # set on the dense config; "{E}", "{top_k}", "{inter}" are filled in
    drop: tuple[str, ...] = ("mlp_bias", "pretraining_tp", "architectures", "auto_map")
    zero: tuple[tuple[str, str], ...] = ()  # extra zero tensors: (name under {prefix}, shape rule)


MIXTRAL = MoeTarget(
    "mixtral", "MixtralForCausalLM", "{prefix}.block_sparse_moe.experts.{e}.{module}.weight",
    "{prefix}.block_sparse_moe.gate.weight", {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
    {"num_local_experts": "{E}", "num_experts_per_tok": "{top_k}", "router_jitter_noise": 0.0,
     "output_router_logits": False, "router_aux_loss_coef": 0.001})
QWEN2_MOE = MoeTarget(
    "qwen2_moe", "Qwen2MoeForCausalLM", "{prefix}.mlp.experts.{e}.{module}.weight", "{prefix}.mlp.gate.weight",
    {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
    {"num_experts": "{E}", "num_experts_per_tok": "{top_k}", "moe_intermediate_size": "{inter}",
     "shared_expert_intermediate_size": 0, "decoder_sparse_step": 1, "mlp_only_layers": [],
     "norm_topk_prob": True, "qkv_bias": True, "output_router_logits": False, "router_aux_loss_coef": 0.001},
    zero=(("mlp.shared_expert.gate_proj.weight", "0,H"), ("mlp.shared_expert.up_proj.weight", "0,H"),
          ("mlp.shared_expert.down_proj.weight", "H,0"), ("mlp.shared_expert_gate.weight", "1,H")))
#: dense model_type -> its MoE target.
TARGETS: dict[str, MoeTarget] = {"llama": MIXTRAL, "mistral": MIXTRAL, "qwen2": QWEN2_MOE}
#: targets by name, for asking for one explicitly
TARGET_NAMES: dict[str, MoeTarget] = {"mixtral": MIXTRAL, "qwen2_moe": QWEN2_MOE}
#: kept for callers of the Mixtral-only version
EXPERT_NAMES = MIXTRAL.modules
DENSE_TYPES = ("llama", "mistral")


def moe_target(dense: dict, name: str | None = None) -> MoeTarget:
    """The MoE target of a dense ``config.json`` (or the one ``name``d); a :class:`ConfigError` when there is none."""
    if name is not None and name not in TARGET_NAMES:
        from expertkit.errors import unknown

        raise unknown("MoE target", name, TARGET_NAMES)
    if name is not None and dense.get("model_type") not in TARGETS:
        raise ConfigError(f"an FFN-level mixture needs dense llama, mistral or qwen2 models; got model_type "
                          f"{dense.get('model_type')!r}.")
    target = TARGET_NAMES[name] if name is not None else TARGETS.get(str(dense.get("model_type")))
    if target is None:
        raise ConfigError(
            f"an FFN-level mixture needs dense models with an MoE counterpart: llama or mistral "
            f"(-> Mixtral) or qwen2 (-> Qwen2-MoE); got model_type {dense.get('model_type')!r}. "
            "Use the model-level mixture instead.")
    if dense.get("mlp_bias"):
        raise ConfigError(f"{target.architecture} experts have no MLP biases; these dense models use them. "
                          "Use the model-level mixture instead.")
    if target is MIXTRAL and dense.get("attention_bias"):
        raise ConfigError("Mixtral has no attention biases; these dense models use them. "
                          "Use the model-level mixture instead.")
    return target


def moe_config(dense: dict, num_experts: int, top_k: int, *, target_name: str | None = None,
               shared: bool = False) -> dict:
    """The MoE ``config.json`` (Mixtral or Qwen2-MoE, see :data:`TARGETS`) for ``num_experts`` experts."""
    target = moe_target(dense, target_name)
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"top_k must be between 1 and the number of experts ({num_experts}), got {top_k}.")
    fill = {"{E}": num_experts, "{top_k}": top_k, "{inter}": dense.get("intermediate_size")}
    cfg = {k: v for k, v in dense.items() if k not in target.drop}
    cfg.update({k: fill.get(v, v) if isinstance(v, str) else v for k, v in target.config.items()})
    cfg.update({"model_type": target.model_type, "architectures": [target.architecture]})
    if target is MIXTRAL:
        cfg["sliding_window"] = dense.get("sliding_window")
    else:  # Qwen2 dense models have q/k/v biases; Llama/Mistral ones do not
        cfg["qkv_bias"] = dense.get("model_type") == "qwen2" or bool(dense.get("attention_bias"))
        if shared:
            cfg["shared_expert_intermediate_size"] = dense.get("intermediate_size")
    if shared and target is not QWEN2_MOE:
        raise ConfigError("a shared expert needs the qwen2_moe target (Mixtral has no shared expert).")
    return cfg


def mixtral_config(dense: dict, num_experts: int, top_k: int) -> dict:
    """The Mixtral ``config.json`` for dense Llama/Mistral models (see :func:`moe_config`)."""
    if dense.get("model_type") not in DENSE_TYPES:
        raise ConfigError(
            f"a Mixtral mixture needs dense {' or '.join(DENSE_TYPES)} models; got model_type "
            f"{dense.get('model_type')!r} (dense_to_moe picks Qwen2-MoE for qwen2; otherwise use the "
            "model-level mixture).")
    return moe_config(dense, num_experts, top_k)


def dense_to_mixtral(
    experts: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    routers: Mapping[int, torch.Tensor] | None = None,
    top_k: int = 1,
    overwrite: bool = False,
) -> Path:
    """:func:`dense_to_moe` restricted to the Mixtral target (dense Llama/Mistral models)."""
    return dense_to_moe(experts, out_dir, routers=routers, top_k=top_k, overwrite=overwrite, mixtral_only=True)


def dense_to_moe(
    experts: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    routers: Mapping[int, torch.Tensor] | None = None,
    top_k: int = 1,
    overwrite: bool = False,
    mixtral_only: bool = False,
    target: str | None = None,
    shared: str | os.PathLike[str] | None = None,
    expert_scale: float = 0.5,
) -> Path:
    """Write the MoE mixture (Mixtral or Qwen2-MoE, by model type) of the dense folders ``experts``.

    ``routers`` maps a layer index to its ``(E, hidden)`` router weight (zeros where absent).
    ``target`` asks for ``"mixtral"`` or ``"qwen2_moe"`` explicitly; ``shared`` is a dense folder
    whose MLP becomes the shared expert (Qwen2-MoE only; routed ``down_proj`` then scaled by
    ``expert_scale``, see the module docstring).
    Raises :class:`IncompatibleModelsError` (nothing written) when the models differ in tensor
    names or shapes, and :class:`ConfigError` for architectures with no MoE counterpart.
    """
    from expertkit.fileio import install_folder
    from expertkit.weights import Checkpoint, ShardedWriter
    from expertkit.weights.arch import InferredArchitectureWarning, describe

    if len(experts) < 2:
        raise ConfigError("a mixture needs at least two dense models.")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"output folder exists: {out_dir}. Choose another path or pass overwrite=True.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    ckpts = [Checkpoint(p) for p in experts]
    shared_ckpt = Checkpoint(shared) if shared is not None else None
    try:
        cfg0 = ckpts[0].config or {}
        if mixtral_only:
            config = mixtral_config(cfg0, len(ckpts), top_k)
        else:
            config = moe_config(cfg0, len(ckpts), top_k, target_name=target, shared=shared is not None)
        target = moe_target(cfg0, target)
        shapes0 = {i.name: i.shape for i in ckpts[0].infos()}
        others = list(zip(experts[1:], ckpts[1:], strict=True))
        if shared_ckpt is not None:
            others.append((shared, shared_ckpt))
        for p, c in others:
            if {i.name: i.shape for i in c.infos()} != shapes0:
                raise IncompatibleModelsError(
                    f"{p} differs from {experts[0]} in tensor names or shapes; an FFN-level mixture needs "
                    "dense models of one architecture and size.")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InferredArchitectureWarning)
            summary = describe(list(shapes0), cfg0)
        hidden = int(cfg0["hidden_size"])
        layout, plan = [], []  # plan: (out name, kind, source name or layer)
        for name in ckpts[0].names():
            role = summary.roles[name]
            if role.group == "mlp":
                if not name.endswith(".weight") or role.module not in target.modules:
                    raise ConfigError(f"{name}: unexpected MLP tensor; {target.architecture} experts hold "
                                      "gate/up/down weights only.")
                prefix, dt = name.split(".mlp.")[0], ckpts[0].info(name).dtype
                scale = expert_scale if shared_ckpt is not None and role.module == "down_proj" else 1.0
                for e in range(len(ckpts)):
                    out = target.expert.format(prefix=prefix, e=e, module=target.modules[role.module])
                    layout.append((out, shapes0[name], ckpts[e].info(name).dtype))
                    plan.append((out, "expert", (name, e, scale)))
                if shared_ckpt is not None:
                    out = f"{prefix}.mlp.shared_expert.{role.module}.weight"
                    layout.append((out, shapes0[name], dt))
                    plan.append((out, "shared_mlp", name))
                if role.module == "down_proj":
                    gate = target.router.format(prefix=prefix)
                    layout.append((gate, (len(ckpts), hidden), dt))
                    plan.append((gate, "router", (role.layer, len(ckpts), hidden)))
                    for suffix, rule in target.zero:  # e.g. Qwen2-MoE's disabled shared expert
                        if shared_ckpt is not None and not suffix.endswith("shared_expert_gate.weight"):
                            continue  # the shared expert is the shared model's MLP; its gate starts at 0
                        shape = tuple(hidden if d == "H" else int(d) for d in rule.split(","))
                        layout.append((f"{prefix}.{suffix}", shape, dt))
                        plan.append((f"{prefix}.{suffix}", "zero", shape))
            else:
                layout.append((name, shapes0[name], ckpts[0].info(name).dtype))
                plan.append((name, "shared", name))
        dtypes = {name: dtype for name, _, dtype in layout}
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            folder = staging / "mixture"
            with ShardedWriter(folder, template=experts[0], layout=layout, max_shard_size="2GB") as writer:
                for out, kind, src in plan:
                    if kind == "shared_mlp":
                        writer.add(out, shared_ckpt.read(src))  # type: ignore[union-attr]
                    else:
                        writer.add(out, _tensor(ckpts, kind, src, routers, dtypes[out]))
            (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            install_folder(folder, out_dir)  # an old out_dir goes only now that the new one is complete
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        for c in ckpts + ([shared_ckpt] if shared_ckpt is not None else []):
            c.close()
    return out_dir


def _tensor(ckpts: list, kind: str, src: object, routers: Mapping[int, torch.Tensor] | None,
            dtype: torch.dtype) -> torch.Tensor:
    """One output tensor: an expert's MLP weight, a router, or the mean of a shared tensor."""
    if kind == "expert":
        name, e, scale = src  # type: ignore[misc]
        t = ckpts[e].read(name)
        return t if scale == 1.0 else (t.to(torch.float32) * scale).to(t.dtype)
    if kind == "zero":
        return torch.zeros(src, dtype=dtype)  # type: ignore[arg-type]
    if kind == "router":
        layer, n, hidden = src  # type: ignore[misc]
        r = (routers or {}).get(layer)
        if r is None:
            return torch.zeros(n, hidden, dtype=dtype)
        if tuple(r.shape) != (n, hidden):
            raise ConfigError(f"router of layer {layer} has shape {list(r.shape)}; expected {[n, hidden]}.")
        return r.detach().to(dtype).contiguous()
    ts = [c.read(src) for c in ckpts]
    if not ts[0].dtype.is_floating_point or all(torch.equal(ts[0], t) for t in ts[1:]):
        return ts[0]  # shared exactly: (x + x + x) / 3 need not round back to x in floating point
    mean = torch.stack([t.to(torch.float32) for t in ts]).mean(0)  # (E, *shape) -> (*shape)
    return mean.to(ts[0].dtype)
