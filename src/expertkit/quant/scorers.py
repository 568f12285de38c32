"""The scorers of the MoE PTQ benchmark paper (Li et al. 2024): which weights deserve more bits.

* :func:`outlier_score` (the linear-weight outlier scorer): for a weight ``W`` ``(out, in)``, each input
  column's largest absolute weight over its mean absolute weight, and the largest of these ratios over
  the columns. A matrix with a few very large weights in some input channel loses most to a uniform
  grid, so it scores high.
* :class:`BlockImportance` (the MoE block scorer): the cosine similarity between a feed-forward
  block's input ``x`` and its output ``FFN(x)`` (the MoE block as a module, before the residual add, as
  the paper's scorer reads them) over calibration tokens; a block whose output is far from its input
  (lower cosine) changes the token more and counts as more important: ``1 - mean cosine``.
  The paper *predicts* this cosine from the block's input with a small trained regressor; with
  ``predicted=True`` a ridge regression (scikit-learn) is fitted from each block's input to the
  per-token cosine on one half of the sampled tokens and the importance is read from its predictions
  on the other half (its R^2 is reported); otherwise the measured mean is used.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from expertkit.errors import ConfigError


def outlier_score(weight: torch.Tensor) -> float:
    """``max_j (max_i |W_ij| / mean_i |W_ij|)`` of ``weight`` ``(out, in)``; an all-zero column scores 0."""
    a = weight.detach().abs().double()  # (out, in)
    mean = a.mean(dim=0)
    ratio = torch.where(mean > 0, a.amax(dim=0) / mean.clamp_min(1e-300), torch.zeros_like(mean))  # (in,)
    return float(ratio.max())


def ffn_blocks(model: Any, targets: list[Any]) -> dict[tuple[str | None, int], str]:
    """``{(stack, layer): module name}`` of each layer's feed-forward block: the MoE block (the module
    holding the experts and the router) or the dense MLP."""
    out: dict[tuple[str | None, int], str] = {}
    for t in targets:
        if t.group == "attention" or t.layer_key in out:
            continue
        if t.group in ("expert", "shared_expert") or t.fused_index is not None:
            module = t.hessian.split("[")[0] if t.expert is not None else t.param.rsplit(".", 2)[0]
            out[t.layer_key] = module.rsplit(".", 1)[0]  # ...mlp.experts -> ...mlp (the MoE block)
        else:
            out[t.layer_key] = t.param.rsplit(".", 2)[0]  # ...mlp.up_proj.weight -> ...mlp
    return out


class BlockImportance:
    """Observer of feed-forward blocks during calibration: per-token cosine of ``x`` and ``FFN(x)``."""

    def __init__(self, blocks: dict[tuple[str | None, int], str], *, sample: int = 4096, per_batch: int = 256,
                 seed: int = 0) -> None:
        self.blocks, self.sample, self.per_batch = blocks, sample, per_batch
        self.cos: dict[tuple[str | None, int], list[torch.Tensor]] = {k: [] for k in blocks}
        self.inputs: dict[tuple[str | None, int], list[torch.Tensor]] = {k: [] for k in blocks}
        self.gen = torch.Generator().manual_seed(seed)
        self.mask: torch.Tensor | None = None

    def attach(self, model: Any) -> list[Any]:
        """Register the hooks; returns their handles."""
        handles = []
        for key, name in self.blocks.items():
            handles.append(model.get_submodule(name).register_forward_hook(self._hook(key)))
        return handles

    def _hook(self, key: tuple[str | None, int]):
        def hook(_module: Any, inputs: tuple[Any, ...], output: Any) -> None:
            x = inputs[0]
            y = output[0] if isinstance(output, tuple) else output
            x, y = x.reshape(-1, x.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float()  # (N, H)
            if self.mask is not None and self.mask.numel() == x.shape[0]:
                real = self.mask.reshape(-1).bool()
                x, y = x[real], y[real]
            cos = F.cosine_similarity(x, y, dim=-1)  # (N,)
            keep = torch.randperm(cos.numel(), generator=self.gen)[: self.per_batch]  # inputs of a sample only
            self.cos[key].append(cos[keep])
            self.inputs[key].append(x[keep])

        return hook

    def importance(self, predicted: bool = False) -> tuple[dict[tuple[str | None, int], float], dict[str, float]]:
        """``({(stack, layer): 1 - mean cosine}, {"r2": mean R^2 of the predictors})`` (R^2 only when predicted)."""
        out, r2s = {}, []
        for key in self.blocks:
            if not self.cos[key]:
                raise ConfigError(f"block importance: the feed-forward block of layer {key[1]} saw no tokens.")
            cos, x = torch.cat(self.cos[key]), torch.cat(self.inputs[key])  # (N,), (N, H)
            if cos.numel() > self.sample:
                pick = torch.randperm(cos.numel(), generator=self.gen)[: self.sample]
                cos, x = cos[pick], x[pick]
            if not predicted:
                out[key] = 1.0 - float(cos.mean())
                continue
            score, r2 = _predicted(x.numpy(), cos.numpy())
            out[key] = 1.0 - score
            r2s.append(r2)
        return out, ({"r2": float(np.mean(r2s))} if r2s else {})


def _predicted(x: np.ndarray, cos: np.ndarray) -> tuple[float, float]:
    """Mean predicted cosine on the second half of the tokens, from a ridge fit on the first; and R^2."""
    from sklearn.linear_model import RidgeCV

    half = len(cos) // 2
    if half < 2:
        return float(cos.mean()), float("nan")
    model = RidgeCV(alphas=(0.1, 1.0, 10.0, 100.0)).fit(x[:half], cos[:half])
    pred = np.clip(model.predict(x[half:]), -1.0, 1.0)
    return float(pred.mean()), float(model.score(x[half:], cos[half:]))


def rank_scores(values: dict[Any, float]) -> dict[Any, float]:
    """Scores in [0, 1] by rank (ties share their mean rank); one value scores 1."""
    keys = list(values)
    if len(keys) == 1:
        return {keys[0]: 1.0}
    from scipy.stats import rankdata

    ranks = rankdata([values[k] for k in keys])  # 1..n, ties averaged
    return {k: float((r - 1) / (len(keys) - 1)) for k, r in zip(keys, ranks, strict=True)}
