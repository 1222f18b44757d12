"""RecBole's BERT4Rec and GRU4Rec: checkpoints in RecBole's layout rebuilt to score as RecBole's own forward
(written out here from its formulas, on its right-padded layout), trained here, compressed and exported."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recompress.adapters import describe, load_any
from recompress.errors import UserError
from recompress.families import get_family

from .conftest import shared_path
from .test_sequential_models import full_history, seq_data  # noqa: F401 (fixture)
from .test_upstream_formats import RECBOLE_CONFIG, cli, recbole_state, write_recbole

ITEMS, L, D = 151, 12, 16  # RecBole's n_items (padding included), MAX_ITEM_LIST_LENGTH, width


def right_padded(data, lengths):
    """RecBole's item_seq (items from column 0, zeros after) and recompress's window of the same items."""
    left = full_history(data, n=len(lengths)).clone()
    right = torch.zeros_like(left)
    for r, n in enumerate(lengths):
        left[r, : L - n] = 0
        right[r, :n] = left[r, L - n:]
    return right, left, torch.tensor(lengths)


def bert4rec_state(seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    sd = recbole_state(d=D, inner=24, items=ITEMS + 1, length=L, seed=seed)  # the last item row: the mask token
    sd.update({"output_ffn.weight": r(D, D), "output_ffn.bias": r(D), "output_ln.weight": 1 + r(D),
               "output_ln.bias": r(D), "output_bias": r(ITEMS)})
    return sd


def recbole_bert4rec_scores(sd, item_seq, item_seq_len, heads, eps):
    """BERT4Rec.full_sort_predict from RecBole's code, step by step: reconstruct_test_data (the mask token
    n_items written at item_seq_len, then the first column dropped), the encoder with a bidirectional
    additive -10000 mask on padding keys, output_ffn / GELU / output_ln at item_seq_len - 1, then the item
    rows [0, n_items) and output_bias."""
    seq = torch.cat([item_seq, torch.zeros(len(item_seq), 1, dtype=torch.long)], dim=1)
    for b, last in enumerate(item_seq_len):
        seq[b, last] = ITEMS
    seq = seq[:, 1:]
    n = seq.shape[1]
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)
    lin = lambda x, p: x @ sd[p + ".weight"].T + sd[p + ".bias"]
    x = ln(sd["item_embedding.weight"][seq] + sd["position_embedding.weight"][torch.arange(n)], "LayerNorm")
    add = torch.where((seq != 0)[:, None, None, :], 0.0, -10000.0)
    for i in range(2):
        a, f = f"trm_encoder.layer.{i}.multi_head_attention.", f"trm_encoder.layer.{i}.feed_forward."
        split = lambda t: t.view(t.shape[0], n, heads, -1).permute(0, 2, 1, 3)
        q, k, v = (split(lin(x, a + w)) for w in ("query", "key", "value"))
        probs = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5) + add, -1)
        x = ln(lin((probs @ v).permute(0, 2, 1, 3).reshape(x.shape), a + "dense") + x, a + "LayerNorm")
        h = lin(x, f + "dense_1")
        x = ln(lin(h * 0.5 * (1.0 + torch.erf(h / 2 ** 0.5)), f + "dense_2") + x, f + "LayerNorm")
    out = ln(F.gelu(lin(x, "output_ffn")), "output_ln")[torch.arange(len(x)), item_seq_len - 1]
    return out @ sd["item_embedding.weight"][:ITEMS].T + sd["output_bias"]


def gru4rec_state(layers, d=D, hidden=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.4
    sd = {"item_embedding.weight": r(ITEMS, d), "dense.weight": r(d, hidden), "dense.bias": r(d)}
    for k in range(layers):
        sd[f"gru_layers.weight_ih_l{k}"] = r(3 * hidden, d if k == 0 else hidden)
        sd[f"gru_layers.weight_hh_l{k}"] = r(3 * hidden, hidden)
    return sd


def recbole_gru4rec_scores(sd, item_seq, item_seq_len, layers):
    """GRU4Rec.full_sort_predict: the GRU equations (PyTorch's, no biases: r, z, n gates in that order) run
    over RecBole's right-padded item_seq from a zero state, the output at item_seq_len - 1 through dense,
    dotted with every item row."""
    x = sd["item_embedding.weight"][item_seq]
    for k in range(layers):
        w_ih, w_hh = sd[f"gru_layers.weight_ih_l{k}"], sd[f"gru_layers.weight_hh_l{k}"]
        h = torch.zeros(len(x), w_hh.shape[1])
        outs = []
        for t in range(x.shape[1]):
            gi, gh = x[:, t] @ w_ih.T, h @ w_hh.T
            (ir, iz, inn), (hr, hz, hn) = gi.chunk(3, -1), gh.chunk(3, -1)
            reset, update = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            h = (1 - update) * torch.tanh(inn + reset * hn) + update * h
            outs.append(h)
        x = torch.stack(outs, 1)
    out = x[torch.arange(len(x)), item_seq_len - 1] @ sd["dense.weight"].T + sd["dense.bias"]
    return out @ sd["item_embedding.weight"].T


BERT4REC_CONFIG = {**RECBOLE_CONFIG, "model": "BERT4Rec", "mask_ratio": 0.3}
GRU4REC_CONFIG = {"model": "GRU4Rec", "dataset": "syn", "embedding_size": D, "hidden_size": 20, "num_layers": 2,
                  "dropout_prob": 0.3, "MAX_ITEM_LIST_LENGTH": L, "valid_metric": "MRR@10"}


def test_recbole_bert4rec_scores_as_recboles_full_sort_predict(seq_data, tmp_path, monkeypatch):  # noqa: F811
    sd = bert4rec_state()
    path = write_recbole(tmp_path / "BERT4Rec-Dec-07-2026.pth", sd, BERT4REC_CONFIG, monkeypatch)
    found = describe(path)
    assert (found.family, found.hparams["num_items"], found.hparams["mask_ratio"]) == ("bert4rec", ITEMS - 1, 0.3)
    ck = load_any(path)
    right, left, lengths = right_padded(seq_data, [12, 11, 7, 3, 1, 12])
    with torch.no_grad():
        want = recbole_bert4rec_scores(sd, right, lengths, 2, 1e-12)
        got = ck.model(left, torch.arange(ITEMS)[None])
    # item 0 (padding): RecBole scores it with its row and bias; recompress's padding scores 0 (never ranked)
    assert torch.allclose(got[:, 1:], want[:, 1:], atol=1e-4), (got[:, 1:] - want[:, 1:]).abs().max()
    # the oldest item is dropped whatever the length: changing it changes nothing, changing the next does
    other = left.clone()
    other[2, L - 7] = 5
    other2 = left.clone()
    other2[2, L - 6] = 5
    with torch.no_grad():
        assert torch.equal(ck.model(other, torch.arange(ITEMS)[None])[2], got[2])
        assert not torch.allclose(ck.model(other2, torch.arange(ITEMS)[None])[2], got[2])


@pytest.mark.parametrize("layers", [1, 2])
def test_recbole_gru4rec_scores_as_recboles_full_sort_predict(seq_data, tmp_path, monkeypatch, layers):  # noqa: F811
    sd = gru4rec_state(layers)
    path = write_recbole(tmp_path / "GRU4Rec.pth", sd, {**GRU4REC_CONFIG, "num_layers": layers}, monkeypatch)
    found = describe(path)
    assert found.family == "gru4rec" and [t.name for t in found.tables] == ["item"]
    assert (found.hparams["hidden"], found.hparams["layers"], found.sources["max_len"]) == (20, layers, "checkpoint")
    ck = load_any(path)
    right, left, lengths = right_padded(seq_data, [12, 9, 4, 1])
    with torch.no_grad():
        want = recbole_gru4rec_scores(sd, right, lengths, layers)
        got = ck.model(left, torch.arange(ITEMS)[None])
    assert torch.allclose(got[:, 1:], want[:, 1:], atol=1e-4), (got[:, 1:] - want[:, 1:]).abs().max()


def test_recbole_files_that_contradict_themselves_are_refused(tmp_path, monkeypatch):
    sd = bert4rec_state()
    sd["output_bias"] = sd["output_bias"][:-3]
    path = write_recbole(tmp_path / "a.pth", sd, BERT4REC_CONFIG, monkeypatch)
    with pytest.raises(UserError, match="item table has 152 rows and its output bias 148"):
        describe(path)
    sd = gru4rec_state(1)
    path = write_recbole(tmp_path / "b.pth", sd, GRU4REC_CONFIG, monkeypatch)  # the config says 2 layers
    with pytest.raises(UserError, match="its config says num_layers = 2, the tensors' shapes say 1"):
        describe(path)
    path = write_recbole(tmp_path / "c.pth", {**sd, "gru_layers.bias_ih_l0": torch.zeros(60)},
                         {**GRU4REC_CONFIG, "num_layers": 1}, monkeypatch)
    with pytest.raises(UserError, match="its GRU has biases"):
        describe(path)
    path = write_recbole(tmp_path / "d.pth", {"item_embedding.weight": torch.zeros(5, 2)},
                         {**RECBOLE_CONFIG, "model": "Caser"}, monkeypatch)
    with pytest.raises(UserError, match="is a RecBole Caser checkpoint; recompress rebuilds RecBole's SASRec, "
                                        "BERT4Rec, GRU4Rec"):
        describe(path)


@pytest.mark.parametrize("model", ["bert4rec", "gru4rec"])
def test_recbole_models_evaluate_compress_and_export(seq_data, tmp_path, monkeypatch, model):  # noqa: F811
    sd, cfg = (bert4rec_state(), BERT4REC_CONFIG) if model == "bert4rec" else (gru4rec_state(2), GRU4REC_CONFIG)
    path = write_recbole(tmp_path / "m.pth", sd, cfg, monkeypatch)
    data = seq_data.path
    res = cli("evaluate", path, "--data", data, "--no-latency", "--json", tmp_path / "base.json")
    assert res.exit_code == 0, res.output
    res = cli("checkpoint", path, "--method", "int8", "-o", tmp_path / "q")
    assert res.exit_code == 0, res.output
    res = cli("export", tmp_path / "q", "--data", data, "-o", tmp_path / "x")
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_diff"] < 1e-4, manifest["parity"]
    res = cli("evaluate", tmp_path / "x", "--data", data, "--no-latency", "--compare", tmp_path / "base.json",
              "--json", tmp_path / "x.json")
    assert res.exit_code == 0, res.output
    base = json.loads((tmp_path / "base.json").read_text())["accuracy"]["torch"]["ndcg@10"]
    onnx = json.loads((tmp_path / "x.json").read_text())["accuracy"]
    assert abs(next(iter(onnx.values()))["ndcg@10"] - base) < 0.02


@pytest.mark.parametrize("model", ["bert4rec", "gru4rec"])
def test_training_learns_the_planted_structure(seq_data, tmp_path, model):  # noqa: F811
    """A few epochs on the synthetic cycles beat the untrained model by a wide margin (val NDCG@10)."""
    res = cli("train", "--data", seq_data.path, "--model", model, "--dim", 16, "--max-len", 12, "--epochs", 8,
              "--lr", 0.01, "-o", tmp_path / "m")
    assert res.exit_code == 0, res.output
    res = cli("train", "--data", seq_data.path, "--model", model, "--dim", 16, "--max-len", 12, "--steps", 0,
              "-o", tmp_path / "z")
    scores = []
    for m in ("m", "z"):
        assert cli("evaluate", tmp_path / m, "--data", seq_data.path, "--split", "val", "--no-latency",
                   "--json", tmp_path / f"{m}.json").exit_code == 0
        scores.append(json.loads((tmp_path / f"{m}.json").read_text())["accuracy"]["torch"]["ndcg@10"])
    assert scores[0] > 3 * scores[1] + 0.03, scores


def test_bert4rec_cloze_batches(seq_data):  # noqa: F811
    """Masked positions hold the mask token and target the item they hid; the last is always masked; about
    mask_ratio of the others are; the windows are cut as serving cuts a history."""
    fam = get_family("bert4rec")
    model = fam.from_spec(fam.new_spec(seq_data, {"dim": 16, "max_len": 12, "mask_ratio": 0.25}))
    mask_id = seq_data.num_items + 1
    ends = seq_data.history_end("train")
    seen = []
    for batch in fam.batches(model, seq_data, 200, seed=3):
        h, t = batch["history"].numpy(), batch["targets"].numpy()
        masked = h == mask_id
        assert ((t > 0) == masked).all() and (masked[:, -1] | (h == 0).all(1)).all()  # empty: a one-item user
        restored = np.where(masked, t, h)
        seen.append(restored)
        assert (restored[:, :-1][masked[:, :-1]] > 0).all()
        share = masked[:, :-1].sum() / (restored[:, :-1] > 0).sum()
        assert 0.18 < share < 0.32, share
    # each user's training items as serving would read them before asking for the last one: the last 12 of a
    # longer sequence; a shorter one without its oldest item (RecBole's reconstruct_test_data), left-padded
    want = set()
    for u in range(seq_data.num_users):
        seq = list(np.asarray(seq_data.items[seq_data.offsets[u]:ends[u]]))
        kept = seq[-12:] if len(seq) > 12 else seq[1:]
        want.add(tuple([0] * (12 - len(kept)) + kept))
    assert {tuple(w) for w in np.concatenate(seen)} == want


@pytest.mark.parametrize("model", ["bert4rec", "gru4rec"])
def test_reduced_precision_onnx_and_tensorrt_engines(seq_data, tmp_path, model):  # noqa: F811
    """fp16 graphs load and match the checkpoint (BERT4Rec's head first wrote a LayerNormalization of a float16
    input with float32 weights, which ONNX Runtime refused to load); TensorRT engines build where it installs."""
    from recompress.checkpoint import Checkpoint, save_checkpoint
    fam = get_family(model)
    spec = fam.new_spec(seq_data, {"dim": 32, "max_len": 12})
    m = fam.from_spec(spec)
    fam.init(m, 0)
    path = save_checkpoint(Checkpoint(m.eval(), spec), tmp_path / "ck")
    res = cli("export", path, "--data", seq_data.path, "--precision", "fp16", "-o", tmp_path / "h")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "h" / "manifest.json").read_text())["parity"]["passed"]
    if not any(importlib.util.find_spec(n) for n in ("tensorrt", "tensorrt_rtx")):
        pytest.skip("TensorRT is not installed (pip install -e '.[trt]')")
    res = cli("export", path, "--data", seq_data.path, "--target", "trt", "-o", tmp_path / "e", "--samples", "64")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "e" / "model.engine").stat().st_size > 0


def test_bert4rec_training_scores_the_last_position_as_serving_does(seq_data):  # noqa: F811
    """With no other position masked, a training window's last logits (target and negatives) are the scores
    forward() gives them after the same history: head, bias and the window cut agree, for every user."""
    fam = get_family("bert4rec")
    model = fam.from_spec(fam.new_spec(seq_data, {"dim": 16, "max_len": 12, "mask_ratio": 0.0, "negatives": 5}))
    fam.init(model, 0)
    with torch.no_grad():
        model.output_bias.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))  # make the bias count
    model.eval()
    (batch,) = fam.batches(model, seq_data, seq_data.num_users, seed=0)
    with torch.no_grad():
        pos, neg = model.train_logits(batch["history"], batch["targets"], batch["negatives"])
    row_of = {tuple(np.where(h == seq_data.num_items + 1, t, h)): i
              for i, (h, t) in enumerate(zip(batch["history"].numpy(), batch["targets"].numpy()))}
    ends = seq_data.history_end("train")
    rows, users = [], []
    for u in range(seq_data.num_users):  # the training window of user u, cut as in test_bert4rec_cloze_batches
        seq = list(np.asarray(seq_data.items[seq_data.offsets[u]:ends[u]]))
        kept = seq[-12:] if len(seq) > 12 else seq[1:]
        if kept:
            rows.append(row_of[tuple([0] * (12 - len(kept)) + kept)])
            users.append(u)
    users = np.array(users)
    history = torch.from_numpy(seq_data.windows(users, ends[users] - 1, 12))  # everything before the target
    target = torch.from_numpy(np.asarray(seq_data.items)[ends[users] - 1].astype(np.int64))
    with torch.no_grad():
        assert torch.allclose(pos[rows, -1], model(history, target[:, None])[:, 0], atol=1e-5)
        assert torch.allclose(neg[rows, -1], model(history, batch["negatives"][None]), atol=1e-5)


def test_bert4rec_mask_token_counts_above_every_item(seq_data):  # noqa: F811
    fam = get_family("bert4rec")
    counts = fam.table_counts(fam.new_spec(seq_data, {"dim": 8, "max_len": 12}), seq_data)["item"]
    assert len(counts) == seq_data.num_items + 2 and counts[-1] > counts[:-1].max()


def test_impossible_widths_and_epsilons_are_refused_by_name(seq_data, tmp_path):  # noqa: F811
    for model, flag, value, rule in [("bert4rec", "--ffn-dim", 0, ">= 1"), ("sasrec", "--ffn-dim", -3, ">= 1"),
                                     ("bert4rec", "--ln-eps", 0.0, "> 0"), ("gru4rec", "--hidden", 0, ">= 1")]:
        res = cli("train", "--data", seq_data.path, "--model", model, flag, value, "-o", tmp_path / "m")
        assert res.exit_code == 2 and f"{flag} {value} is impossible for {model}" in res.output, res.output
        assert f"{flag} must be {rule}" in res.output and "Traceback" not in res.output


def test_bert4rec_files_of_recbole_before_1_2_are_refused_by_name(tmp_path, monkeypatch):
    """RecBole < 1.2's BERT4Rec (no output head, L + 1 positions) scores differently: named, not 'damaged'."""
    sd = recbole_state(d=D, inner=24, items=ITEMS + 1, length=L + 1)
    path = write_recbole(tmp_path / "old.pth", sd, BERT4REC_CONFIG, monkeypatch)
    with pytest.raises(UserError, match="a BERT4Rec written by RecBole before 1.2"):
        describe(path)
