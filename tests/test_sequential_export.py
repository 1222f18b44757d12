"""ONNX export of SASRec, HSTU and the ranker: dynamic axes, attention forms, the custom HSTU node, and the
amortized graph against the naive one. Every ONNX output is compared with the eager model (itself tested
against the papers' reference code in test_sequential_models.py) on inputs the export never saw."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from recompress.evaluate.predictors import OrtPredictor
from recompress.export import export_checkpoint

from recompress.checkpoint import Checkpoint, save_checkpoint
from recompress.cli import main
from recompress.data import open_dataset
from recompress.data.synthetic_sequences import make_synthetic_sequences
from recompress.errors import UserError
from recompress.families import get_family
from recompress.models.attention import set_attention
from recompress.tables import DenseTable

ITEMS = 90


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("seqexp") / "syn"
    return open_dataset(make_synthetic_sequences(out, users=200, items=ITEMS, clusters=6, mean_len=12, seed=4))


def fresh(name, data, **hp):
    fam = get_family(name)
    spec = fam.new_spec(data, {"dim": 16, "heads": 2, "max_len": 10, **hp})
    model = fam.build(spec, {t.name: DenseTable(t.rows, t.dim) for t in spec.tables})
    fam.init(model, 0)
    with torch.no_grad():
        for t in model.tables.values():
            t.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    return Checkpoint(model.eval(), spec, None)


def requests(data, n, length, m, seed, shared=False, times=False):
    rng = np.random.default_rng(seed)
    history = rng.integers(1, data.num_items + 1, (n, length))
    history[0, : length // 2] = 0  # a padded history
    out = {"history": history, "candidates": rng.integers(1, data.num_items + 1, (1 if shared else n, m))}
    if times:
        out["timestamps"] = np.cumsum(rng.integers(0, 86_400, (n, length)), axis=1)
    return out


def eager(ck, x):
    with torch.no_grad():
        return ck.model(**{k: torch.from_numpy(v) for k, v in x.items()}).numpy()


def exported(ck, folder, **opts):
    man = export_checkpoint(ck, "onnx", folder, opts=opts, samples=64)
    return man, OrtPredictor(folder / man["file"], 1)


@pytest.mark.parametrize("name,layout", [("sasrec", "shared"), ("hstu", "shared"), ("ranker", "per-row"),
                                         ("sasrec", "per-row"), ("ranker", "shared"), ("bert4rec", "per-row"),
                                         ("bert4rec", "shared"), ("gru4rec", "shared")])
def test_every_family_exports_with_dynamic_axes_and_amortized_equals_naive(data, tmp_path, name, layout):
    """Both scoring graphs against eager torch. Softmax attention is fused by default (ONNX's Attention, opset
    23); the softmax families' per-row amortized graphs are exported decomposed (Softmax, opset 18), so that
    each of them is checked in both forms."""
    times = name == "hstu"
    ck = fresh(name, data)
    assert get_family(name).uses_times(ck.spec.hparams) == times  # the synthetic set has timestamps
    softmax = name in ("sasrec", "ranker", "bert4rec")
    decompose = softmax and layout == "per-row"
    man_a, amortized = exported(ck, tmp_path / "a", layout=layout, **({"attention": "decomposed"} if decompose else {}))
    man_n, naive = exported(ck, tmp_path / "n", scoring="naive", layout=layout)
    assert man_a["options"]["scoring"] == "amortized" and man_n["options"]["scoring"] == "naive"
    assert man_a["options"]["layout"] == layout
    for man, fused in ((man_a, softmax and not decompose), (man_n, softmax)):
        assert ("Attention" in man["ops"]) == fused
        assert man["opset"] >= 23 if fused else man["opset"] == 18
    if decompose:
        assert man_a["attention"] == ["decomposed"] and "Softmax" in man_a["ops"]
    cands = next(i for i in man_a["inputs"] if i["name"] == "candidates")
    assert cands["shape"] == ([1, "candidates"] if layout == "shared" else ["batch", "candidates"])
    assert [i["name"] for i in man_a["inputs"]] == ["history", "candidates"] + (["timestamps"] if times else [])
    hist = next(i for i in man_a["inputs"] if i["name"] == "history")
    assert hist["shape"] == ["batch", 10]  # windows as trained: max_len, left-padded
    few = requests(data, 3, 10, 16, 1, times=times)
    few["history"][:, :-3] = 0
    for x in (requests(data, 5, 10, 7, 0, times=times), few,
              requests(data, 6, 10, 30, 2, shared=True, times=times), requests(data, 1, 10, 1, 3, times=times)):
        want = eager(ck, x)
        assert want.shape == (len(x["history"]), x["candidates"].shape[1])
        np.testing.assert_allclose(amortized(x), want, atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(naive(x), want, atol=1e-5, rtol=1e-4)
    assert man_a["parity"]["passed"] and man_n["parity"]["passed"]


def test_naive_scorer_is_one_pass_per_candidate(data):
    """Independent of export: each naive score equals the model run on that single candidate."""
    for name in ("sasrec", "ranker"):
        ck = fresh(name, data)
        naive = get_family(name).scorer(ck.model, "naive")
        x = {k: torch.from_numpy(v) for k, v in requests(data, 3, 10, 4, 5).items()}
        with torch.no_grad():
            got = naive(**x)
            one = torch.stack([torch.cat([ck.model(x["history"][i:i + 1], x["candidates"][i:i + 1, j:j + 1])[0]
                                          for j in range(4)]) for i in range(3)])
        torch.testing.assert_close(got, one, atol=1e-6, rtol=1e-5)


def test_ranker_fused_history_attention_equals_decomposed(data):
    """The fused form against the decomposed one in torch, with candidates that repeat."""
    ck = fresh("ranker", data)
    x = {k: torch.from_numpy(v) for k, v in requests(data, 4, 10, 9, 7).items()}
    x["candidates"][:, 3] = x["candidates"][:, 0]
    with torch.no_grad():
        decomposed = ck.model(**x)
        set_attention(ck.model, "fused")
        fused = ck.model(**x)
        set_attention(ck.model, None)
    torch.testing.assert_close(fused, decomposed, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[:, 3], fused[:, 0])  # candidates never see each other


def test_concat_ranker_exports_its_only_form_and_refuses_amortized(data, tmp_path):
    ck = fresh("ranker", data, fusion="concat")
    with pytest.raises(UserError, match="no 'amortized' scoring graph"):
        export_checkpoint(ck, "onnx", tmp_path / "a", opts={"scoring": "amortized"}, samples=16)
    assert not (tmp_path / "a").exists()
    man, ort = exported(ck, tmp_path / "n")
    assert man["options"]["scoring"] == "naive"
    x = requests(data, 3, 10, 7, 8)  # the export reads whole windows; eager trims them: both must agree
    np.testing.assert_allclose(ort(x), eager(ck, x), atol=1e-5, rtol=1e-4)


def test_hstu_custom_node_carries_its_attributes_and_runs(data, tmp_path):
    ck = fresh("hstu", data)
    man, custom = exported(ck, tmp_path / "c", attention="custom")
    model = onnx.load(tmp_path / "c" / "model.onnx")
    nodes = [n for n in model.graph.node if n.domain == "recompress"]
    assert len(nodes) == ck.spec.hparams["blocks"] and {n.op_type for n in nodes} == {"HSTUAttention"}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert (attrs["num_heads"], attrs["attn_dim"], attrs["linear_dim"], attrs["normalization"]) == (2, 8, 8, b"length")
    assert [(f.domain, f.name) for f in model.functions] == [("recompress", "HSTUAttention")]
    assert man["custom_ops"] == {"recompress.HSTUAttention": "function body in standard ops (ONNX Runtime inlines it)"}
    onnx.checker.check_model(model)
    x = requests(data, 4, 10, 11, 8, times=True)
    np.testing.assert_allclose(custom(x), eager(ck, x), atol=1e-5, rtol=1e-4)
    _, decomposed = exported(ck, tmp_path / "d")
    assert not [n for n in onnx.load(tmp_path / "d" / "model.onnx").graph.node if n.domain == "recompress"]
    np.testing.assert_allclose(decomposed(x), custom(x), atol=1e-5, rtol=1e-4)


def test_impossible_forms_are_refused_by_name(data, tmp_path, tiny_ckpt):
    from recompress.checkpoint import load_checkpoint
    with pytest.raises(UserError, match="HSTU attention has no 'fused' form"):
        export_checkpoint(fresh("hstu", data), "onnx", tmp_path / "a", opts={"attention": "fused"})
    with pytest.raises(UserError, match="SASRec attention has no 'custom' form"):
        export_checkpoint(fresh("sasrec", data), "onnx", tmp_path / "b", opts={"attention": "custom"})
    with pytest.raises(UserError, match="onnx target has no kernel for triton attention"):
        export_checkpoint(fresh("hstu", data), "onnx", tmp_path / "c", opts={"attention": "triton"})
    with pytest.raises(UserError, match="this dlrm model has no 'naive' scoring graph"):
        export_checkpoint(load_checkpoint(tiny_ckpt), "onnx", tmp_path / "d", opts={"scoring": "naive"})
    assert not any((tmp_path / p).exists() for p in "abcd")


def test_cli_exports_sequential_models_and_times_requests(data, tmp_path):
    ck = fresh("sasrec", data)
    save_checkpoint(ck, tmp_path / "ck")
    r = CliRunner().invoke(main, ["export", str(tmp_path / "ck"), "--data", str(data.path), "-o", str(tmp_path / "e"),
                                  "--scoring", "naive", "--attention", "decomposed"])
    assert r.exit_code == 0, r.output
    man = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert man["options"]["scoring"] == "naive" and man["attention"] == ["decomposed"]
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "e"), "--data", str(data.path), "--no-latency"])
    assert r.exit_code != 0 and "naive graph, which runs the history once per candidate" in r.output
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "e"), "--data", str(data.path), "--batch-sizes", "1",
                                  "--protocol", "sampled", "--candidates", "16", "--repeats", "8", "--threads", "1", "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["latency"]["candidates"] == 16 and set(res["latency"]["backends"]) == {"onnxruntime", "torch"}
    assert "batch 1, 16 candidates each p50" in r.output
    # the naive ONNX graph ranks exactly as the amortized torch model does
    assert res["accuracy"]["onnxruntime"]["ndcg@10"] == pytest.approx(res["accuracy"]["torch"]["ndcg@10"], abs=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_triton_attention_without_a_gpu_is_a_clear_error(data, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    save_checkpoint(fresh("hstu", data), tmp_path / "ck")
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "ck"), "--data", str(data.path), "--no-latency",
                                  "--attention", "triton"])
    assert r.exit_code != 0 and "runs on a CUDA GPU, and this machine has none" in r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("methods,params,stored,layout", [("int8", {}, np.uint8, "shared"),
                                                          ("tt,int8", {"tt_rank": 4}, np.uint8, "shared"),
                                                          ("tt,int8", {"tt_rank": 4}, np.uint8, "per-row"),
                                                          ("hash", {"ratio": 4}, np.float32, "shared")])
def test_compressed_item_tables_export_compressed(data, tmp_path, methods, params, stored, layout):
    """The item table keeps its compressed storage in the graph: no float initializer as large as the
    dense table, and (quantized) an 8-bit initializer holding the rows."""
    from onnx import numpy_helper
    from recompress.compress.registry import Context, compress, parse_methods

    from recompress.training import TrainConfig
    ck = compress(fresh("sasrec", data), parse_methods(methods, params), Context(data, TrainConfig(steps=0)))
    _, ort = exported(ck, tmp_path / "e", layout=layout)
    inits = [numpy_helper.to_array(t) for t in onnx.load(tmp_path / "e" / "model.onnx").graph.initializer]
    dense_rows = (data.num_items + 1) * 16
    assert not any(a.dtype == np.float32 and a.size >= dense_rows for a in inits)
    if stored == np.uint8:
        assert any(a.dtype == np.uint8 for a in inits)
    for x in (requests(data, 4, 10, 12, 9), requests(data, 5, 10, 12, 10, shared=True)):
        np.testing.assert_allclose(ort(x), eager(ck, x), atol=1e-5, rtol=1e-4)
