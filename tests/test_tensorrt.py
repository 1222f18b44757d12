"""TensorRT target: the graph forms TensorRT keeps narrow (checked without TensorRT against the FBGEMM row
formula), shape ranges, and real engine builds (``trt``: needs tensorrt or tensorrt-rtx, which builds on a
machine without a GPU); running engines needs a CUDA GPU (``gpu``)."""

import copy
import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from recompress.compress.registry import Context, compress, parse_methods
from recompress.export import export_checkpoint
from recompress.export.graph import DequantizeThenGather
from recompress.export.onnx import make_session
from recompress.export.trt_builder import parse_shapes

from recompress.checkpoint import Checkpoint, load_checkpoint
from recompress.cli import main
from recompress.data import open_dataset
from recompress.data.synthetic import make_synthetic
from recompress.data.synthetic_sequences import make_synthetic_sequences
from recompress.errors import UserError
from recompress.families import get_family
from recompress.tables.rowwise import QuantizedRows
from tests.test_sequential_export import fresh

HAVE_TRT = any(importlib.util.find_spec(m) is not None for m in ("tensorrt", "tensorrt_rtx"))
trt = pytest.mark.skipif(not HAVE_TRT, reason="TensorRT is not installed (pip install -e '.[trt]')")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="running a TensorRT engine needs a CUDA GPU")


def test_int8_rows_are_written_as_exact_symmetric_dequantize(tmp_path):
    """TensorRT's DequantizeLinear takes int8 with positive scales only; FBGEMM rows are uint8 with a scale and
    a bias (and a constant row has scale 0). The written graph must reproduce q * s + b exactly."""
    w = torch.randn(6, 5)
    w[2] = 0.7  # a constant row: scale 0
    w[4] = 0.0  # a zero (padding) row
    rows = QuantizedRows(6, 5, "int8")
    rows.fill(w)
    module = torch.nn.Sequential(DequantizeThenGather(rows))
    idx = torch.tensor([[0, 2, 4, 5, 1, 3]])
    torch.onnx.export(module, (idx,), str(tmp_path / "q.onnx"), input_names=["idx"], dynamo=True, opset_version=18)
    model = onnx.load(str(tmp_path / "q.onnx"))
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert inits[dq.input[0]].dtype == np.int8 and (inits[dq.input[1]] > 0).all() and len(dq.input) == 2
    got = make_session(tmp_path / "q.onnx").run(None, {"idx": idx.numpy()})[0]
    q, s, b = rows.data.numpy().astype(np.float64), rows.scale.numpy(), rows.bias.numpy()
    want = (q * s[:, None] + b[:, None])[idx.numpy()]  # FBGEMM's unpack formula, independently
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)


def test_shapes_option_is_parsed_and_checked():
    assert parse_shapes("batch=1:64:512, candidates=2:100:900") == {"batch": (1, 64, 512), "candidates": (2, 100, 900)}
    for bad in ("batch=1:64", "batch=64:1:512", "batch=0:1:2", "batch=a:b:c"):
        with pytest.raises(UserError, match="--shapes"):
            parse_shapes(bad)


@pytest.fixture(scope="module")
def seq_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("trtseq") / "syn"
    return open_dataset(make_synthetic_sequences(out, users=120, items=90, clusters=6, mean_len=12, seed=4))


def test_sequential_profiles_cover_the_catalogue_when_candidates_are_shared(seq_data):
    fam = get_family("sasrec")
    spec = fresh("sasrec", seq_data).spec
    assert fam.profile(spec, "shared")["candidates"] == (1, 91, 91)  # 90 items + padding row
    assert fam.profile(spec, "per-row")["candidates"][2] == 2048


def _ck(tiny_ckpt):
    return load_checkpoint(tiny_ckpt)


def _export(ck, folder, **opts):
    return export_checkpoint(ck, "trt", folder, samples=256, opts=opts)


