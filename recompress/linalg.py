"""Streaming linear algebra for big tables: Gram matrices in row chunks, principal bases from them."""

from __future__ import annotations

import torch

CHUNK_ROWS = 1 << 18


def gram(weight: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``W^T diag(w) W`` in float64, read in row chunks (never a second copy of a big table)."""
    d = weight.shape[1]
    g = torch.zeros(d, d, dtype=torch.float64)
    for s in range(0, weight.shape[0], CHUNK_ROWS):
        w = weight[s:s + CHUNK_ROWS].double()
        if row_weights is not None:
            g += (w * row_weights[s:s + CHUNK_ROWS, None].double()).T @ w
        else:
            g += w.T @ w
    return g


def principal_basis(g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenvectors [d, k] of a symmetric PSD matrix and all eigenvalues (descending)."""
    vals, vecs = torch.linalg.eigh(g)
    vals, vecs = vals.flip(0).clamp(min=0), vecs.flip(1)
    return vecs[:, :k], vals
