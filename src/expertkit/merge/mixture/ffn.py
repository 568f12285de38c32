"""Dense models to one Mixtral-style mixture: each dense model's MLP becomes one expert.

For dense Llama/Mistral models of one shape (the bundled SmolLM2 is Llama), the mixture is a
``MixtralForCausalLM`` folder:

* expert ``e`` of layer ``L`` is dense model ``e``'s SwiGLU MLP of layer ``L``
  (``gate_proj -> w1``, ``up_proj -> w3``, ``down_proj -> w2``, on-disk Mixtral names
  ``model.layers.L.block_sparse_moe.experts.e.w{1,2,3}.weight``);
* every other tensor (embeddings, attention, norms, head) is the **mean** of the dense models'
  (computed in float32, cast back), as Branch-Train-MiX and Model-GLUE's mixture do; when the
  dense models share those tensors the mean is exact;
* router ``model.layers.L.block_sparse_moe.gate.weight`` of shape ``(E, hidden)`` is given per
  layer (see :mod:`~expertkit.merge.mixture.router_init`), zeros by default;
* config: the first model's, with ``model_type: mixtral``, ``num_local_experts = E``,
  ``num_experts_per_tok = top_k``, no router jitter.

Mixtral routes with ``softmax`` over the router logits, keeps the top-k and renormalises them, so
with ``top_k = 1`` each token gets exactly one expert at weight 1: the mixture with a router that
always picks expert ``k`` computes dense model ``k`` (when the non-MLP tensors are shared).
Tensors are streamed one at a time (``E`` tensors in memory); the folder is written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from expertkit.errors import ConfigError, IncompatibleModelsError

#: Llama-family MLP module -> Mixtral expert module.
EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
DENSE_TYPES = ("llama", "mistral")
_DROP_KEYS = ("mlp_bias", "pretraining_tp", "architectures", "auto_map")


def mixtral_config(dense: dict, num_experts: int, top_k: int) -> dict:
    """The Mixtral ``config.json`` for ``num_experts`` experts of the dense ``config.json``."""
    if dense.get("model_type") not in DENSE_TYPES:
        raise ConfigError(
            f"an FFN-level (Mixtral) mixture needs dense {' or '.join(DENSE_TYPES)} models; got "
            f"model_type {dense.get('model_type')!r}. Use the model-level mixture instead."
        )
    if dense.get("mlp_bias") or dense.get("attention_bias"):
        raise ConfigError("Mixtral has no MLP or attention biases; these dense models use them. "
                          "Use the model-level mixture instead.")
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"top_k must be between 1 and the number of experts ({num_experts}), got {top_k}.")
    cfg = {k: v for k, v in dense.items() if k not in _DROP_KEYS}
    cfg.update({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": num_experts,
                "num_experts_per_tok": top_k, "router_jitter_noise": 0.0, "output_router_logits": False,
                "router_aux_loss_coef": 0.001, "sliding_window": dense.get("sliding_window")})
    return cfg


def dense_to_mixtral(
    experts: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    routers: Mapping[int, torch.Tensor] | None = None,
    top_k: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write the Mixtral mixture of the dense model folders ``experts`` to ``out_dir``.

    ``routers`` maps a layer index to its ``(E, hidden)`` router weight (zeros where absent).
    Raises :class:`IncompatibleModelsError` (nothing written) when the models differ in tensor
    names or shapes, and :class:`ConfigError` for architectures Mixtral cannot hold.
    """
    from expertkit.weights import Checkpoint, ShardedWriter
    from expertkit.weights.arch import InferredArchitectureWarning, describe

    if len(experts) < 2:
        raise ConfigError("a mixture needs at least two dense models.")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"output folder exists: {out_dir}. Choose another path or pass overwrite=True.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    ckpts = [Checkpoint(p) for p in experts]
    try:
        cfg0 = ckpts[0].config or {}
        config = mixtral_config(cfg0, len(ckpts), top_k)
        shapes0 = {i.name: i.shape for i in ckpts[0].infos()}
        for p, c in zip(experts[1:], ckpts[1:], strict=True):
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
                if not name.endswith(".weight") or role.module not in EXPERT_NAMES:
                    raise ConfigError(f"{name}: unexpected MLP tensor; Mixtral experts hold gate/up/down weights only.")
                for e in range(len(ckpts)):
                    out = name.replace(f".mlp.{role.module}.", f".block_sparse_moe.experts.{e}.{EXPERT_NAMES[role.module]}.")
                    layout.append((out, shapes0[name], ckpts[e].info(name).dtype))
                    plan.append((out, "expert", (name, e)))
                if role.module == "down_proj":
                    gate = name.split(".mlp.")[0] + ".block_sparse_moe.gate.weight"
                    layout.append((gate, (len(ckpts), hidden), ckpts[0].info(name).dtype))
                    plan.append((gate, "router", (role.layer, len(ckpts), hidden)))
            else:
                layout.append((name, shapes0[name], ckpts[0].info(name).dtype))
                plan.append((name, "shared", name))
        dtypes = {name: dtype for name, _, dtype in layout}
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        try:
            folder = staging / "mixture"
            with ShardedWriter(folder, template=experts[0], layout=layout, max_shard_size="2GB") as writer:
                for out, kind, src in plan:
                    writer.add(out, _tensor(ckpts, kind, src, routers, dtypes[out]))
            (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(folder, out_dir)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        for c in ckpts:
            c.close()
    return out_dir


def _tensor(ckpts: list, kind: str, src: object, routers: Mapping[int, torch.Tensor] | None,
            dtype: torch.dtype) -> torch.Tensor:
    """One output tensor: an expert's MLP weight, a router, or the mean of a shared tensor."""
    if kind == "expert":
        name, e = src  # type: ignore[misc]
        return ckpts[e].read(name)
    if kind == "router":
        layer, n, hidden = src  # type: ignore[misc]
        r = (routers or {}).get(layer)
        if r is None:
            return torch.zeros(n, hidden, dtype=dtype)
        if tuple(r.shape) != (n, hidden):
            raise ConfigError(f"router of layer {layer} has shape {list(r.shape)}; expected {[n, hidden]}.")
        return r.detach().to(dtype).contiguous()
    ts = [c.read(src) for c in ckpts]
    if not ts[0].dtype.is_floating_point:
        return ts[0]
    mean = torch.stack([t.to(torch.float32) for t in ts]).mean(0)  # (E, *shape) -> (*shape)
    return mean.to(ts[0].dtype)
