"""Mixtures of cluster representatives (Model-GLUE's last step).

* FFN level: :func:`dense_to_moe` turns dense Llama/Mistral models into one Mixtral model and
  dense Qwen2 models into one Qwen2-MoE model (each dense MLP an expert, other tensors
  averaged); :func:`build_ffn_mixture` adds routers initialised from hidden states of per-task
  prompts and optional brief router training.
* Model level: :class:`SequenceRouter` picks one whole model per prompt from sentence embeddings;
  :func:`evaluate_routed` scores the routed system on a task.
"""

from expertkit.merge.mixture.build import build_ffn_mixture, uniform_probe
from expertkit.merge.mixture.ffn import TARGETS, dense_to_mixtral, dense_to_moe, mixtral_config, moe_config
from expertkit.merge.mixture.model_level import SequenceRouter, evaluate_routed, minilm_embed
from expertkit.merge.mixture.router_init import (
    hidden_state_routers,
    mlp_input_means,
    routers_from_means,
    train_routers,
)

__all__ = [
    "TARGETS", "SequenceRouter", "build_ffn_mixture", "dense_to_mixtral", "dense_to_moe", "evaluate_routed",
    "hidden_state_routers", "minilm_embed", "mixtral_config", "mlp_input_means", "moe_config",
    "routers_from_means", "train_routers", "uniform_probe",
]
