"""Row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD) against the formula written out in float64, and what it saves:
fine-tuning a big table no longer allocates optimizer state of the table's size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recompress.rowwise_adagrad import EPS, RowwiseAdagrad

from .test_mapped_load import _peak_anon


def _reference(w0: np.ndarray, batches: list[tuple[np.ndarray, np.ndarray]], lr: float) -> np.ndarray:
    """The update by hand: each step's row gradient is the sum of the coefficients of its lookups (the loss is
    sum_k <w[id_k], c_k>); m_i += mean(g_i^2); w_i -= lr g_i / (sqrt(m_i) + eps), for the rows looked up."""
    w, m = w0.astype(np.float64).copy(), np.zeros(len(w0))
    for ids, coef in batches:
        g = np.zeros_like(w)
        np.add.at(g, ids, coef)
        for i in np.unique(ids):
            m[i] += np.mean(g[i] ** 2)
            w[i] -= lr * g[i] / (np.sqrt(m[i]) + EPS)
    return w


@pytest.mark.parametrize("sparse", [True, False])
def test_rowwise_adagrad_is_fbgemms_update(sparse):
    """Three steps whose batches repeat ids (their gradients are summed first, as FBGEMM's exact variant does):
    every row as the formula gives it, rows never looked up bit for bit unchanged, one float of state per row.
    Dense gradients (a table trained without sparse gradients) give the same."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(50, 8, generator=gen)
    emb = torch.nn.Embedding(50, 8, sparse=sparse, _weight=w0.clone())
    opt = RowwiseAdagrad(emb.parameters(), lr=0.1)
    batches = [(torch.randint(0, 30, (40,), generator=gen), torch.randn(40, 8, generator=gen)) for _ in range(3)]
    for ids, coef in batches:
        opt.zero_grad()
        (emb(ids) * coef).sum().backward()
        opt.step()
    want = _reference(w0.numpy(), [(i.numpy(), c.numpy()) for i, c in batches], 0.1)
    assert np.allclose(emb.weight.detach().numpy(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(emb.weight.detach()[30:], w0[30:])
    assert opt.state[emb.weight]["sum"].shape == (50,)


def test_a_step_that_looks_up_no_row_changes_nothing_and_eps_must_be_positive():
    """Found by review: a step whose gradient holds no row (every bag empty: a sparse gradient without entries,
    or an all-zero dense one) failed to reshape an empty tensor; it now leaves the table and the state as they
    were. eps = 0 made a looked-up row with a zero gradient 0 * inf = NaN, and is refused."""
    w0 = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    for sparse in (True, False):
        emb = torch.nn.Embedding(10, 4, sparse=sparse, _weight=w0.clone())
        opt = RowwiseAdagrad(emb.parameters(), lr=0.1)
        emb(torch.zeros(3, 0, dtype=torch.long)).sum().backward()
        opt.step()
        assert torch.equal(emb.weight.detach(), w0) and not opt.state[emb.weight]["sum"].any()
    with pytest.raises(ValueError, match="eps > 0"):
        RowwiseAdagrad(torch.nn.Embedding(10, 4).parameters(), eps=0.0)


@pytest.mark.big
def test_finetuning_a_big_table_with_rowwise_adagrad_holds_no_optimizer_state_of_its_size(big_and_small):
    """A 2M x 64 table (512 MB), 5 fine-tuning steps: with SparseAdam the process grows by > 1.5x the table (its
    two moment tensors, allocated whole at the first step); with row-wise Adagrad by < 0.1x (8 MB of row
    state, the rows the steps wrote into the mapped table and the output's bytes written from it), and the
    fine-tuned checkpoint differs from the source only in rows the batches looked up."""
    from recompress.checkpoint import load_checkpoint

    tmp_path, table = big_and_small
    peak = {}
    for opt in ("adam", "rowwise-adagrad"):
        for name in ("small", "big"):
            peak[opt, name] = _peak_anon("checkpoint", tmp_path / name, "--method", "finetune", "--data",
                                         tmp_path / f"d{name}", "--steps", "5", "--no-keep-best", "--optimizer", opt,
                                         "-o", tmp_path / f"o-{opt}-{name}")
    assert peak["adam", "big"] - peak["adam", "small"] > 1.5 * table, peak
    assert peak["rowwise-adagrad", "big"] - peak["rowwise-adagrad", "small"] < 0.1 * table, peak
    before = load_checkpoint(tmp_path / "big").model.tables["C1"].weight
    after = load_checkpoint(tmp_path / "o-rowwise-adagrad-big").model.tables["C1"].weight
    changed = int((before != after).any(1).sum())
    assert 0 < changed <= 5 * 256, changed  # at most the ids of 5 batches of 256 rows, one id each


@pytest.mark.big
def test_keep_best_holds_no_copy_of_a_big_table_and_restores_the_best_step(big_and_small):
    """--keep-best (checkpoint's default) kept the best weights as clones in the process's own memory: the
    first check, before any step, copied the 512 MB table (1x), which undid what row-wise Adagrad saves. Big
    tensors are now kept as a file's pages in TMPDIR (< 0.1x growth), and the checkpoint is the model of the
    best check: the same as a run stopped there without keep-best."""
    import json

    from safetensors.numpy import load_file

    tmp_path, table = big_and_small
    run = ("--method", "finetune", "--steps", "6", "--optimizer", "rowwise-adagrad", "--lr", "0.02")
    peak = {name: _peak_anon("checkpoint", tmp_path / name, *run, "--data", tmp_path / f"d{name}", "--keep-best",
                             "-o", tmp_path / f"kb-{name}") for name in ("small", "big")}
    assert peak["big"] - peak["small"] < 0.1 * table, peak
    spec = json.loads((tmp_path / "kb-big" / "spec.json").read_text())
    best = spec["history"][-1]["finetune"]["keep_best"]["best_step"]
    assert 0 < best < 6  # a restore of neither the start nor the end (checks at 0, 2, 4, 6: 4 scored best)
    # in a process like the kept run's (in this one, earlier tests' thread settings change float sums)
    _peak_anon("checkpoint", tmp_path / "big", *run[:2], "--steps", str(best), *run[4:], "--data", tmp_path / "dbig",
               "--no-keep-best", "-o", tmp_path / "stopped")
    kept, stopped = (load_file(str(tmp_path / n / "weights.safetensors")) for n in ("kb-big", "stopped"))
    assert kept.keys() == stopped.keys()
    assert all(np.array_equal(kept[k], stopped[k]) for k in kept)
