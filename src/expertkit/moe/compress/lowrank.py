"""MC-SMoE's "C" step: each merged expert matrix as low rank plus a structured sparse residual.

``W (m, n) ~= B A + S`` where ``B A`` (``B (m, r)``, ``A (r, n)``) is the rank-``r`` truncated SVD of
``W`` (the best rank-``r`` approximation in Frobenius norm, Eckart-Young) and ``S`` keeps ``k``
whole input columns of the residual ``W - B A``: structured sparsity (whole columns, so ``S x``
gathers ``k`` input features and multiplies a dense ``(m, k)`` block). Columns are kept by
importance, the norm of the residual column (for a fixed ``B A`` the ``k`` largest residual columns
are the ones that remove the most squared error). Parameters: ``r (m + n) + m k`` instead of ``m n``
(plus ``k`` integer column indices).

:func:`split_budget` turns a kept fraction of ``m n`` and the share of it given to the sparse part
into ``(r, k)``; at full rank (``r = min(m, n)``) the factors reproduce ``W`` to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertkit.errors import ConfigError


@dataclass
class Factors:
    """``W ~= b @ a`` plus ``values`` placed in the input columns ``index``."""

    a: torch.Tensor  # (r, n)
    b: torch.Tensor  # (m, r)
    values: torch.Tensor  # (m, k)
    index: torch.Tensor  # (k,) int64, sorted input columns

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of the matrix the factors stand for."""
        return int(self.b.shape[0]), int(self.a.shape[1])

    def parameters(self) -> int:
        """Stored values: ``r (m + n) + m k`` (the column indices are not counted)."""
        return self.a.numel() + self.b.numel() + self.values.numel()

    def dense(self) -> torch.Tensor:
        """``(m, n)``: the matrix the factors stand for."""
        w = self.b @ self.a
        if self.index.numel():
            w[:, self.index] += self.values
        return w

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x (N, n) -> (N, m)``: ``x W^T`` without forming ``W``."""
        out = (x @ self.a.T) @ self.b.T  # (N, r) -> (N, m)
        if self.index.numel():
            out = out + x[:, self.index] @ self.values.T  # (N, k) @ (k, m)
        return out


def split_budget(m: int, n: int, keep: float, sparse_share: float) -> tuple[int, int]:
    """``(rank, columns)`` whose parameters fit in ``keep * m * n``, ``sparse_share`` of them sparse."""
    if not 0 < keep <= 1 or not 0 <= sparse_share <= 1:
        raise ConfigError(f"keep must be in (0, 1] and sparse_share in [0, 1]; got {keep} and {sparse_share}.")
    budget = keep * m * n
    columns = min(n, int(sparse_share * budget // m))
    rank = min(m, n, int((budget - columns * m) // (m + n)))
    return rank, columns


@torch.no_grad()
def factorize(w: torch.Tensor, rank: int, columns: int) -> Factors:
    """Truncated SVD of ``w (m, n)`` at ``rank`` plus the ``columns`` largest residual columns."""
    m, n = w.shape
    if not 0 <= rank <= min(m, n) or not 0 <= columns <= n:
        raise ConfigError(f"rank {rank} / columns {columns} do not fit a {m} x {n} matrix.")
    w64 = w.double()
    u, s, vh = torch.linalg.svd(w64, full_matrices=False)  # (m, q), (q,), (q, n)
    b = u[:, :rank] * s[:rank]  # (m, r)
    a = vh[:rank]  # (r, n)
    del u, s  # what is not needed is freed before the residual (the pass streams, bench/moe_compress.py)
    residual = b @ a  # (m, n)
    torch.sub(w64, residual, out=residual)  # w64 - b a, in place: the same values as a new tensor
    del w64
    index = torch.sort(torch.topk(residual.norm(dim=0), columns).indices).values if columns else torch.zeros(
        0, dtype=torch.long)
    values = residual[:, index]  # (m, k)
    dt = w.dtype
    return Factors(a.to(dt).contiguous(), b.to(dt).contiguous(), values.to(dt).contiguous(), index.long())
