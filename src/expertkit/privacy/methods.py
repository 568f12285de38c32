"""The registered DP optimizers ``dp-sgd`` and ``dp-adamw``, with DP-Flat's parts composed by params.

``expertkit train --dp`` and ``optimizer: dp-adamw`` in a config both land here. The factory builds
the torch optimizer, wraps it in :class:`~expertkit.privacy.dp.PrivateOptimizer` (sparse prefix
masks when ``prefix_layers`` is set), then in :class:`~expertkit.privacy.wrappers.WeightPerturbation`
(``rho > 0``) and :class:`~expertkit.privacy.wrappers.WeightDistillation` (``teacher``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from expertkit.errors import CheckpointError, ConfigError
from expertkit.privacy.config import DPAdamWParams, DPParams, DPSGDParams
from expertkit.privacy.dp import PrivateOptimizer
from expertkit.privacy.wrappers import WeightDistillation, WeightPerturbation
from expertkit.train.optimizers import OPTIMIZERS, OptimizerSetup

PAPER = "Abadi et al., Deep Learning with Differential Privacy (CCS 2016); DP-Flat (Chen et al., 2024)"


def teacher_tensors(model: Any, params: list[torch.nn.Parameter], folder: str | Path) -> list[torch.Tensor]:
    """The teacher's values of the student's trainable ``params``, read from a training output folder.

    A PEFT adapter is loaded into ``model`` with PEFT's own loader, read, and the student's values
    are put back; a full model (``model.safetensors``) is matched by parameter name.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    adapter, full = folder / "adapter_model.safetensors", folder / "model.safetensors"
    saved = [p.detach().clone() for p in params]
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        try:
            set_peft_model_state_dict(model, load_file(adapter))
            return [p.detach().clone() for p in params]
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
    if full.is_file():
        tensors = load_file(full)
        by_id = {id(p): n for n, p in model.named_parameters()}
        missing = [by_id[id(p)] for p in params if by_id[id(p)] not in tensors]
        if missing:
            raise CheckpointError(f"teacher {folder} lacks {missing[0]} (and {len(missing) - 1} more); "
                                  "train it with the same scheme as the student.")
        return [tensors[by_id[id(p)]] for p in params]
    raise CheckpointError(f"teacher {folder} holds no adapter_model.safetensors or model.safetensors; "
                          "pass the output folder of `expertkit train` on the public data.")


def _teacher_meta(folder: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(folder) / "expertkit.json").read_text())
    except (OSError, ValueError):
        return {}


def build_private(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], setup: OptimizerSetup) -> Any:
    """Wrap ``opt`` into DP-SGD and DP-Flat's parts as ``setup.hparams`` (a :class:`DPParams`) says."""
    hp: DPParams = setup.hparams  # type: ignore[assignment]
    if setup.model is None or setup.pool_size is None or setup.batch_size is None:
        raise ConfigError("DP training needs the model, the number of private examples and the batch size; "
                          "train through expertkit.train.train_lora (or pass them to build_optimizer).")
    masks = None
    if hp.prefix_layers is not None:
        from expertkit.privacy.prefix import prefix_masks

        masks = prefix_masks(setup.model, hp.prefix_layers)
    core = PrivateOptimizer(
        opt, setup.model, pool_size=setup.pool_size, batch_size=setup.batch_size, steps=setup.steps,
        seed=setup.seed, delta=hp.delta, max_grad_norm=hp.max_grad_norm, accountant=hp.accountant,
        epsilon=hp.epsilon if hp.noise_multiplier is None else None, noise_multiplier=hp.noise_multiplier,
        masks=masks,
    )
    out: Any = core
    try:
        if hp.rho > 0:
            out = WeightPerturbation(out, hp.rho)
        if hp.teacher is not None:
            meta = _teacher_meta(hp.teacher)
            if meta.get("optimizer", "").startswith("dp-"):
                raise ConfigError(f"teacher {hp.teacher} was trained with DP; the teacher must be a non-DP model "
                                  "trained on public data only.")
            out = WeightDistillation(out, teacher_tensors(setup.model, params, hp.teacher), hp.distill_weight)
    except Exception:
        core.close()
        raise
    return out


@OPTIMIZERS.register("dp-sgd", summary="DP-SGD (Opacus): per-example clipping, Gaussian noise, RDP/PRV accounting; "
                     "DP-Flat parts by params", params=DPSGDParams, paper=PAPER, dp=True)
def dp_sgd(params: list[torch.nn.Parameter], setup: OptimizerSetup) -> Any:
    """DP-SGD over ``params`` (``setup.hparams``: :class:`DPSGDParams`)."""
    hp: DPSGDParams = setup.hparams  # type: ignore[assignment]
    opt = torch.optim.SGD(params, lr=setup.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
    return build_private(opt, params, setup)


@OPTIMIZERS.register("dp-adamw", summary="DP-AdamW (Opacus): AdamW on privatised gradients; DP-Flat parts by params",
                     params=DPAdamWParams, paper=PAPER, dp=True)
def dp_adamw(params: list[torch.nn.Parameter], setup: OptimizerSetup) -> Any:
    """AdamW on DP-SGD's privatised gradients (``setup.hparams``: :class:`DPAdamWParams`)."""
    hp: DPAdamWParams = setup.hparams  # type: ignore[assignment]
    opt = torch.optim.AdamW(params, lr=setup.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay)
    return build_private(opt, params, setup)
