"""Symmetric top-k sparsification that keeps a matrix positive definite.

A quantum linear solver's cost grows with the oracle sparsity d (non-zeros per row). Q-Newton
prunes the (regularised) curvature by magnitude, row by row. Kept symmetric and positive
definite here:

1. the diagonal always stays; an off-diagonal entry ``(i, j)`` is kept when it is among the
   ``k - 1`` largest off-diagonal magnitudes of row ``i`` *and* of row ``j``, so the kept
   pattern is symmetric with at most ``k`` entries per row;
2. every dropped entry's magnitude is added to the diagonal of its row:
   ``S = A - R + diag(Σ_j |R_ij|)``, where ``R`` holds the dropped entries. ``diag(Σ|R|) - R``
   is symmetric and diagonally dominant with a non-negative diagonal, hence positive
   semi-definite (Gershgorin), so ``S ⪰ A ≻ 0``: the sparse system stays positive definite
   and its smallest eigenvalue never drops below A's.
"""

from __future__ import annotations

import torch

from expertkit.errors import ConfigError


def row_sparsity(matrix: torch.Tensor) -> int:
    """d: the largest number of non-zero entries in a row of ``(n, n)`` ``matrix``."""
    return int((matrix != 0).sum(dim=1).max())


def symmetric_topk(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """Prune symmetric ``(n, n)`` ``matrix`` to at most ``k`` entries per row; return ``(S, d)``.

    ``S`` is exactly symmetric and ``S ⪰ matrix`` (see the module doc); ``d`` is its row sparsity.
    The input is symmetrised first (``(A + Aᵀ)/2``).
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ConfigError(f"symmetric_topk needs a square matrix, got shape {tuple(matrix.shape)}.")
    n = matrix.shape[0]
    if not 1 <= k:
        raise ConfigError(f"top-k sparsification needs k >= 1, got {k}.")
    matrix = 0.5 * (matrix + matrix.T)  # exactly symmetric (a float product like m @ m.T may not be)
    if k >= n:
        return matrix, row_sparsity(matrix)
    mag = matrix.abs().fill_diagonal_(-1.0)  # (n, n) off-diagonal magnitudes; the diagonal never competes
    in_row = torch.zeros_like(matrix, dtype=torch.bool)  # (n, n)
    if k > 1:
        in_row.scatter_(1, mag.topk(k - 1, dim=1).indices, True)  # (n, k-1) per row
    keep = in_row & in_row.T  # (n, n) symmetric pattern
    keep.fill_diagonal_(True)
    dropped = torch.where(keep, torch.zeros_like(matrix), matrix)  # (n, n) R, symmetric
    out = torch.where(keep, matrix, torch.zeros_like(matrix))  # (n, n)
    out = out + torch.diag(dropped.abs().sum(dim=1))
    return out, row_sparsity(out)
