"""Checkpoints in upstream layouts, written here the way the upstream code writes them: recognized, rebuilt
to score as the upstream forward does, compressed, exported with parity, and refused clearly when they
contradict themselves."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from recompress.adapters import describe, load_any
from recompress.cli import main
from recompress.errors import UserError

from .conftest import shared_path
from .test_sequential_models import fresh, full_history, pmixer_log2feats, seq_data  # noqa: F401 (fixture)

PMIXER_NAME = "SASRec.epoch=20.lr=0.001.layer=2.head=2.hidden=16.maxlen=12.pth"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def pmixer_state(model) -> dict[str, torch.Tensor]:
    """Our SASRec's weights under SASRec.pytorch's keys (its feed-forward layers are Conv1d, k = 1)."""
    out = {}
    for k, v in model.state_dict().items():
        k = {"tables.item.weight": "item_emb.weight", "tables.position.weight": "pos_emb.weight"}.get(k, k)
        out[k] = v.unsqueeze(-1) if ".conv" in k and k.endswith("weight") else v.clone()
    out["item_emb.weight"][0] = 0  # its padding_idx rows
    out["pos_emb.weight"][0] = 0
    return out


def write_pmixer(folder: Path, model, args: dict[str, str] | None, name: str = PMIXER_NAME) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    torch.save(pmixer_state(model), path)
    if args is not None:  # main.py's args.txt: sorted key,value lines
        (folder / "args.txt").write_text("\n".join(f"{k},{v}" for k, v in sorted(args.items())))
    return path


@pytest.mark.parametrize("wiring,args", [("post-ln", {"norm_first": "False"}), ("pre-ln", {"norm_first": "True"}),
                                         ("pmixer-2020", {})])
def test_sasrec_pytorch_checkpoints_score_as_its_forward(seq_data, tmp_path, wiring, args):  # noqa: F811
    _, m = fresh("sasrec", seq_data, wiring=wiring)
    args = {"dataset": "syn", "hidden_units": "16", "maxlen": "12", "num_blocks": "2", "num_heads": "2",
            "dropout_rate": "0.5", **args}
    path = write_pmixer(tmp_path, m, args)
    found = describe(path)
    assert found.format == "sasrec.pytorch" and not found.missing
    assert found.hparams["wiring"] == wiring and found.sources["wiring"] == "sidecar: args.txt"
    assert (found.sources["heads"], found.sources["dim"], found.hparams["dropout"]) == ("file name", "shapes", 0.5)
    ck = load_any(path)
    seq = full_history(seq_data).clone()
    seq[0, :5], seq[1, :10] = 0, 0
    cand = torch.arange(151)[None]
    ref_model = fresh("sasrec", seq_data, wiring=wiring)[1]
    ref_model.load_state_dict(ck.model.state_dict())
    with torch.no_grad():
        h = pmixer_log2feats(ref_model, seq, wiring)[:, -1]
        want = h @ torch.cat([torch.zeros(1, 16), ck.model.tables["item"].weight[1:]]).T
        assert torch.allclose(ck.model(seq, cand), want, atol=1e-5)


def test_sasrec_pytorch_without_args_txt_asks_for_the_wiring_and_takes_it(seq_data, tmp_path):  # noqa: F811
    _, m = fresh("sasrec", seq_data, wiring="pmixer-2020")
    path = write_pmixer(tmp_path, m, None)
    with pytest.raises(UserError, match="does not say wiring") as e:
        load_any(path)
    assert "--hp wiring=post-ln|pre-ln|pmixer-2020" in e.value.hint
    ck = load_any(path, {"wiring": "pmixer-2020"})
    assert ck.spec.provenance["hparam_source"]["wiring"] == "user" and ck.spec.hparams["heads"] == 2
    renamed = write_pmixer(tmp_path / "r", m, None, name="model.pth")  # no file name hints either
    assert set(describe(renamed).missing) == {"heads", "wiring"}
    assert load_any(renamed, {"heads": "2", "wiring": "pmixer-2020"}).spec.hparams["heads"] == 2
    with pytest.raises(UserError, match="heads = 3 does not divide the width 16"):
        load_any(renamed, {"heads": "3", "wiring": "pmixer-2020"})


def test_sasrec_pytorch_contradictions_are_refused(seq_data, tmp_path):  # noqa: F811
    _, m = fresh("sasrec", seq_data)
    lying = write_pmixer(tmp_path / "a", m, None, name=PMIXER_NAME.replace("hidden=16", "hidden=32"))
    with pytest.raises(UserError, match="the file name says dim = 32, the tensors' shapes say 16"):
        describe(lying)
    state = pmixer_state(m)
    state["pos_emb.weight"] = state["pos_emb.weight"][:12]  # before 2024-06-25: maxlen rows, no padding row
    (tmp_path / "b").mkdir()
    torch.save(state, tmp_path / "b" / PMIXER_NAME)
    with pytest.raises(UserError, match="before commit 33bc1d8"):
        describe(tmp_path / "b" / PMIXER_NAME)


def test_sasrec_pytorch_evaluates_compresses_and_exports(seq_data, tmp_path):  # noqa: F811
    _, m = fresh("sasrec", seq_data)
    path = write_pmixer(tmp_path / "run", m, {"norm_first": "False", "num_heads": "2"})
    res = cli("evaluate", path, "--data", seq_data.path, "--no-latency", "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    base = json.loads((tmp_path / "r.json").read_text())["accuracy"]["torch"]["ndcg@10"]
    res = cli("checkpoint", path, "--method", "int8", "-o", tmp_path / "q")
    assert res.exit_code == 0, res.output
    res = cli("evaluate", tmp_path / "q", "--data", seq_data.path, "--no-latency", "--json", tmp_path / "q.json")
    q = json.loads((tmp_path / "q.json").read_text())["accuracy"]["torch"]["ndcg@10"]
    assert abs(q - base) < 0.01
    res = cli("export", tmp_path / "q", "--data", seq_data.path, "-o", tmp_path / "x")
    assert res.exit_code == 0 and "parity max |diff|" in res.output, res.output
    spec = json.loads((tmp_path / "q" / "spec.json").read_text())
    assert spec["provenance"]["source_format"] == "sasrec.pytorch" and spec["hparams"]["attend_padding"] is True


def test_a_model_is_not_scored_on_a_dataset_with_other_items(seq_data, tmp_path):  # noqa: F811
    from recompress.data.synthetic_sequences import make_synthetic_sequences
    _, m = fresh("sasrec", seq_data)
    path = write_pmixer(tmp_path / "run", m, {"norm_first": "False"})
    other = make_synthetic_sequences(tmp_path / "other", users=100, items=149, clusters=4, mean_len=8, seed=0)
    res = cli("evaluate", path, "--data", other, "--no-latency")
    assert res.exit_code == 2 and "item table has 151 rows (150 items and padding) but the dataset has" \
        in res.output and "Traceback" not in res.output


@pytest.mark.shared_data
def test_the_real_sasrec_pytorch_checkpoint():
    path = shared_path("fixtures/checkpoints/SASRec.epoch=1000.lr=0.001.layer=2.head=1.hidden=50.maxlen=200.pth")
    found = describe(path)
    assert (found.hparams["num_items"], found.hparams["dim"], found.hparams["max_len"], found.hparams["heads"]) == \
        (3416, 50, 200, 1)
    assert list(found.missing) == ["wiring"]  # no args.txt was committed with it
    ck = load_any(path, {"wiring": "pmixer-2020"})  # written by the 2020-2025 code (fixtures README)
    sd = torch.load(path, weights_only=True, map_location="cpu")  # saved from CUDA tensors
    assert torch.equal(ck.model.tables["item"].weight, sd["item_emb.weight"])
    assert torch.equal(ck.model.forward_layers[1].conv2.weight, sd["forward_layers.1.conv2.weight"][..., 0])


def recbole_forward(sd, item_seq, heads, eps):
    """RecBole's SASRec.forward from its formulas: right-padded ``item_seq``, positions 0..L-1, input layer
    norm, post-LN layers with separate query/key/value, an additive -10000 mask, GELU; the state at
    item_seq_len - 1."""
    n = item_seq.shape[1]
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)
    lin = lambda x, p: x @ sd[p + ".weight"].T + sd[p + ".bias"]
    x = ln(sd["item_embedding.weight"][item_seq] + sd["position_embedding.weight"][torch.arange(n)], "LayerNorm")
    mask = torch.tril((item_seq != 0)[:, None, None, :].expand(-1, -1, n, -1))
    add = torch.where(mask, 0.0, -10000.0)
    i = 0
    while f"trm_encoder.layer.{i}.multi_head_attention.query.weight" in sd:
        a, f = f"trm_encoder.layer.{i}.multi_head_attention.", f"trm_encoder.layer.{i}.feed_forward."
        split = lambda t: t.view(t.shape[0], n, heads, -1).permute(0, 2, 1, 3)
        q, k, v = (split(lin(x, a + w)) for w in ("query", "key", "value"))
        probs = torch.softmax(q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5) + add, -1)
        ctx = (probs @ v).permute(0, 2, 1, 3).reshape(x.shape)
        x = ln(lin(ctx, a + "dense") + x, a + "LayerNorm")
        h = lin(x, f + "dense_1")
        x = ln(lin(h * 0.5 * (1.0 + torch.erf(h / 2 ** 0.5)), f + "dense_2") + x, f + "LayerNorm")
        i += 1
    lengths = (item_seq != 0).sum(1)
    return x[torch.arange(len(x)), lengths - 1]


def write_recbole(path: Path, sd: dict[str, torch.Tensor], config: dict, monkeypatch) -> Path:
    """A RecBole _save_checkpoint dict with its Config object (recbole itself is not installed)."""
    mods = {n: types.ModuleType(n) for n in ("recbole", "recbole.config", "recbole.config.configurator")}

    class Config:
        def __init__(self):
            self.final_config_dict = dict(config)
    Config.__module__, Config.__qualname__ = "recbole.config.configurator", "Config"
    mods["recbole.config.configurator"].Config = Config
    with monkeypatch.context() as m:
        for n, mod in mods.items():
            m.setitem(sys.modules, n, mod)
        torch.save({"config": Config(), "epoch": 3, "cur_step": 12, "best_valid_score": np.float64(0.1234),
                    "state_dict": sd, "other_parameter": {}, "optimizer": {}}, path, pickle_protocol=4)
    return path


def recbole_state(d=16, inner=24, items=151, length=12, blocks=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    sd = {"item_embedding.weight": r(items, d), "position_embedding.weight": r(length, d),
          "LayerNorm.weight": 1 + r(d), "LayerNorm.bias": r(d)}
    for i in range(blocks):
        a, f = f"trm_encoder.layer.{i}.multi_head_attention.", f"trm_encoder.layer.{i}.feed_forward."
        for w in ("query", "key", "value", "dense"):
            sd[a + w + ".weight"], sd[a + w + ".bias"] = r(d, d), r(d)
        sd[f + "dense_1.weight"], sd[f + "dense_1.bias"] = r(inner, d), r(inner)
        sd[f + "dense_2.weight"], sd[f + "dense_2.bias"] = r(d, inner), r(d)
        for p in (a, f):
            sd[p + "LayerNorm.weight"], sd[p + "LayerNorm.bias"] = 1 + r(d), r(d)
    return sd


RECBOLE_CONFIG = {"model": "SASRec", "dataset": "syn", "n_layers": 2, "n_heads": 2, "hidden_size": 16, "inner_size": 24,
                  "MAX_ITEM_LIST_LENGTH": 12, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.5,
                  "valid_metric": "MRR@10"}


def test_recbole_sasrec_scores_as_recboles_forward(seq_data, tmp_path, monkeypatch):  # noqa: F811
    sd = recbole_state()
    path = write_recbole(tmp_path / "SASRec-Dec-06-2026_10-00-00.pth", sd, RECBOLE_CONFIG, monkeypatch)
    found = describe(path)
    assert found.format == "recbole" and found.sources["heads"] == "checkpoint" and found.hparams["ffn_dim"] == 24
    ck = load_any(path)
    right = full_history(seq_data).clone()  # RecBole's right-padded sequences of several lengths
    lengths = [12, 7, 3, 1, 12, 9]
    for r, n in enumerate(lengths):
        right[r, n:] = 0
    left = torch.zeros_like(right)  # the same items, left-padded as recompress feeds them
    for r, n in enumerate(lengths):
        left[r, 12 - n:] = right[r, :n]
    with torch.no_grad():
        want = recbole_forward(sd, right, 2, 1e-12) @ sd["item_embedding.weight"][1:].T
        got = ck.model(left, torch.arange(1, 151)[None])
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert ck.spec.provenance["upstream_metrics"] == {"best valid MRR@10": pytest.approx(0.1234)}


def test_recbole_layer_norm_epsilon_must_be_positive(tmp_path, monkeypatch):
    """Review: --hp ln_eps=-1 was accepted (layer norm of a negative epsilon: NaN for constant rows)."""
    path = write_recbole(tmp_path / "a.pth", recbole_state(), RECBOLE_CONFIG, monkeypatch)
    with pytest.raises(UserError, match=r"ln_eps -1.0 is not a positive layer norm epsilon"):
        load_any(path, {"ln_eps": "-1"})
    bad = write_recbole(tmp_path / "b.pth", recbole_state(), {**RECBOLE_CONFIG, "layer_norm_eps": 0.0}, monkeypatch)
    with pytest.raises(UserError, match=r"ln_eps 0.0 is not a positive layer norm epsilon"):
        load_any(bad)


def test_recbole_contradictions_are_refused(tmp_path, monkeypatch):
    sd = recbole_state()
    path = write_recbole(tmp_path / "a.pth", sd, {**RECBOLE_CONFIG, "inner_size": 32}, monkeypatch)
    with pytest.raises(UserError, match="its config says inner_size = 32, the tensors' shapes say 24"):
        describe(path)


def test_recbole_layout_numbers_items_in_file_order_and_sorts_by_float32_time(tmp_path):
    from recompress.data import open_dataset
    from recompress.data.sequences import prepare_sequences
    # user 9's two last items share a float32 timestamp (1e9 + 1 and + 2 round together): file order decides
    rows = [("9", "c", 1_000_000_002), ("4", "a", 0), ("9", "b", 1_000_000_001), ("4", "b", 5), ("9", "a", 10),
            ("4", "d", 7), ("7", "x", 3), ("7", "x", 1_500_000_000), ("9", "z", 1_000_000_000_0), ("4", "e", 9)]
    text = "user_id:token\titem_id:token\ttimestamp:float\n" + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in rows)
    (tmp_path / "x.inter").write_text(text)
    d = open_dataset(prepare_sequences(tmp_path / "x.inter", tmp_path / "d", layout="recbole"))
    ids = {it: k for k, it in enumerate(["", "c", "a", "b", "d", "x", "z", "e"])}  # first appearance in the file
    assert d.num_items == 7 and d.meta["full_ranking_excludes"] == "padding"
    seqs = [np.asarray(d.items[d.offsets[u]:d.offsets[u + 1]]).tolist() for u in range(d.num_users)]
    assert seqs == [[ids[i] for i in "acbz"], [ids[i] for i in "abde"]]  # user 7 (2 items) dropped; its x keeps a row
    assert np.float32(1_000_000_002 / 1e10) == np.float32(1_000_000_001 / 1e10)  # the tie the rule resolves


@pytest.mark.shared_data
def test_the_real_recbole_checkpoint_reproduces_its_validation_score(tmp_path):
    """RecBole stored best_valid_score 0.0185 (valid MRR@10, full ranking, ml-100k): rebuilt here on the
    same data, the same number; int8 rows keep it within 0.003."""
    from recompress.data.sequences import prepare_sequences
    ckpt = shared_path("fixtures/checkpoints/recbole_SASRec.pth")
    data = prepare_sequences(shared_path("data/movielens_100k_recbole/ml-100k.inter.gz"), tmp_path / "ml100k",
                             layout="recbole")
    res = cli("evaluate", ckpt, "--data", data, "--split", "val", "--no-latency", "--json", tmp_path / "v.json")
    assert res.exit_code == 0, res.output
    v = json.loads((tmp_path / "v.json").read_text())["accuracy"]["torch"]
    assert round(v["mrr@10"], 4) == 0.0185 and v["rows"] == 943
    assert (round(v["ndcg@10"], 4), round(v["hr@10"], 4)) == (0.0289, 0.0636)
    assert cli("checkpoint", ckpt, "--method", "int8", "-o", tmp_path / "q").exit_code == 0
    res = cli("evaluate", tmp_path / "q", "--data", data, "--split", "val", "--no-latency", "--json", tmp_path / "q.json")
    assert abs(json.loads((tmp_path / "q.json").read_text())["accuracy"]["torch"]["mrr@10"] - v["mrr@10"]) < 0.003


def test_a_dlrm_checkpoint_is_scored_on_dlrms_own_test_rows(tmp_path):
    """A --save-model file over tables of dlrm's vocabulary sizes, evaluated on data in dlrm's layout: the
    AUC of dlrm's forward on its test rows (first half of day 6), counted pair by pair."""
    from recompress.data import open_dataset
    from recompress.data.criteo_dlrm import prepare_criteo_dlrm

    from .test_checkpoints import dlrm_state, reference_dlrm
    from .test_data import criteo_line
    rng = np.random.default_rng(1)
    lines = [criteo_line(rng) for _ in range(1400)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    data = open_dataset(prepare_criteo_dlrm(tmp_path / "train.txt", tmp_path / "d"))
    sd = dlrm_state(rows=tuple(data.table_rows), m=4, seed=3)
    torch.save({"state_dict": sd, "test_auc": np.float64(0.5)}, tmp_path / "dlrm.pt")
    res = cli("evaluate", tmp_path / "dlrm.pt", "--data", data.path, "--no-latency", "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    dense, sparse, label = (torch.from_numpy(np.asarray(a)) for a in data.arrays("test"))
    p = reference_dlrm(sd, dense.float(), sparse.long()).numpy()
    pos, neg = p[label.numpy() == 1], p[label.numpy() == 0]
    auc = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["data"]["rows"] == 100 and got["accuracy"]["torch"]["auc"] == pytest.approx(auc, abs=1e-9)
    short = sd | {"emb_l.0.weight": sd["emb_l.0.weight"][:-1]}  # one row short of the vocabulary
    torch.save({"state_dict": short}, tmp_path / "short.pt")
    res = cli("evaluate", tmp_path / "short.pt", "--data", data.path, "--no-latency")
    assert res.exit_code == 2 and f"table emb_0 has {data.table_rows[0] - 1} rows but the dataset's sparse feature 1 " \
        f"has a vocabulary of {data.table_rows[0]}" in res.output


def test_export_back_to_dlrms_layout_keeps_qr_and_mixed_dimension_tables(tmp_path):
    """--target dlrm: QR rows as weight_q/weight_r, a low-rank table as dlrm's embs/proj, int8 rows as the dense
    table they compute; the file reads back (and scores) as the checkpoint, and dlrm's counters are there."""
    from .test_checkpoints import dlrm_state, reference_dlrm
    sd = dlrm_state(rows=(30, 40, 12), m=4, seed=7)
    torch.save({"state_dict": sd}, tmp_path / "dlrm.pt")
    steps = "qr@emb_1,lowrank@emb_0,int8@emb_2"
    res = cli("checkpoint", tmp_path / "dlrm.pt", "--method", steps, "--collisions", 3, "--op", "add", "--rank", 2,
              "-o", tmp_path / "c")
    assert res.exit_code == 0, res.output
    res = cli("export", tmp_path / "c", "--target", "dlrm", "-o", tmp_path / "x")
    assert res.exit_code == 0 and "parity max |diff| 0.00e+00" in res.output, res.output
    out = torch.load(tmp_path / "x" / "model.pt", weights_only=True)
    keys = {k: tuple(v.shape) for k, v in out["state_dict"].items() if k.startswith("emb_l")}
    assert keys == {"emb_l.0.embs.weight": (30, 2), "emb_l.0.proj.weight": (4, 2), "emb_l.1.weight_q": (14, 4),
                    "emb_l.1.weight_r": (3, 4), "emb_l.2.weight": (12, 4)}
    assert {"iter", "epoch", "nepochs", "nbatches", "nbatches_test", "train_loss", "total_loss", "test_acc"} <= set(out)
    from recompress.checkpoint import load_checkpoint
    c = load_checkpoint(tmp_path / "c")
    dense, ids = torch.rand(9, 13), torch.stack([torch.randint(0, r, (9,)) for r in (30, 40, 12)], 1)
    with torch.no_grad():  # dlrm's forward on the written tensors = the compressed checkpoint
        assert torch.allclose(reference_dlrm(out["state_dict"], dense, ids, qr_op="add"), c.model(dense, ids.unsqueeze(-1)),
                              atol=1e-5)
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["hp"] == {"qr_operation": "add"} and manifest["tables_stored"]["emb_2"] == "dense (computed from dense+int8)"


def test_export_to_dlrm_refuses_other_families(seq_data, tmp_path):  # noqa: F811
    _, m = fresh("sasrec", seq_data)
    path = write_pmixer(tmp_path / "run", m, {"norm_first": "False"})
    res = cli("export", path, "--target", "dlrm", "-o", tmp_path / "x")
    assert res.exit_code == 2 and "--target dlrm writes facebookresearch/dlrm files; this is a sasrec model" in res.output
    assert not (tmp_path / "x").exists()


def write_research_hstu(tmp_path, L=12, gr=3, d=16, heads=2, items=40, blocks=2, seed=0):
    """train.py's layout: ckpts/{dataset}-l{L}/HSTU-b..-h..-dqk..-dv.._ep{N}, keys under DDP's module.; weights
    N(0, 0.3) so that every term shows."""
    g = torch.Generator().manual_seed(seed)
    n = L + gr + 1
    folder = tmp_path / "ckpts" / f"ml-1m-l{L}"
    folder.mkdir(parents=True)
    dh = d // heads
    path = folder / (f"HSTU-b{blocks}-h{heads}-dqk{dh}-dv{dh}-lsilud0.2-ad0.0_DotProduct_local-l2-eps1e-06_ssl-t0.05-"
                     "n128-b128-lr0.001-wu0-wd0-2026-12-06_ep3")
    rnd = lambda *shape: 0.3 * torch.randn(*shape, generator=g)
    sd = {"_embedding_module._item_emb.weight": rnd(items + 1, d), "_input_features_preproc._pos_emb.weight": rnd(n, d),
          "_attn_mask": torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)}
    for i in range(blocks):
        p = f"_hstu._attention_layers.{i}."
        sd[p + "_uvqk"], sd[p + "_o.weight"], sd[p + "_o.bias"] = rnd(d, 4 * d), rnd(d, d), rnd(d)
        sd[p + "_rel_attn_bias._ts_w"], sd[p + "_rel_attn_bias._pos_w"] = rnd(129), rnd(2 * n - 1)
    torch.save({"epoch": 3, "model_state_dict": {"module." + k: v for k, v in sd.items()}, "optimizer_state_dict": {}}, path)
    return path, sd, n


def research_hstu_reference(sd, n, heads, ids, lengths, times):
    """generative-recommenders' research HSTU forward written out from its rules (hstu.py at 2e81fab), on its
    own right-padded layout: ids [B, N] oldest first, times [B, N] with the target's time at index length.
    Positions 0..N-1 from the first item; per block LN -> SiLU(x W) -> u, v, q, k; attention
    SiLU(q k + pos_w[N - 1 + j - i] + ts_w[bucket(t_{i+1} - t_j)]) / N, causal; bucket = float32
    log(max(|gap|, 1)) / 0.301 truncated, clipped to 128; x + o(u * LN(y)); the last real position,
    L2-normalized. Returns (user embedding [B, d], scores against every item [B, items])."""
    item, pos = sd["_embedding_module._item_emb.weight"], sd["_input_features_preproc._pos_emb.weight"]
    d = item.shape[1]
    x = item[ids] * d ** 0.5 + pos[None]
    x = x * (ids != 0).unsqueeze(-1)
    ext = torch.cat([times, times[:, -1:]], 1)
    bucket = (torch.log((ext[:, 1:, None] - ext[:, None, :-1]).abs().clamp(min=1).float()) / 0.301).long().clamp(0, 128)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    causal = (j <= i).float()
    for b in range(sum(1 for k in sd if k.endswith("._uvqk"))):
        p = f"_hstu._attention_layers.{b}."
        u, v, q, k = torch.split(F.silu(F.layer_norm(x, [d], eps=1e-6) @ sd[p + "_uvqk"]), d, dim=-1)
        v = v * (ids != 0).unsqueeze(-1)  # jagged: padded keys hold nothing
        rab = sd[p + "_rel_attn_bias._pos_w"][n - 1 + j - i] + sd[p + "_rel_attn_bias._ts_w"][bucket]
        dh = d // heads
        y = torch.cat([(F.silu(q[..., h * dh:(h + 1) * dh] @ k[..., h * dh:(h + 1) * dh].transpose(1, 2) + rab) / n
                        * causal) @ v[..., h * dh:(h + 1) * dh] for h in range(heads)], -1)
        x = x + F.linear(u * F.layer_norm(y, [d], eps=1e-6), sd[p + "_o.weight"], sd[p + "_o.bias"])
    user = x[torch.arange(len(ids)), lengths - 1]
    user = user / user.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    rows = item[1:] / item[1:].norm(dim=-1, keepdim=True).clamp(min=1e-6)
    return user, user @ rows.T


def test_research_hstu_checkpoints_rebuild_to_upstream_outputs(tmp_path):
    L, heads = 12, 2
    path, sd, n = write_research_hstu(tmp_path, L=L, heads=heads)
    found = describe(path)
    assert found.format == "hstu-research" and found.family == "hstu"
    assert (found.hparams["max_len"], found.hparams["heads"], found.hparams["attn_norm"], found.hparams["num_items"]) == \
        (L, heads, n, 40)
    assert found.sources["max_len"] == "file name" and found.sources["attn_norm"] == "shapes"
    model = load_any(path).model.eval()
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([1, 2, 5, 12, 12, 7])
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    times = torch.zeros(len(lengths), n, dtype=torch.long)
    hist, window_times = torch.zeros(len(lengths), L, dtype=torch.long), torch.zeros(len(lengths), L + 1, dtype=torch.long)
    for r, m in enumerate(lengths.tolist()):
        ids[r, :m] = torch.randint(1, 41, (m,), generator=g)
        gaps = torch.randint(0, 10**6, (m + 1,), generator=g)
        gaps[m // 2] = 417901  # a gap the float32 log puts in another bucket than exact arithmetic
        times[r, :m + 1] = 10**9 + torch.cumsum(gaps, 0)
        hist[r, L - m:] = ids[r, :m]
        window_times[r, L - m:] = times[r, :m + 1]
    want_user, want_scores = research_hstu_reference(sd, n, heads, ids, lengths, times)
    with torch.no_grad():
        got_user = model.encode(hist, window_times)[:, -1]
        got_scores = model(hist, torch.arange(1, 41)[None], window_times)
    assert float((got_user - want_user).abs().max()) < 1e-5 and float((got_scores - want_scores).abs().max()) < 1e-5
    for tag, reason in (("-ad0.0_", "trained with -norab"), ("-dqk8-dv8-", "dqk = 4, dv = 8 with 2 heads")):
        other = path.with_name(path.name.replace(tag, {"-ad0.0_": "-ad0.0-norab_", "-dqk8-dv8-": "-dqk4-dv8-"}[tag]))
        other.write_bytes(path.read_bytes())
        info = describe(other)  # inspect still describes what it cannot rebuild (review)
        assert info.hparams["heads"] == heads and any(reason in n for n in info.notes)
        with pytest.raises(UserError, match=f"is a research HSTU recompress does not rebuild: {reason}"):
            load_any(other)
        other.unlink()
    res = cli("export", path, "-o", tmp_path / "x")  # ONNX with max_len + 1 timestamps, checked for parity
    assert res.exit_code == 0 and "parity" in res.output, res.output
    res = cli("checkpoint", path, "--method", "int8", "-o", tmp_path / "q")
    assert res.exit_code == 0, res.output
    from recompress.checkpoint import load_checkpoint
    with torch.no_grad():
        q_scores = load_checkpoint(tmp_path / "q").model(hist, torch.arange(1, 41)[None], window_times)
    assert 0 < float((q_scores - want_scores).abs().max()) < 0.02


def test_a_run_folder_with_one_checkpoint_file_reads_as_that_file(seq_data, tmp_path):  # noqa: F811
    _, m = fresh("sasrec", seq_data)
    write_pmixer(tmp_path / "Video_default", m, {"norm_first": "False"})  # its file name carries the heads
    found = describe(tmp_path / "Video_default")
    assert found.format == "sasrec.pytorch" and found.sources["heads"] == "file name"


def test_review_findings_on_hyper_parameters_are_one_line_errors(seq_data, tmp_path):  # noqa: F811
    """Found by an independent review: these were tracebacks, or blamed the file for the user's flag."""
    _, m = fresh("sasrec", seq_data)
    path = write_pmixer(tmp_path / "a", m, {"norm_first": "False", "dropout_rate": "0.2"})
    with pytest.raises(UserError, match=r"--hp dim=64: the tensors' shapes say dim = 16"):
        describe(path, {"dim": "64"})
    with pytest.raises(UserError, match=r"cannot be built with --hp dropout=-3.0 \(dropout -3.0 is not in \[0, 1\)\)"):
        load_any(path, {"dropout": "-3"})
    bad = write_pmixer(tmp_path / "b", m, None, name=PMIXER_NAME.replace("head=2", "head=two"))
    with pytest.raises(UserError, match="the file name says heads = two, which does not divide the width 16"):
        describe(bad)
    three = write_pmixer(tmp_path / "c", m, None, name=PMIXER_NAME.replace("head=2", "head=3"))
    with pytest.raises(UserError, match="the file name says heads = 3, which does not divide the width 16"):
        describe(three)
    (tmp_path / "a" / "args.txt").write_text("dropout_rate,abc\nnorm_first,False")
    with pytest.raises(UserError, match="dropout_rate = 'abc' is not a number"):
        describe(path)
    (tmp_path / "a" / "args.txt").write_text("norm_first,true")  # lower case, as a hand-edited file may say
    assert describe(path).hparams["wiring"] == "pre-ln"
    research, _, _ = write_research_hstu(tmp_path / "r")
    with pytest.raises(UserError, match=r"--hp attn_norm=0: the tensors' shapes say attn_norm = 16"):
        load_any(research, {"attn_norm": "0"})
    with pytest.raises(UserError, match=r"max_len 40 with N = 16 positions upstream"):
        load_any(research, {"max_len": "40"})


def test_a_dlrm_export_keeps_dlrms_integer_counters(tmp_path):
    """dlrm's --load-model formats epoch, iter and the batch counts with {:d}: floats crash it (review)."""
    from .test_checkpoints import dlrm_state
    torch.save({"state_dict": dlrm_state(), "nepochs": 3, "nbatches": 10, "nbatches_test": 5, "epoch": 2, "iter": 7,
                "test_acc": 0.7, "train_loss": 0.5, "total_loss": 5.0}, tmp_path / "dlrm.pt")
    assert cli("export", tmp_path / "dlrm.pt", "--target", "dlrm", "-o", tmp_path / "x").exit_code == 0
    out = torch.load(tmp_path / "x" / "model.pt", weights_only=True)
    counters = {k: out[k] for k in ("nepochs", "nbatches", "nbatches_test", "epoch", "iter")}
    assert counters == {"nepochs": 3, "nbatches": 10, "nbatches_test": 5, "epoch": 2, "iter": 7}
    assert all(type(v) is int for v in counters.values())
    "Saved at: epoch = {:d}/{:d}, batch = {:d}/{:d}, ntbatch = {:d}".format(
        out["epoch"], out["nepochs"], out["iter"], out["nbatches"], out["nbatches_test"])  # dlrm's own line


def test_broken_containers_say_what_is_wrong(tmp_path):
    """Found by an independent review: a truncated .pt was 'not a checkpoint format', a DCP folder without its
    .metadata 'holds a Tensor, not a state dict'."""
    torch.save({"state_dict": {"emb_l.0.weight": torch.zeros(50, 4)}}, tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="starts as a zip .torch. file but cannot be read as one"):
        describe(tmp_path / "trunc.pt")
    (tmp_path / "dcp").mkdir()
    torch.save(torch.zeros(3), tmp_path / "dcp" / "__0_0.distcp")
    with pytest.raises(UserError, match=r"holds DCP data files \(\*\.distcp\) but no \.metadata"):
        describe(tmp_path / "dcp")
    torch.save({}, tmp_path / "empty.pt")
    with pytest.raises(UserError, match=r"matches no format recompress knows \(it is empty\)"):
        describe(tmp_path / "empty.pt")
