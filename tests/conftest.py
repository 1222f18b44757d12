"""Shared fixtures: tiny generated datasets and checkpoints (always on), and paths into ../shared (skip if absent)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from recompress.checkpoint import save_checkpoint
from recompress.data import open_dataset
from recompress.data.synthetic import make_synthetic
from recompress.families import get_family
from recompress.training import TrainConfig, train_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def train_dlrm(data, cfg, mlet_hidden=None, keep_two_layer=False, **hparams):
    """A DLRM trained from scratch (the CLI's ``train --model dlrm``)."""
    return train_model(get_family("dlrm"), data, cfg, hparams, mlet_hidden=mlet_hidden, keep_two_layer=keep_two_layer)


def shared_path(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"{rel} not found under ../shared; see shared/data/README.md and shared/fixtures/checkpoints/README.md")
    return p


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("data") / "tiny"
    make_synthetic(out, samples=6000, table_rows=[800, 200, 40, 7], zipf=1.3, seed=3)
    return open_dataset(out)


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    ckpt = train_dlrm(tiny_data, TrainConfig(epochs=2, lr=3e-3, batch_size=128), dim=8, bottom="16", top="16")
    return save_checkpoint(ckpt, tmp_path_factory.mktemp("ckpt") / "base")
