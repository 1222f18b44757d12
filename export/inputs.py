"""Model inputs for export and parity: real rows from a dataset split, or valid random ones."""

from __future__ import annotations

import torch

from recompress.data.ctr import CTRDataset

INPUT_NAMES = ("dense", "sparse")
OUTPUT_NAME = "probability"
MAX_BAG = 4


def sample_inputs(model: torch.nn.Module, n: int, data: CTRDataset | None, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` rows: from the test split when data is given, else random valid ids and log1p-like dense values."""
    if data is not None:
        b = data.sample("test" if data.size("test") else "train", n, seed)
        return {"dense": b.dense, "sparse": b.sparse}
    gen = torch.Generator().manual_seed(seed)
    rows = [t.rows for t in model.tables.values()]
    sparse = torch.stack([torch.randint(0, r, (n, 1), generator=gen) for r in rows], dim=1)
    dense = torch.log1p(torch.empty(n, model.hparams["num_dense"]).exponential_(0.1, generator=gen))
    return {"dense": dense, "sparse": sparse}


def multi_hot(inputs: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Bags of 0 to ``MAX_BAG`` ids per table, padded with -1, built from the ids of ``inputs``' rows
    (so every id is one the table really holds); about one bag in five is empty."""
    gen = torch.Generator().manual_seed(seed)
    sparse = inputs["sparse"][..., 0]
    n = sparse.shape[0]
    picks = torch.stack([sparse[torch.randint(0, n, (n,), generator=gen)] for _ in range(MAX_BAG)], dim=-1)
    lengths = torch.randint(0, MAX_BAG + 1, (*sparse.shape, 1), generator=gen)
    bags = torch.where(torch.arange(MAX_BAG) < lengths, picks, torch.full_like(picks, -1))
    return {**inputs, "sparse": bags}


class Scorer(torch.nn.Module):
    """What is exported and served: click probability from (dense, sparse)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(dense, sparse))
