"""TT, hashing-family and row-wise quantized tables: lookups, TT-SVD, byte accounting, export, composition."""

import copy
import json
import math

import numpy as np
import onnx
import pytest
import torch
from recompress.compress.registry import Context, Selection, compress, parse_methods
from recompress.compress.tt import balanced_factors, dim_factors, plan, tt_svd
from recompress.export import export_checkpoint

from recompress.checkpoint import load_checkpoint, save_checkpoint
from recompress.errors import UserError
from recompress.tables import DenseTable
from recompress.tables.hashed import PRIME, FreqHashTable, HashedTable, QRTable
from recompress.tables.rowformat import row_bytes, units_touched
from recompress.tables.rowwise import QuantizedRows
from recompress.tables.tt import TTTable
from recompress.training import TrainConfig


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _tt_reference(t: TTTable) -> torch.Tensor:
    """The full TT-matrix by explicit einsum over all cores (independent of the lookup code)."""
    cores = [getattr(t, f"core{k}").detach().view(n, t.ranks[k], d, t.ranks[k + 1])
             for k, (n, d) in enumerate(zip(t.row_shape, t.dim_shape))]
    full = torch.einsum("iajb,kbmc,ncod->iknjmo", *cores)
    return full.reshape(math.prod(t.row_shape), t.dim)[:t.rows]


def test_factorizations_cover_the_table():
    for rows in (7, 800, 12345, 10_000_000):
        f = balanced_factors(rows, 3)
        assert math.prod(f) >= rows and math.prod(f) < rows * 1.2 + 27
    assert dim_factors(16, 3) == [2, 2, 4] and dim_factors(64, 3) == [4, 4, 4] and dim_factors(13, 3) == [1, 1, 13]


def test_tt_lookup_equals_reconstruction_and_svd_recovers_exact_rank():
    t = TTTable(1000, 16, [10, 10, 10], [2, 2, 4], [1, 3, 3, 1])
    t.reset_parameters(_gen())
    ids = torch.randint(0, 1000, (64, 5), generator=_gen(1))
    ref = _tt_reference(t)
    assert torch.allclose(t.lookup(ids), ref[ids], atol=1e-6)
    assert torch.allclose(t.dense_weight(), ref, atol=1e-6)
    rs, ds, ranks, _ = plan(1000, 16, {"tt_rank": 3})
    again = tt_svd(ref, rs, ds, ranks, None)
    assert float((again.dense_weight() - ref).norm() / ref.norm()) < 1e-5
    low = tt_svd(ref, rs, ds, [1, 2, 2, 1], None)
    assert float((low.dense_weight() - ref).norm() / ref.norm()) > 0.05  # rank 2 cannot hold a rank-3 train


def test_tt_error_budget_and_full_rank():
    w = torch.randn(3000, 16, generator=_gen(2))
    rs, ds, _, tol = plan(3000, 16, {"tol": 0.4})
    t = tt_svd(w, rs, ds, None, tol)
    err = float((t.dense_weight() - w).norm() / w.norm())
    assert 0.2 < err <= 0.4
    rs, ds, ranks, _ = plan(3000, 16, {"tt_rank": 10_000})
    assert float((tt_svd(w, rs, ds, ranks, None).dense_weight() - w).norm() / w.norm()) < 1e-5


def test_tt_ratio_picks_ranks_within_budget():
    rs, ds, ranks, _ = plan(1_000_000, 64, {"ratio": 100})
    from recompress.compress.tt import tt_bytes
    assert tt_bytes(rs, ds, ranks) <= 1_000_000 * 64 * 4 / 100
    bigger = [1, *[r + 1 for r in ranks[1:-1]], 1]
    assert tt_bytes(rs, ds, bigger) > 1_000_000 * 64 * 4 / 100


def _py_hash(i, a, b, m):
    return ((a * i + b) % PRIME) % m


