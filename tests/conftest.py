"""Shared fixtures: tiny generated datasets and checkpoints (always on), and paths into ../shared (skip if absent)."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recompress.checkpoint import save_checkpoint
from recompress.data import open_dataset
from recompress.data.synthetic import make_synthetic
from recompress.families import get_family
from recompress.training import TrainConfig, train_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _bench():
    """bench/stream_memory.py (its checkpoint makers), loaded by path."""
    spec = importlib.util.spec_from_file_location("stream_memory",
                                                  Path(__file__).resolve().parents[1] / "bench" / "stream_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.fixture(scope="session")
def big_and_small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """Native DLRMs with one 2M x 64 table (``big``) and one of 1,000 rows (``small``), each with a synthetic
    dataset of its vocabulary (``dbig``, ``dsmall``, 3,000 rows), made once for the memory tests: the same
    command on both measures what grows with the table. (folder, the big table's bytes). The MLPs take torch's
    default init from the global generator: seeded here, so that they do not depend on the tests run before."""
    root = tmp_path_factory.mktemp("big")
    bench = _bench()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        table = bench.make_checkpoint(root / "big", 2_000_000, 64)
        bench.make_checkpoint(root / "small", 1000, 64)
    for name, rows in (("big", 2_000_000), ("small", 1000)):
        subprocess.run([sys.executable, "-m", "recompress", "data", "synthetic", "-o", root / f"d{name}",
                        "--tables", str(rows), "--samples", "3000"], check=True, capture_output=True)
    return root, table


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
