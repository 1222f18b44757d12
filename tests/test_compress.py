import copy

import pytest
import torch
from recompress.compress.registry import Context, Selection, compress, parse_methods

from recompress.checkpoint import Checkpoint, load_checkpoint
from recompress.errors import UserError
from recompress.families import get_family
from recompress.models.dlrm import DLRM, default_hparams
from recompress.spec import ModelSpec
from recompress.tables import DenseTable, FactorizedTable
from recompress.training import TrainConfig

from .conftest import train_dlrm


def probs(model, data, n=500):
    b = data.sample("test", n)
    with torch.no_grad():
        return torch.sigmoid(model(b.dense, b.sparse))


def test_mlet_width_cut_is_exact_when_inputs_span_d_dims(tiny_data):
    """If every vector entering the dot interaction lies in a d-dim subspace, cutting D -> d loses nothing."""
    D, d = 6, 2
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(D, d, generator=g))
    hp = {**default_hparams(13, D, [16, D], [16, 1]), "bottom_proj": True}
    tables = {n: DenseTable(r, D, torch.randn(r, d, generator=g) @ basis.T)
              for n, r in zip(tiny_data.table_names, tiny_data.table_rows)}
    model = DLRM(hp, tables)
    get_family("dlrm").init(model, 0)
    for n, r in zip(tiny_data.table_names, tiny_data.table_rows):
        model.tables[n].weight.data = torch.randn(r, d, generator=g) @ basis.T
    model.bottom_proj.weight.data = basis @ basis.T @ torch.randn(D, D, generator=g)
    before = probs(model, tiny_data)
    ck = Checkpoint(model, ModelSpec("dlrm", hp, []))
    ck = compress(ck, parse_methods("mlet", {"dim": d}), Context(tiny_data, TrainConfig(steps=0)))
    assert ck.model.hparams["emb_dim"] == d
    assert all(isinstance(t, DenseTable) and t.dim == d for t in ck.model.tables.values())
    assert torch.allclose(probs(ck.model, tiny_data), before, atol=1e-5)
    assert ck.spec.history[-1]["energy_kept"] == pytest.approx(1.0, abs=1e-6)


def test_post_training_mlet_recovers_accuracy(tiny_ckpt, tiny_data):
    ck = load_checkpoint(tiny_ckpt)
    ck = compress(ck, parse_methods("mlet", {"dim": 4, "hidden": 16}), Context(tiny_data, TrainConfig(epochs=1, lr=1e-3, batch_size=128)))
    h = ck.spec.history[-1]
    assert h["params"] == {"dim": 4, "hidden": 16}
    assert sum(t.stored_bytes() for t in ck.model.tables.values()) == sum(tiny_data.table_rows) * 4 * 4
    # the fine-tuned, collapsed model is a real model: validation AUC well above chance and near the start
    assert h["finetune"]["val"]["auc"] > 0.6
    assert h["finetune"]["val"]["auc"] > h["before"]["auc"] - 0.05


def test_two_layer_checkpoint_collapses_exactly_without_data(tiny_data):
    ck = train_dlrm(tiny_data, TrainConfig(steps=20, batch_size=64), dim=4, mlet_hidden=12, keep_two_layer=True)
    assert all(isinstance(t, FactorizedTable) for t in ck.model.tables.values())
    before = probs(ck.model, tiny_data)
    ck = compress(ck, parse_methods("mlet", {}), Context(None))
    assert all(isinstance(t, DenseTable) for t in ck.model.tables.values())
    assert torch.allclose(probs(ck.model, tiny_data), before, atol=1e-6)


def test_lowrank_selection_bytes_and_errors(tiny_ckpt):
    ck = load_checkpoint(tiny_ckpt)
    base = {n: t.stored_bytes() for n, t in ck.model.tables.items()}
    out = compress(copy.deepcopy(ck), parse_methods("lowrank", {"rank": 2}), Context(select=Selection(min_rows=100)))
    kinds = {n: t.kind for n, t in out.model.tables.items()}
    assert kinds == {"C1": "factorized", "C2": "factorized", "C3": "dense", "C4": "dense"}
    assert out.model.tables["C1"].stored_bytes() == (800 * 2 + 2 * 8) * 4 < base["C1"]
    with pytest.raises(UserError, match="not below table C1's width 8"):
        compress(copy.deepcopy(ck), parse_methods("lowrank", {"rank": 8}), Context())
    with pytest.raises(UserError, match="unknown table"):
        compress(copy.deepcopy(ck), parse_methods("lowrank", {"rank": 2}), Context(select=Selection(names=("X",))))


def test_composition_applies_in_order_and_validates(tiny_ckpt, tiny_data):
    ck = load_checkpoint(tiny_ckpt)
    out = compress(ck, parse_methods("mlet,lowrank", {"dim": 4, "rank": 2}), Context(tiny_data, TrainConfig(steps=5), Selection(min_rows=100)))
    assert [h["method"] for h in out.spec.history] == ["mlet", "lowrank"]
    assert out.model.tables["C1"].kind == "factorized" and out.model.tables["C1"].dim == 4
    with pytest.raises(UserError, match="lowrank cannot read factorized"):
        compress(out, parse_methods("lowrank", {"rank": 1}), Context(select=Selection(min_rows=100)))
    with pytest.raises(UserError, match="did you mean 'mlet'"):
        parse_methods("mlte")


@pytest.mark.parametrize("params,msg", [({"dim": 8}, "--dim 8 is not below the current embedding width 8"),
                                        ({"dim": 4, "hidden": 2}, "--hidden 2 is smaller than --dim 4"),
                                        ({}, "nothing to collapse")])
def test_mlet_bad_parameters(tiny_ckpt, tiny_data, params, msg):
    ck = load_checkpoint(tiny_ckpt)
    with pytest.raises(UserError, match=msg):
        compress(ck, parse_methods("mlet", params), Context(tiny_data, TrainConfig(steps=0)))


def test_mlet_needs_data(tiny_ckpt):
    with pytest.raises(UserError, match="pass --data"):
        compress(load_checkpoint(tiny_ckpt), parse_methods("mlet", {"dim": 4}), Context(None))


def test_keep_best_never_ends_worse_than_it_started_and_stops_early(tiny_ckpt, tiny_data):
    from recompress.training import fit, validate
    start = load_checkpoint(tiny_ckpt)
    start_auc = validate(start.model, tiny_data)["auc"]
    ruin = dict(epochs=3, lr=0.3, optimizer="adam", batch_size=64, seed=0)
    plain = load_checkpoint(tiny_ckpt)
    out = fit(plain.model, tiny_data, TrainConfig(**ruin))
    assert out["val"]["auc"] < start_auc - 0.02  # this budget really does damage
    kept = load_checkpoint(tiny_ckpt)
    out = fit(kept.model, tiny_data, TrainConfig(**ruin, keep_best=True))
    assert out["keep_best"]["best_step"] == 0 and out["val"]["auc"] == start_auc
    per_epoch = -(-tiny_data.size("train") // 64)
    assert out["steps"] < 3 * per_epoch  # stopped after `patience` checks without improvement
    for k, v in start.model.state_dict().items():
        assert torch.equal(v, kept.model.state_dict()[k])