@pytest.fixture(scope="module")
def wide_dlrm(tmp_path_factory):
    """An untrained DLRM with a 30k-row table: large enough that table bytes dominate the engine file."""
    out = tmp_path_factory.mktemp("trtdlrm") / "syn"
    make_synthetic(out, samples=400, table_rows=[30000, 2000, 50], seed=1)
    fam = get_family("dlrm")
    spec = fam.new_spec(open_dataset(out), {"dim": 16, "bottom": "16", "top": "16"})
    model = fam.from_spec(spec)
    fam.init(model, 0)
    return Checkpoint(model.eval(), spec, None)


@trt
def test_dlrm_engines_build_and_int8_rows_stay_int8(wide_dlrm, tmp_path):
    ck = lambda: copy.deepcopy(wide_dlrm)
    dense = _export(ck(), tmp_path / "dense")
    q = compress(ck(), parse_methods("int8"), Context())
    narrow = _export(q, tmp_path / "int8")
    wide = _export(q, tmp_path / "int8-gd", quant_graph="gather-dequant")
    tt = _export(compress(ck(), parse_methods("tt", {"tt_rank": 4}), Context()), tmp_path / "tt")
    rows, dim = 30000 + 2000 + 50 + 3, 16  # + one zero (padding) row per table in the stacked table
    for m, folder in ((dense, "dense"), (narrow, "int8"), (wide, "int8-gd"), (tt, "tt")):
        assert (tmp_path / folder / "model.engine").stat().st_size == m["engine"]["bytes"] == m["files"]["model.engine"]
        assert m["parity"]["passed"] and m["parity"]["runtime"] in ("onnxruntime", "tensorrt")
        assert m["engine"]["profile"]["dense"] == {"min": [1, 13], "opt": [64, 13], "max": [2048, 13]}
        assert m["engine"]["profile"]["sparse"]["max"] == [2048, 3, 64]
    (table,) = narrow["engine"]["layers"]["tables"]
    assert table["dtype"] == "int8" and table["shape"] == [rows, dim] and "DequantizeLinear" in table["stored"]
    # the network's int8 values plus the fp32 scale and bias of every row: the exported table's bytes
    assert (table["value_bytes"], table["scale_bytes"], table["bias_bytes"]) == (rows * dim, rows * 4, rows * 4)
    assert narrow["engine"]["layers"]["table_bytes"] == rows * (dim + 8)
    assert abs(narrow["engine"]["layers"]["table_bytes"] - sum(narrow["exported_table_bytes"].values())) <= 3 * (dim + 8)
    # the engine proves it: dropping 3 of every 4 bytes of the table's values shrinks the file by about that
    saved = dense["engine"]["bytes"] - narrow["engine"]["bytes"]
    assert 0.9 * rows * (dim * 3 - 8) < saved < rows * dim * 3  # less the new scale and bias per row
    # gathering the uint8 rows first: TensorRT holds them as int32, the engine is larger than the dense one
    (table,) = wide["engine"]["layers"]["tables"]
    assert table["dtype"] == "int32" and wide["engine"]["bytes"] > dense["engine"]["bytes"]
    assert tt["engine"]["layers"]["table_bytes"] < 0.2 * dense["engine"]["layers"]["table_bytes"]


