"""Arcee Fusion: take the model's value only where its change from the base is salient.

Semantics, per tensor (the definition mergekit documents: "importance scores based on parameter
differences and KL divergence, then a dynamic threshold"; the details measured on mergekit
0.1.5): with the base ``b`` and the one model ``m``, ``d = m - b``. For each row (the last
dimension; a vector is one row) ``KL = sum_j p_j (log p_j - log q_j)`` with ``p = softmax(m_row)``
and ``q = softmax(b_row)``; the importance of an element is ``|d| * KL`` of its row. The
threshold is ``median + 1.5 * IQR`` of the importances over the whole tensor (Tukey's outlier
fence; quantiles by linear interpolation between order statistics, as ``torch.quantile``), and
the fused tensor is ``b + d`` where the importance exceeds it (``m`` up to float rounding) and
``b`` elsewhere. No parameters.

Differences from mergekit 0.1.5 (measured), both at the threshold only: the KL of two nearly
uniform softmaxes is a small difference of large sums; expertkit computes it in float64, mergekit
in float32 (relative error up to ~1e-3), so elements whose importance is that close to the
threshold can fall on the other side (3 of 90,112 elements of the tiny Llama test zoo). Above
2^24 elements, where ``torch.quantile`` refuses its input, mergekit's threshold is not the exact
quantile (958 of 17.2M elements of a 4200 x 4096 tensor differ); expertkit uses the exact order
statistics (``torch.kthvalue``) at any size.
"""

from __future__ import annotations

import torch
from expertkit.merge.methods.base import MethodParams, TensorInputs, merge_method


class ArceeFusionParams(MethodParams):
    """``arcee_fusion`` has no parameters."""


def quartiles(flat: torch.Tensor) -> torch.Tensor:
    """The 0.25, 0.5 and 0.75 quantiles of a 1-D tensor (linear interpolation, as ``torch.quantile``,
    in the tensor's dtype), at any size: ``torch.quantile`` itself up to its limit of 2^24
    elements, the same interpolation over ``torch.kthvalue`` order statistics beyond."""
    qs = torch.tensor([0.25, 0.5, 0.75], dtype=flat.dtype)
    n = flat.numel()
    if n <= QUANTILE_LIMIT:
        return torch.quantile(flat, qs)
    out = []
    for q in qs.tolist():
        pos = q * (n - 1)
        lo = int(pos)
        a = torch.kthvalue(flat, lo + 1).values
        b = torch.kthvalue(flat, min(lo + 2, n)).values
        out.append(torch.lerp(a, b, pos - lo))
    return torch.stack(out)


QUANTILE_LIMIT = 1 << 24
BLOCK = 1 << 20  # entries per block of the float64 KL


def row_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(p_row) || softmax(q_row))`` per row of ``(rows, n)`` logits, ``(rows, 1)`` float64.

    Computed in float64, block of rows by block: the softmaxes of weight rows are nearly uniform,
    so the KL is a small difference of large sums and float32 loses up to ~1e-3 of it (measured).
    """
    out = torch.empty(p_logits.shape[0], 1, dtype=torch.float64)
    step = max(1, BLOCK // max(1, p_logits.shape[1]))
    for start in range(0, p_logits.shape[0], step):
        lp = torch.log_softmax(p_logits[start:start + step].double(), dim=-1)  # (r, n)
        lq = torch.log_softmax(q_logits[start:start + step].double(), dim=-1)
        out[start:start + step] = (lp.exp() * (lp - lq)).sum(dim=-1, keepdim=True)
    return out


@merge_method("arcee_fusion", params=ArceeFusionParams, needs_base=True, min_models=1, max_models=1,
              uses_weights=False,
              vs_mergekit="equal except elements at the threshold: KL in float64 (mergekit: float32), 3 of "
                          "90,112 elements differ on the test zoo; above 2^24 elements mergekit's threshold is "
                          "approximate (0.006 % differ)",
              paper="Arcee AI 2025, mergekit v0.1 release (Arcee Fusion); Tukey 1977 (outlier fence)",
              summary="model's value where |change| x row KL divergence is an outlier, base elsewhere")
def arcee_fusion(x: TensorInputs) -> torch.Tensor:
    """``base + d`` where ``|d| * KL_row > median + 1.5 IQR``, the base elsewhere."""
    b, m = x.work(x.base), x.work(x.tensors[0])
    if m.numel() == 0:
        return b
    rows_m = m.reshape(-1, m.shape[-1]) if m.dim() > 0 else m.reshape(1, 1)  # (rows, last)
    rows_b = b.reshape(rows_m.shape)
    kl = row_kl(rows_m, rows_b).to(m.dtype)  # (rows, 1)
    importance = (rows_m - rows_b).abs_().mul_(kl).reshape(-1)  # (numel,)
    q1, q2, q3 = quartiles(importance)
    fused = importance.reshape(m.shape) > q2 + 1.5 * (q3 - q1)
    return b.add_((m - b).mul_(fused))  # b + d where fused: mergekit's rounding (not always m itself)
