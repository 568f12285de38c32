"""GPTQ in plain torch (Frantar et al. 2022), and the slow optimal-brain-quantization update it must equal.

Both minimise the layer error ``||(W - Q) X^T||^2 = tr((W - Q) H (W - Q)^T)`` with ``H = X^T X`` the
(un-normalised) Hessian of the layer's calibration inputs ``X`` ``(tokens, columns)``, quantizing one
input column at a time and spreading each column's rounding error over the columns not yet
quantized:

* :func:`obq_reference` is the direct form: after quantizing column ``c`` the remaining columns get
  ``W[:, j] -= (w_c - q_c) / Hinv[c, c] * Hinv[c, j]`` and ``c`` is removed from the inverse Hessian
  by one step of Gaussian elimination (``Hinv -= Hinv[:, c] Hinv[c, :] / Hinv[c, c]``). Unblocked,
  O(columns^3) per row block; the reference in tests.
* :func:`gptq` is the fast form: the same updates read off the rows of the upper Cholesky factor of
  ``H^-1`` (no elimination), applied lazily in blocks of ``block_size`` columns.

Options: dampening (``damp * mean(diag H)`` added to the diagonal), group size (a scale per group of
columns, computed when the group's first column is reached, from the weights as updated so far),
symmetric or asymmetric grids, and act-order (columns in order of decreasing ``diag H``; group
parameters are then fixed beforehand from the original weights, in the original column order, so the
stored layout needs no column permutation; compressed-tensors calls this ``actorder: weight``).
Columns whose inputs are always zero (``H[c, c] = 0``) are quantized as zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertkit.errors import ConfigError
from expertkit.quant.grid import QuantizedWeight, Scheme, group_params, quantize_codes, dequantize_codes


@dataclass(frozen=True)
class GptqSettings:
    """GPTQ's numerical options."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False