@trt
def test_softmax_attention_becomes_fused_attention_in_fp16(seq_data, tmp_path):
    ck = fresh("sasrec", seq_data, dim=32)  # head size 16: TensorRT-RTX 1.7 has no fused kernel for 8
    m = _export(ck, tmp_path / "fp16")
    assert m["engine"]["layers"]["attention_fallback"] is None
    layers = m["engine"]["layers"]
    assert m["precision"] == "fp16" and len(layers["attention"]) == ck.spec.hparams["blocks"]
    assert layers["fused_attention"] == ck.spec.hparams["blocks"]
    assert {a["dtype"] for a in layers["attention"]} == {"half"} and set(layers["matmul_input_dtypes"]) == {"half"}
    assert m["parity"]["passed"] and m["parity"]["max_abs_diff"] > 1e-6  # really fp16, and within its tolerance
    full = _export(ck, tmp_path / "fp32", precision="fp32")  # no fp32 kernel: TensorRT decomposes it
    assert full["engine"]["layers"]["fused_attention"] == 0 and full["parity"]["max_abs_diff"] < 1e-5
    small = _export(fresh("sasrec", seq_data), tmp_path / "head8")  # no kernel: rebuilt decomposable, said so
    assert small["engine"]["layers"]["fused_attention"] == 0 and "decomposable" in small["engine"]["layers"]["attention_fallback"]
    assert "2 heads of size 8" in small["engine"]["layers"]["attention_fallback"]
    one = _export(fresh("sasrec", seq_data, dim=32, heads=1), tmp_path / "one-head")  # one head never fuses
    assert one["engine"]["layers"]["fused_attention"] == 0
    assert [(a["heads"], a["head_size"]) for a in one["engine"]["layers"]["attention"]] == [(1, 32)] * 2
    assert "1 head of size 32" in one["engine"]["layers"]["attention_fallback"]
    assert "--heads 2" in one["engine"]["layers"]["attention_fallback"]
    odd = _export(fresh("sasrec", seq_data, dim=100), tmp_path / "head50")  # TensorRT's attention layer fails
    assert set(odd["attention"]) == {"decomposed"} and odd["engine"]["layers"]["attention"] == [] and odd["parity"]["passed"]
    assert "exported with --attention decomposed" in odd["engine"]["layers"]["attention_fallback"]
    bf16 = _export(ck, tmp_path / "bf16", precision="bf16", shapes="batch=1:8:32")
    assert bf16["engine"]["profile"]["history"]["max"] == [32, 10]
    if not torch.cuda.is_available():
        assert bf16["parity"]["passed"] is None and "GPU" in bf16["parity"]["skipped"]


@pytest.mark.parametrize("attention", ["decomposed", "custom"])
@trt
def test_hstu_engines_build_from_the_decomposed_graph_or_the_inlined_node(seq_data, tmp_path, attention):
    m = _export(fresh("hstu", seq_data), tmp_path / attention, attention=attention)
    assert m["precision"] == "fp32" and m["engine"]["layers"]["attention"] == [] and m["parity"]["passed"]


@trt
def test_refusals_name_the_problem_and_write_nothing(tiny_ckpt, seq_data, tmp_path):
    from recompress.export.trt_builder import build_engine
    bad = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("DequantizeLinear", ["q", "s"], ["t"], name="uint8_dq"),
         onnx.helper.make_node("Gather", ["t", "i"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("i", onnx.TensorProto.INT64, ["n"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(np.ones((5, 4), np.uint8), "q"), numpy_helper.from_array(np.ones(5, np.float32), "s")]),
        opset_imports=[onnx.helper.make_opsetid("", 18)])
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    with pytest.raises(UserError, match="uint8_dq.*--materialize"):
        build_engine(tmp_path / "bad.onnx", tmp_path / "e", tmp_path / "log", axes={"i": {0: "n"}},
                     ranges={"n": (1, 2, 4)}, decompose_attention=False, capabilities=[], timing_cache=None)
    assert not (tmp_path / "e").exists()
    ck = fresh("sasrec", seq_data)
    for opts, match in (({"shapes": "bag=1:1:2"}, "no axis for"), ({"compute_capability": ["SM90"]}, "SM89"),
                        ({"dense": "int8"}, "--precision")):
        with pytest.raises(UserError, match=match):
            _export(ck, tmp_path / "x", **opts)
        assert not (tmp_path / "x").exists()
    if importlib.util.find_spec("tensorrt") is None:  # TensorRT-RTX: Turing has no fp32 matrix products
        with pytest.raises(UserError, match="FP32 GEMM.*--precision fp16"):
            _export(_ck(tiny_ckpt), tmp_path / "x", compute_capability=["SM75"])
        assert not (tmp_path / "x").exists()
    ok = _export(_ck(tiny_ckpt), tmp_path / "engine")
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "engine"), "--data", str(ok["model_spec"]["vocab"]["dataset"]),
                                  "--no-latency"])
    if not torch.cuda.is_available():
        assert r.exit_code == 2 and "no CUDA GPU" in r.output and "--target onnx" in r.output
        assert "Traceback" not in r.output
    if importlib.util.find_spec("tensorrt") is None:  # a build that fails after the engine file was opened
        with pytest.raises(UserError, match="FP32 GEMM"):
            build_engine(tmp_path / "engine" / "model.onnx", tmp_path / "e75", tmp_path / "log75", **DLRM_SHAPES,
                         decompose_attention=False, capabilities=["SM75"], timing_cache=None)
        assert not (tmp_path / "e75").exists()  # a 0-byte engine was left


