"""Datasets: a prepared CTR dataset folder, readers that produce one (Criteo TSV), and synthetic generators."""

from .ctr import CTRDataset, open_dataset

__all__ = ["CTRDataset", "open_dataset"]
