"""Streaming linear algebra for big tables: Gram matrices in row chunks, principal bases from them."""

from __future__ import annotations

import torch

CHUNK_BYTES = 1 << 25  # float64 bytes per row chunk: memory stays flat whatever the table's size


def chunk_rows(dim: int) -> int:
    """Rows per chunk of a table ``dim`` wide."""
    return max(1, CHUNK_BYTES // (8 * dim))


def gram(weight: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``W^T diag(w) W`` in float64, read in row chunks (never a second copy of a big table)."""
    d = weight.shape[1]
    g = torch.zeros(d, d, dtype=torch.float64)
    step = chunk_rows(d)
    for s in range(0, weight.shape[0], step):
        w = weight[s:s + step].double()
        if row_weights is not None:
            g += (w * row_weights[s:s + step, None].double()).T @ w
        else:
            g += w.T @ w
    return g


def principal_basis(g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenvectors [d, k] of a symmetric PSD matrix and all eigenvalues (descending)."""
    vals, vecs = torch.linalg.eigh(g)
    vals, vecs = vals.flip(0).clamp(min=0), vecs.flip(1)
    return vecs[:, :k], vals