def test_hash_qr_freqhash_lookups_match_their_definitions():
    h = HashedTable(5000, 8, 97, a=123456789, b=987654)
    h.reset_parameters(_gen())
    ids = torch.randint(0, 5000, (200,), generator=_gen(3))
    want = h.weight.detach()[[_py_hash(int(i), 123456789, 987654, 97) for i in ids]]
    assert torch.equal(h.lookup(ids), want)
    for op in ("mult", "add", "concat"):
        q = QRTable(5000, 8, 70, op)
        q.reset_parameters(_gen())
        qa, ra = q.q.detach()[ids // 70], q.r.detach()[ids % 70]
        want = {"mult": qa * ra, "add": qa + ra, "concat": torch.cat([qa, ra], 1)}[op]
        assert torch.equal(q.lookup(ids), want)
        # not dlrm's all-positive U(sqrt(1/n), 1) start: rows are centred on zero
        assert 0.3 < float((q.dense_weight() > 0).float().mean()) < 0.7
    f = FreqHashTable(5000, 8, hot=10, buckets=50, hashes=[[11, 5], [7, 3]])
    f.reset_parameters(_gen())
    f.slot[torch.arange(10) * 3] = torch.arange(10, dtype=torch.int32)
    for i in (0, 3, 27, 1, 4999):
        got = f.lookup(torch.tensor([i]))[0]
        if i % 3 == 0 and i < 30:
            assert torch.equal(got, f.hot.detach()[i // 3])
        else:
            assert torch.allclose(got, f.tail.detach()[_py_hash(i, 11, 5, 50)] + f.tail.detach()[_py_hash(i, 7, 3, 50)])


def test_fp16_bf16_rows_and_sector_counts():
    w = torch.randn(50, 16, generator=_gen(6))
    for fmt, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        q = QuantizedRows(50, 16, fmt)
        q.fill(w)
        assert torch.equal(q.dequantized(), w.to(dt).float())
    assert row_bytes("int8", 16) == 24 and row_bytes("int8", 16, 16) == 32 and row_bytes("int4", 16) == 12
    big = w.clone()
    big[3, 4] = 7e4  # finite in fp32, beyond fp16's largest value: refused, not stored as Inf
    with pytest.raises(UserError, match="1 values exceed the fp16 range.*bf16"):
        QuantizedRows(50, 16, "fp16").fill(big)
    QuantizedRows(50, 16, "bf16").fill(big)
    assert units_touched(32, 32) == 1 and units_touched(48, 32) == 2
    assert units_touched(20, 32) == 1.5  # rows at 0, 20, 40, ...: 1,2,1,2,2,1,2,1 sectors over one period


def _ck(tiny_ckpt):
    return load_checkpoint(tiny_ckpt)


def stored_matrix(t, name: str) -> torch.Tensor:
    """Float rows of row matrix ``name`` read from the stored tensors; int rows through PyTorch's FBGEMM unpack."""
    if name not in t.stores:
        return getattr(t, name).detach()
    s = t.stores[name]
    if s.fmt in ("fp16", "bf16"):
        return s.data[:, :s.cols].float()
    unpack = {"int8": torch.ops.quantized.embedding_bag_byte_unpack,
              "int4": torch.ops.quantized.embedding_bag_4bit_unpack}[s.fmt]
    return unpack(s.fused())


def reference_rows(t, ids: torch.Tensor) -> torch.Tensor:
    """Each kind's rows from its definition and stored tensors (never through the kind's own lookup)."""
    m = lambda name: stored_matrix(t, name)
    if t.kind == "dense":
        return m("weight")[ids]
    if t.kind == "hash":
        return m("weight")[[_py_hash(int(i), t.a, t.b, t.buckets) for i in ids.flatten()]].view(*ids.shape, -1)
    if t.kind == "qr":
        q, r = m("q")[ids // t.collisions], m("r")[ids % t.collisions]
        return {"mult": q * r, "add": q + r, "concat": torch.cat([q, r], -1)}[t.op]
    if t.kind == "freqhash":
        out = []
        for i in ids.flatten().tolist():
            s = int(t.slot[i])
            out.append(m("hot")[s] if s >= 0 else sum(m("tail")[_py_hash(i, a, b, t.buckets)] for a, b in t.hashes))
        return torch.stack(out).view(*ids.shape, -1)
    assert t.kind == "tt"
    cores = [m(f"core{k}").view(n, t.ranks[k], d, t.ranks[k + 1]) for k, (n, d) in enumerate(zip(t.row_shape, t.dim_shape))]
    full = torch.einsum("iajb,kbmc,ncod->iknjmo", *cores).reshape(math.prod(t.row_shape), t.dim)
    return full[ids]


def expected_bytes(t) -> int:
    """Stored bytes from each kind's shape formula and FBGEMM's row sizes (not from the tensors)."""
    def matrix(name: str, rows: int, cols: int) -> int:
        return rows * (row_bytes(t.quant["dtype"], cols, t.quant["align"]) if t.quant else cols * 4)
    if t.kind == "dense":
        return matrix("weight", 800, 8)
    if t.kind == "hash":
        return matrix("weight", t.buckets, 8)
    if t.kind == "qr":
        w = 4 if t.op == "concat" else 8
        return matrix("q", -(-800 // t.collisions), w) + matrix("r", t.collisions, w)
    if t.kind == "freqhash":
        return 800 * 4 + matrix("hot", max(t.hot_rows, 1), 8) + matrix("tail", t.buckets, 8)
    r = t.ranks
    return sum(matrix(f"core{k}", n, r[k] * d * r[k + 1]) for k, (n, d) in enumerate(zip(t.row_shape, t.dim_shape)))


CASES = [  # (methods, params, form, stored bytes of C1 (800 x 8) by hand; None where the shapes are derived)
    ("tt", {"tt_rank": 2}, "tt", None),
    ("hash", {"ratio": 4}, "hash", 200 * 8 * 4),
    ("qr", {"collisions": 8, "op": "mult"}, "qr", (100 + 8) * 8 * 4),
    ("qr", {"collisions": 8, "op": "concat"}, "qr", (100 + 8) * 4 * 4),
    ("freqhash", {"ratio": 3}, "freqhash", 800 * 4 + (83 + 83) * 8 * 4),
    ("int8", {}, "dense+int8", 800 * (8 + 8)),
    ("int4", {"align": 16}, "dense+int4", 800 * 16),
    ("fp16", {}, "dense+fp16", 800 * 8 * 2),
    ("tt,int8", {"tt_rank": 2}, "tt+int8", None),
    ("qr,int4", {"collisions": 8}, "qr+int4", (100 + 8) * (4 + 4)),
    ("freqhash,int8", {"ratio": 3}, "freqhash+int8", 800 * 4 + (83 + 83) * (8 + 8)),
]


@pytest.mark.parametrize("methods,params,form,nbytes", CASES)
def test_each_kind_round_trips_and_exports_with_parity(tiny_ckpt, tiny_data, tmp_path, methods, params, form, nbytes):
    ck = compress(_ck(tiny_ckpt), parse_methods(methods, params), Context(tiny_data, TrainConfig(steps=0),
                                                                          Selection(names=("C1",))))
    t = ck.model.tables["C1"]
    assert t.form == form and [h["method"] for h in ck.spec.history] == methods.split(",")
    assert t.stored_bytes() == expected_bytes(t) == (nbytes if nbytes is not None else expected_bytes(t))
    ids = torch.randint(0, 800, (40, 3), generator=_gen(7))
    assert torch.allclose(t.lookup(ids), reference_rows(t, ids), atol=1e-6)
    path = save_checkpoint(ck, tmp_path / "ck")
    back = load_checkpoint(path)
    assert back.model.tables["C1"].form == form
    for k, v in ck.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k]), k
    m = export_checkpoint(back, "onnx", tmp_path / "onnx", data=tiny_data)
    assert m["parity"]["passed"] and m["parity"]["max_abs_diff"] < 1e-5
    assert m["table_bytes"]["C1"] == t.stored_bytes() and m["lookup_cost"]["C1"]["bytes_read_gpu"] > 0


@pytest.mark.parametrize("methods,params", [("hash", {"ratio": 4}), ("qr", {"collisions": 8, "op": "mult"}),
                                            ("freqhash,int8", {"ratio": 3}), ("int4", {"align": 16})])
def test_stacked_tables_made_as_file_pages_export_the_same_function(tiny_ckpt, tiny_data, tmp_path, monkeypatch,
                                                                      methods, params):
    """Every stacked matrix, float or quantized (MAP_BYTES set to 0), made as the pages of a file in the staging
    folder: the export's parity check against the checkpoint passes as tightly, ONNX Runtime scores exactly what
    the in-memory export scores, and no file is left behind."""
    import recompress.blockfile as blockfile
    from recompress.export.onnx import make_session

    ck = compress(_ck(tiny_ckpt), parse_methods(methods, params), Context(tiny_data, TrainConfig(steps=0),
                                                                          Selection(names=("C1", "C2"))))
    export_checkpoint(ck, "onnx", tmp_path / "memory", data=tiny_data)
    made, from_file = [], torch.from_file
    monkeypatch.setattr(blockfile, "MAP_BYTES", 0)
    monkeypatch.setattr(torch, "from_file", lambda *a, **k: made.append(a) or from_file(*a, **k))
    m = export_checkpoint(ck, "onnx", tmp_path / "files", data=tiny_data)
    assert made and m["parity"]["passed"] and m["parity"]["max_abs_diff"] < 1e-5
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [".recompress.json", "manifest.json", "model.onnx"]
    dense, sparse = tiny_data.arrays("test")[:2]
    feed = {"dense": np.asarray(dense[:64], np.float32), "sparse": np.asarray(sparse[:64], np.int64)[:, :, None]}
    a, b = (make_session(tmp_path / n / "model.onnx").run(None, feed)[0] for n in ("memory", "files"))
    assert np.array_equal(a, b)


def test_quantized_onnx_file_really_shrinks_and_both_graph_forms_match(tiny_ckpt, tiny_data, tmp_path):
    dense = export_checkpoint(_ck(tiny_ckpt), "onnx", tmp_path / "dense", data=tiny_data)
    q = compress(_ck(tiny_ckpt), parse_methods("int8"), Context())
    a = export_checkpoint(q, "onnx", tmp_path / "a", data=tiny_data)
    b = export_checkpoint(q, "onnx", tmp_path / "b", data=tiny_data, opts={"quant_graph": "dequant-gather"})
    emb = sum(dense["table_bytes"].values())
    q_emb = sum(a["table_bytes"].values())
    assert q_emb == (800 + 200 + 40 + 7) * (8 + 8)  # uint8 values + fp32 scale and bias per row
    # the dense fused table is ~emb bytes of the file; the quantized file saves most of it
    assert dense["files"]["model.onnx"] - a["files"]["model.onnx"] > 0.6 * (emb - q_emb)
    ops_a = {n.op_type for n in onnx.load(str(tmp_path / "a" / "model.onnx")).graph.node}
    ops_b = {n.op_type for n in onnx.load(str(tmp_path / "b" / "model.onnx")).graph.node}
    assert "DequantizeLinear" not in ops_a and "DequantizeLinear" in ops_b
    assert a["parity"]["passed"] and b["parity"]["passed"]
    with pytest.raises(UserError, match="int4"):
        export_checkpoint(compress(_ck(tiny_ckpt), parse_methods("int4"), Context()), "onnx", tmp_path / "c",
                          opts={"quant_graph": "dequant-gather"})
    assert not (tmp_path / "c").exists()


def test_materialize_exports_dense_tables(tiny_ckpt, tiny_data, tmp_path):
    ck = compress(_ck(tiny_ckpt), parse_methods("tt", {"tt_rank": 2}), Context(select=Selection(names=("C1",))))
    m = export_checkpoint(ck, "onnx", tmp_path / "m", data=tiny_data, opts={"materialize": True})
    assert m["parity"]["passed"] and m["options"]["materialize"]
    assert m["exported_table_bytes"]["C1"] == 800 * 8 * 4 > m["table_bytes"]["C1"]
    assert isinstance(ck.model.tables["C1"], TTTable)  # the checkpoint itself is untouched
    from recompress.evaluate import evaluate
    r = evaluate(tmp_path / "m", tiny_data, latency=False)
    assert r["bytes"]["embeddings"] == sum(m["table_bytes"].values())
    assert r["bytes"]["embeddings_exported"] == sum(m["exported_table_bytes"].values()) > r["bytes"]["embeddings"]


def test_post_training_hash_init_is_least_squares(tiny_ckpt, tiny_data):
    base = _ck(tiny_ckpt)
    w = base.model.tables["C1"].dense_weight()
    ck = compress(copy.deepcopy(base), parse_methods("hash", {"buckets": 100}), Context(select=Selection(names=("C1",))))
    t = ck.model.tables["C1"]
    b = t.bucket(torch.arange(800))
    for k in (0, 17, 99):
        assert torch.allclose(t.weight.detach()[k], w[b == k].mean(0), atol=1e-6)
    entry = ck.spec.history[-1]["tables"]["C1"]
    assert 0 < entry["rel_error"] < 1


def test_freqhash_keeps_hot_rows_exactly_and_counts_the_slot_map(tiny_ckpt, tiny_data):
    base = _ck(tiny_ckpt)
    w = base.model.tables["C1"].dense_weight()
    ck = compress(base, parse_methods("freqhash", {"hot": 50, "buckets": 100}),
                  Context(tiny_data, select=Selection(names=("C1",))))
    t = ck.model.tables["C1"]
    counts = tiny_data.id_counts("train")[0]
    hot = np.argsort(-counts, kind="stable")[:50]
    assert torch.equal(t.lookup(torch.as_tensor(hot)), w[hot])
    assert t.stored_bytes() == 800 * 4 + (50 + 100) * 8 * 4
    assert 0 < t.hot_share < 1 and json.loads(json.dumps(t.config()))["hot"] == 50


def test_finetune_recovers_accuracy_after_hashing(tiny_ckpt, tiny_data):
    ck = compress(_ck(tiny_ckpt), parse_methods("hash", {"buckets": 40, "finetune": True}),
                  Context(tiny_data, TrainConfig(epochs=1, lr=3e-3, batch_size=128), Selection(names=("C1",))))
    h = ck.spec.history[-1]
    assert h["val_after_finetune"]["logloss"] < h["val_after_init"]["logloss"]


def test_compositions_are_ordered_and_validated(tiny_ckpt):
    with pytest.raises(UserError, match="tt cannot read dense\\+int8 tables.*put tt before the method that made them"):
        compress(_ck(tiny_ckpt), parse_methods("int8,tt", {"tt_rank": 2}), Context())
    with pytest.raises(UserError, match="int8 cannot read dense\\+int8"):
        compress(_ck(tiny_ckpt), parse_methods("int8,int8"), Context())
    ck = compress(_ck(tiny_ckpt), parse_methods("tt@>=500,int8@C2+C3", {"tt_rank": 2}), Context())
    forms = {n: t.form for n, t in ck.model.tables.items()}
    assert forms == {"C1": "tt", "C2": "dense+int8", "C3": "dense+int8", "C4": "dense"}


@pytest.mark.parametrize("op", ["add", "mult", "concat"])
def test_post_training_qr_quotient_rows_are_least_squares_given_the_remainders(tiny_ckpt, op):
    """The fit ends on a quotient half-step: each q row is the least-squares solution for its ids given r
    (add: mean of w - r; mult: per column sum w r / sum r^2; concat: mean of the first half of the rows)."""
    base = _ck(tiny_ckpt)
    w = base.model.tables["C1"].dense_weight().double()
    ck = compress(copy.deepcopy(base), parse_methods("qr", {"collisions": 6, "op": op}), Context(select=Selection(names=("C1",))))
    t = ck.model.tables["C1"]
    q, r = t.q.detach().double(), t.r.detach().double()
    for k in (0, 41, 133):
        ids = torch.arange(800)[torch.arange(800) // 6 == k]
        rows, rem = w[ids], r[ids % 6]
        expect = {"add": lambda: (rows - rem).mean(0), "mult": lambda: (rows * rem).sum(0) / (rem ** 2).sum(0),
                  "concat": lambda: rows[:, :4].mean(0)}[op]()
        assert torch.allclose(q[k], expect, atol=1e-5), (k, q[k], expect)


def test_qr_concat_halves_the_width_of_both_matrices(tiny_ckpt):
    ck = compress(_ck(tiny_ckpt), parse_methods("qr", {"collisions": 4, "op": "concat"}),
                  Context(select=Selection(names=("C1",))))
    t = ck.model.tables["C1"]
    assert t.op == "concat" and tuple(t.q.shape) == (200, 4) and tuple(t.r.shape) == (4, 4)
    ids = torch.tensor([0, 5, 799])
    assert torch.equal(t.lookup(ids), torch.cat([t.q.detach()[ids // 4], t.r.detach()[ids % 4]], 1))


@pytest.mark.parametrize("methods,params,msg", [
    ("tt", {"tt_rank": 0}, "--tt-rank 0 is impossible"),
    ("tt", {}, "exactly one of --tt-rank, --ratio or --tol"),
    ("qr", {"collisions": 801}, "--collisions 801 is impossible for a table of 800 rows"),
    ("hash", {"buckets": 800}, "not below the table's 800 rows"),
    ("hash", {"ratio": 0.5}, "does not compress"),
    ("int8", {"align": 3}, "not a power of two"),
])
def test_bad_parameters_give_one_line_errors(tiny_ckpt, methods, params, msg):
    with pytest.raises(UserError, match=msg) as e:
        compress(_ck(tiny_ckpt), parse_methods(methods, params), Context(select=Selection(names=("C1",))))
    assert "\n" not in e.value.message


def test_unknown_methods_suggest_the_nearest():
    with pytest.raises(UserError, match="int3 is not a supported row-wise format") as e:
        parse_methods("int3")
    assert "fp16, bf16, int8, int4" in e.value.hint
    with pytest.raises(UserError, match="unknown method 'ttt'"):
        parse_methods("ttt")


def test_dense_table_is_unchanged_by_the_storage_refactor():
    t = DenseTable(10, 4, torch.arange(40.).view(10, 4))
    assert list(t.state_dict()) == ["weight"] and t.form == "dense"
    assert t.lookup_cost() == {"rows_read": 1.0, "bytes_useful": 16.0, "bytes_read_gpu": 32.0,
                               "bytes_read_cpu": 64.0, "flops": 0}


def test_hashed_and_dense_tables_fuse_into_one_lookup(tiny_ckpt, tiny_data, tmp_path):
    from recompress.export.graph import deploy

    from recompress.models.dlrm import Scorer
    ck = compress(_ck(tiny_ckpt), parse_methods("hash@C1+C2,int8", {"ratio": 4}), Context())
    g = deploy(Scorer(ck.model)).eval()
    groups = g.model.fused.groups
    assert len(groups) == 1 and groups[0].hashed and groups[0].rows.store is not None
    gen = _gen(8)
    sparse = torch.stack([torch.randint(-1, r, (6, 3), generator=gen) for r in (800, 200, 40, 7)], 1)
    dense = torch.rand(6, 13, generator=gen)
    with torch.no_grad():
        assert torch.allclose(g(dense, sparse), torch.sigmoid(ck.model(dense, sparse)), atol=1e-6)
    assert ck.model.fused is None  # the checkpoint's own model is untouched
    m = export_checkpoint(ck, "onnx", tmp_path / "h", data=tiny_data)
    assert m["parity"]["passed"]
    for methods, params, n_groups in [("qr@C1+C2,int8", {"collisions": 8}, 2),      # qr(C1, C2) + dense(C3, C4)
                                      ("freqhash@C2+C1", {"ratio": 3}, 2), ("tt@C2", {"tt_rank": 2}, 2)]:
        mixed = compress(_ck(tiny_ckpt), parse_methods(methods, params), Context(tiny_data))
        g = deploy(Scorer(mixed.model)).eval()
        assert len(g.model.fused.groups) == n_groups
        with torch.no_grad():
            assert torch.allclose(g(dense, sparse), torch.sigmoid(mixed.model(dense, sparse)), atol=1e-6)


def _plain_tt_svd(w: torch.Tensor, rs: list[int], ds: list[int], ranks: list[int]) -> torch.Tensor:
    """Oseledets' TT-SVD written out with full SVDs of each unfolding (zero-padded rows): the reconstruction."""
    full = torch.zeros(math.prod(rs), w.shape[1], dtype=torch.float64)
    full[:w.shape[0]] = w.double()
    K = len(rs)
    t = full.view(*rs, *ds).permute(*[p for k in range(K) for p in (k, K + k)])  # [n1, d1, n2, d2, ...]
    cores, r, rest = [], 1, t.reshape(rs[0] * ds[0], -1)
    for k in range(K - 1):
        U, S, Vh = torch.linalg.svd(rest, full_matrices=False)
        rk = min(ranks[k + 1], len(S))
        cores.append(U[:, :rk].reshape(r, rs[k], ds[k], rk))
        rest = (S[:rk, None] * Vh[:rk]).reshape(rk * rs[k + 1] * ds[k + 1], -1)
        r = rk
    cores.append(rest.reshape(r, rs[-1], ds[-1], 1))
    out = cores[0]
    for c in cores[1:]:
        out = torch.tensordot(out, c, dims=([out.dim() - 1], [0]))
    out = out.reshape(*[x for k in range(K) for x in (rs[k], ds[k])])  # [n1, d1, n2, d2, ...]
    out = out.permute(*range(0, 2 * K, 2), *range(1, 2 * K, 2)).reshape(math.prod(rs), -1)
    return out[:w.shape[0]]


@pytest.mark.parametrize(("rows", "dim", "cores", "rank"), [(5003, 16, 3, 5), (5003, 16, 3, 40), (2000, 8, 4, 4),
                                                             (700, 4, 3, 2)])
def test_tt_svd_truncates_as_plain_svds_do(monkeypatch, rows, dim, cores, rank):
    """Streamed TT-SVD (many small chunks) reconstructs what full SVDs of each unfolding give at the same ranks."""
    import recompress.compress.tt as tt
    monkeypatch.setattr(tt, "GATHER_BYTES", 4096)
    g = _gen(9)
    w = torch.randn(rows, 3, generator=g) @ torch.randn(3, dim, generator=g) + 0.3 * torch.randn(rows, dim, generator=g)
    rs, ds, ranks, _ = plan(rows, dim, {"tt_rank": rank, "cores": cores})
    got = tt_svd(w, rs, ds, ranks, None)
    assert got.ranks == ranks
    want = _plain_tt_svd(w, rs, ds, ranks)
    assert float((got.dense_weight().double() - want).norm() / want.norm()) < 1e-4
    assert float((want - w).norm() / w.norm()) > 1e-3 or rank == 40  # truncated: the test compares real choices


def _plain_qr_fit(w: torch.Tensor, c: int, op: str, iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """QR fitted to w by the closed forms written out row by row: concat's half means; add and mult by
    alternating least squares from q = 0 / 1, r first (per column: q_j = sum W r / sum r^2 and so on)."""
    w = w.double()
    n, d = w.shape
    nq = -(-n // c)
    qi, ri = torch.arange(n) // c, torch.arange(n) % c
    mean = lambda vals, idx, k: torch.stack([vals[idx == j].mean(0) for j in range(k)])
    if op == "concat":
        return mean(w[:, :d // 2], qi, nq), mean(w[:, d // 2:], ri, c)
    q = torch.zeros(nq, d, dtype=torch.float64) if op == "add" else torch.ones(nq, d, dtype=torch.float64)
    for _ in range(iters):
        if op == "add":
            r = mean(w - q[qi], ri, c)
            q = mean(w - r[ri], qi, nq)
        else:
            r = torch.stack([(w[ri == k] * q[qi[ri == k]]).sum(0) / (q[qi[ri == k]] ** 2).sum(0) for k in range(c)])
            q = torch.stack([(w[qi == j] * r[ri[qi == j]]).sum(0) / (r[ri[qi == j]] ** 2).sum(0) for j in range(nq)])
    return q, r


@pytest.mark.parametrize("op", ["mult", "add", "concat"])
def test_qr_fit_is_the_alternating_least_squares_written_out(monkeypatch, op):
    """Fitted in blocks of whole quotient segments (many, a last one cut short), q never held whole."""
    import recompress.compress.hashing as hashing
    monkeypatch.setattr(hashing, "CHUNK", 20)
    w = torch.randn(203, 6, generator=_gen(4)) + 1.0
    t = hashing.make_qr(203, 6, {"collisions": 7, "op": op})
    record = {}
    assert hashing._fit_qr(t, w, None, record) is None
    q, r = _plain_qr_fit(w, 7, op)
    assert torch.allclose(t.q.detach().double(), q, atol=1e-5) and torch.allclose(t.r.detach().double(), r, atol=1e-5)
    ref = t.dense_weight().double()
    assert record["rel_error"] == round(float((ref - w.double()).norm() / w.double().norm()), 6)