DLRM_SHAPES = {"axes": {"dense": {0: "batch"}, "sparse": {0: "batch", 2: "bag"}},
               "ranges": {"batch": (1, 8, 64), "bag": (1, 2, 4)}}


@trt
def test_the_engine_written_as_it_is_serialized_is_the_serialized_engine(tiny_ckpt, tmp_path):
    """The engine file written through TensorRT's stream (no copy of it in memory) holds exactly the bytes of
    the engine TensorRT serializes into memory for the same network."""
    from recompress.export import trt_builder as tb
    _export(_ck(tiny_ckpt), tmp_path / "x")
    trt, _ = tb.import_tensorrt()
    if not hasattr(trt.Builder, "build_serialized_network_to_stream"):
        pytest.skip("this TensorRT has no build_serialized_network_to_stream: the engine is held in memory")
    engines = []
    for stream in (True, False):
        log = tb._Log(trt)
        builder = trt.Builder(log.logger)
        net = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        tb._parse(trt, net, log, tmp_path / "x" / "model.onnx")
        config = builder.create_builder_config()
        config.add_optimization_profile(tb._profile(trt, builder, net, **DLRM_SHAPES)[0])
        if stream:
            assert tb._serialize(trt, builder, net, config, tmp_path / "streamed.engine")
            engines.append((tmp_path / "streamed.engine").read_bytes())
        else:
            engines.append(bytes(builder.build_serialized_network(net, config)))
    assert len(engines[0]) > 10_000 and engines[0] == engines[1]


@trt
def test_cli_reports_engine_precision_attention_and_table_storage(seq_data, tmp_path):
    from recompress.checkpoint import save_checkpoint
    path = save_checkpoint(fresh("sasrec", seq_data, dim=32), tmp_path / "ck")
    r = CliRunner().invoke(main, ["export", str(path), "--target", "trt", "-o", str(tmp_path / "e"), "--samples", "64"])
    assert r.exit_code == 0, r.output
    assert "fp16" in r.output and "2 fused attention of 2" in r.output and "model.engine" in r.output
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["engine"]["flavor"] in ("tensorrt", "tensorrt_rtx") and manifest["options"]["precision"] == "fp16"
    assert (tmp_path / "e" / "build.log").read_text().strip()
    r = CliRunner().invoke(main, ["export", str(path), "--target", "trt", "-o", str(tmp_path / "f"), "--shapes", "bag=1:2:3"])
    assert r.exit_code == 2 and "no axis for" in r.output and "exporting" not in r.output  # refused before any work


@trt
@gpu
def test_engine_runs_on_the_gpu_and_matches_onnx_runtime(tiny_ckpt, tmp_path):
    from recompress.evaluate.predictors import OrtPredictor, TrtPredictor
    from recompress.export.trt_runtime import unsupported_here
    reason = unsupported_here()
    if reason:
        pytest.skip(reason)
    m = _export(_ck(tiny_ckpt), tmp_path / "e")
    assert m["parity"]["runtime"] == "tensorrt" and m["parity"]["passed"]
    engine = TrtPredictor(tmp_path / "e" / "model.engine", m)
    ort = OrtPredictor(tmp_path / "e" / "model.onnx", 1)
    rng = np.random.default_rng(0)
    x = {"dense": rng.normal(size=(33, 13)).astype(np.float32), "sparse": rng.integers(0, 7, (33, 4, 1))}
    np.testing.assert_allclose(engine(x), ort(x), atol=1e-4, rtol=1e-3)