class _Grid:
    """Per-group scales and zero-points, filled as groups are reached (or all at once for act-order)."""

    def __init__(self, rows: int, cols: int, scheme: Scheme, dtype: torch.dtype) -> None:
        self.scheme, self.width = scheme, scheme.width(cols)
        n = scheme.groups(cols)
        self.scale = torch.zeros(rows, n, dtype=dtype)
        self.zero = torch.zeros(rows, n, dtype=dtype)

    def set(self, group: int, w: torch.Tensor) -> None:
        self.scale[:, group], self.zero[:, group] = group_params(w, self.scheme)

    def quant(self, w: torch.Tensor, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and dequantized values of column ``w`` ``(rows,)`` at original column index ``col``."""
        g = col // self.width
        q = quantize_codes(w, self.scale[:, g], self.zero[:, g], self.scheme.bits)
        return q, dequantize_codes(q, self.scale[:, g], self.zero[:, g], self.scheme.scale_dtype, w.dtype)


def _prepare(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, settings: GptqSettings,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Grid]:
    """Checked copies: ``W`` ``(rows, cols)`` and damped ``H`` ``(cols, cols)`` in processing order,
    the permutation, and the grid (filled now for act-order)."""
    if not scheme.quantized:
        raise ConfigError("GPTQ quantizes; a 16-bit scheme keeps the weight as it is.")
    if settings.damp < 0 or settings.block_size < 1:
        raise ConfigError(f"GPTQ needs damp >= 0 and block_size >= 1 (got {settings.damp}, {settings.block_size}).")
    w = weight.detach().to(dtype).clone()
    h = hessian.detach().to(dtype).clone()
    rows, cols = w.shape
    if h.shape != (cols, cols):
        raise ConfigError(f"the Hessian is {tuple(h.shape)} but the weight has {cols} input columns.")
    scheme.check_shape(cols)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    grid = _Grid(rows, cols, scheme, dtype)
    perm = torch.arange(cols)
    if settings.act_order:
        for g in range(grid.scale.shape[1]):  # static groups, from the original weights
            grid.set(g, w[:, g * grid.width:(g + 1) * grid.width])
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    h += settings.damp * torch.diagonal(h).mean() * torch.eye(cols, dtype=dtype)
    return w, h, perm, grid


def _finish(codes: torch.Tensor, perm: torch.Tensor, grid: _Grid) -> QuantizedWeight:
    out = torch.empty_like(codes)
    out[:, perm] = codes  # back to the original column order
    return QuantizedWeight(out.to(torch.int8), grid.scale.float(), grid.zero.to(torch.int8), grid.scheme)


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``)."""
    try:
        chol = torch.linalg.cholesky(h)
        return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise ConfigError("the calibration Hessian is not positive definite even after dampening; raise 'damp' "
                          "(e.g. 0.1) or calibrate on more tokens.") from None


@torch.no_grad()
def gptq(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, settings: GptqSettings = GptqSettings(),
         *, dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """Quantize ``weight`` ``(rows, cols)`` given ``hessian`` ``(cols, cols)`` = sum of ``x x^T`` over tokens."""
    w, h, perm, grid = _prepare(weight, hessian, scheme, settings, dtype)
    rows, cols = w.shape
    u = _inverse_cholesky(h)  # (cols, cols) upper
    codes = torch.zeros(rows, cols, dtype=dtype)
    for i1 in range(0, cols, settings.block_size):
        i2 = min(i1 + settings.block_size, cols)
        w1 = w[:, i1:i2].clone()  # (rows, B): the block, updated column by column
        err = torch.zeros(rows, i2 - i1, dtype=dtype)
        for i in range(i2 - i1):
            col = i1 + i
            if not settings.act_order and col % grid.width == 0:
                grid.set(col // grid.width, _current(w, w1, err, u, i1, i2, i, grid.width))
            q, deq = grid.quant(w1[:, i], int(perm[col]))
            codes[:, col] = q
            err[:, i] = (w1[:, i] - deq) / u[col, col]
            w1[:, i:] -= err[:, i:i + 1] * u[col:col + 1, col:i2]
        w[:, i2:] -= err @ u[i1:i2, i2:]  # the block's deferred updates to every later column
    return _finish(codes, perm, grid)


def _current(w: torch.Tensor, w1: torch.Tensor, err: torch.Tensor, u: torch.Tensor, i1: int, i2: int, i: int,
             width: int) -> torch.Tensor:
    """``(rows, width)``: the weights of the group starting at block column ``i`` as updated so far,
    including the block's updates not yet applied to columns past the block."""
    col, end = i1 + i, min(i1 + i + width, w.shape[1])
    inside = w1[:, i:min(i2 - i1, end - i1)]
    if end <= i2:
        return inside
    later = w[:, i2:end] - err[:, :i] @ u[i1:col, i2:end]  # (rows, end - i2)
    return torch.cat([inside, later], dim=1)


@torch.no_grad()
def obq_reference(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme,
                  settings: GptqSettings = GptqSettings(), *, dtype: torch.dtype = torch.float64) -> QuantizedWeight:
    """The same quantization as :func:`gptq`, by the direct (slow, unblocked) OBQ update."""
    w, h, perm, grid = _prepare(weight, hessian, scheme, settings, dtype)
    rows, cols = w.shape
    hinv = torch.linalg.inv(h)  # (cols, cols)
    codes = torch.zeros(rows, cols, dtype=dtype)
    for col in range(cols):
        if not settings.act_order and col % grid.width == 0:
            grid.set(col // grid.width, w[:, col:col + grid.width])
        q, deq = grid.quant(w[:, col], int(perm[col]))
        codes[:, col] = q
        err = (w[:, col] - deq) / hinv[col, col]  # (rows,)
        w[:, col:] -= err[:, None] * hinv[col:col + 1, col:]
        hinv = hinv - torch.outer(hinv[:, col], hinv[col, :]) / hinv[col, col]  # eliminate column col
    return _finish(codes, perm, grid)


def layer_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)``: the summed squared output error over the calibration tokens."""
    d = weight.double() - dequantized.double()  # (rows, cols)
    return float(((d @ hessian.double()) * d).sum())
