import math

import numpy as np
import pytest
import torch
from recompress.compress.lowrank import left_blocks, principal

from recompress.metrics import auc, logloss
from recompress.tables import DenseTable, FactorizedTable, offsets_to_bags


def test_offsets_pooling_equals_embedding_bag():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 6, generator=g)
    ids = torch.randint(0, 50, (23,), generator=g)
    offsets = torch.tensor([0, 3, 3, 10, 22])  # includes an empty bag
    ref = torch.nn.functional.embedding_bag(ids, w, offsets, mode="sum")
    assert torch.allclose(DenseTable(50, 6, w)(ids, offsets), ref, atol=1e-6)
    bags = offsets_to_bags(ids, offsets)
    assert bags.shape == (5, 12) and (bags[1] == -1).all() and bags[4, 0] == ids[22]


def test_factorized_collapse_and_bytes():
    left, right = torch.randn(100, 12), torch.randn(12, 4)
    t = FactorizedTable(100, 4, 12, left, right)
    ids = torch.randint(0, 100, (7, 3))
    assert torch.allclose(t.collapse()(ids), t(ids), atol=1e-5)
    assert t.stored_bytes() == (100 * 12 + 12 * 4) * 4
    assert t.collapse().stored_bytes() == 100 * 4 * 4


def test_lowrank_matches_truncated_svd():
    w = torch.randn(300, 16) @ torch.diag(torch.linspace(3, 0.1, 16))
    basis, err = principal(w, 5)
    left = torch.cat([b for _, b in left_blocks(w, basis)])
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    best = (u[:, :5] * s[:5]) @ vh[:5]
    assert torch.allclose(left.double() @ basis.T, best, atol=1e-4)
    assert err == pytest.approx(float(torch.linalg.norm(w.double() - best) / torch.linalg.norm(w.double())), rel=1e-4)


def test_auc_matches_pairwise_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 10, 300).astype(float)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    brute = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert auc(y, s) == pytest.approx(brute, abs=1e-12)
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_logloss_value():
    assert logloss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
