"""TorchRec state dicts: DLRM rebuilt to score as TorchRec's forward does, from a flat state dict, from
per-rank ShardedTensor files and from DCP folders (row-wise and column-wise shards), all written here by
torch's own sharding code in two gloo processes; missing shards and hostile metadata are refused; the tables
of each stream through data-free compression without being loaded."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from recompress.adapters import describe, load_any
from recompress.adapters.torchrec import triu_permutation
from recompress.errors import UserError

from .conftest import tree_hash

ROWS, D = (40, 7, 23), 4
PREFIX = "sparse_arch.embedding_bag_collection.embedding_bags"


def torchrec_state(seed: int = 0, rows: tuple[int, ...] = ROWS, dim: int = D) -> dict[str, torch.Tensor]:
    """torchrec.models.dlrm.DLRM's keys: 3 tables t_a, t_b, t_c of width 4, dense arch 5 -> 8 -> 4, over arch
    (D + F + F(F-1)/2 = 4 + 3 + 3) -> 8 -> 1."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.4
    sd = {f"{PREFIX}.{n}.weight": r(n_rows, dim) for n, n_rows in zip(("t_a", "t_b", "t_c"), rows)}
    for key, (o, i) in {"dense_arch.model._mlp.0._linear": (8, 5), "dense_arch.model._mlp.1._linear": (dim, 8),
                        "over_arch.model.0._mlp.0._linear": (8, dim + 6), "over_arch.model.1": (1, 8)}.items():
        sd[f"{key}.weight"], sd[f"{key}.bias"] = r(o, i), r(o)
    return sd


def torchrec_forward(sd, dense, ids):
    """TorchRec's DLRM forward from its formulas: ReLU MLPs, one pooled row per feature, the dots of
    [dense, sparse...] at triu_indices(F + 1, F + 1, offset=1), then the over arch (last layer linear)."""
    x = F.relu(F.relu(dense @ sd["dense_arch.model._mlp.0._linear.weight"].T + sd["dense_arch.model._mlp.0._linear.bias"])
               @ sd["dense_arch.model._mlp.1._linear.weight"].T + sd["dense_arch.model._mlp.1._linear.bias"])
    rows = [sd[f"{PREFIX}.{n}.weight"][ids[:, t]] for t, n in enumerate(("t_a", "t_b", "t_c"))]
    combined = torch.stack([x, *rows], 1)
    z = combined @ combined.transpose(1, 2)
    iu = torch.triu_indices(4, 4, offset=1)
    h = torch.cat([x, z[:, iu[0], iu[1]]], 1)
    h = F.relu(h @ sd["over_arch.model.0._mlp.0._linear.weight"].T + sd["over_arch.model.0._mlp.0._linear.bias"])
    return (h @ sd["over_arch.model.1.weight"].T + sd["over_arch.model.1.bias"]).squeeze(-1)


def inputs(n=17, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 5, generator=g), torch.stack([torch.randint(0, r, (n,), generator=g) for r in ROWS], 1)


def assert_scores_like_torchrec(ckpt, sd):
    dense, ids = inputs()
    with torch.no_grad():
        assert torch.allclose(ckpt.model(dense, ids.unsqueeze(-1)), torchrec_forward(sd, dense, ids), atol=1e-5)


def test_triu_permutation_maps_dlrms_pair_order_to_torchrecs():
    perm = triu_permutation(3)  # ours: (1,0) (2,0) (2,1) (3,0) (3,1) (3,2); TorchRec: (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    assert perm == [0, 1, 3, 2, 4, 5]


@pytest.mark.parametrize("wrap", ["", "model.", "_orig_mod.model."])  # DLRMTrain, and torch.compile around it
def test_torchrec_dlrm_state_dict_scores_as_torchrec(tmp_path, wrap):
    sd = torchrec_state()
    torch.save({wrap + k: v for k, v in sd.items()}, tmp_path / "dlrm.pt")
    found = describe(tmp_path / "dlrm.pt")
    assert found.format == "torchrec" and [t.name for t in found.tables] == ["t_a", "t_b", "t_c"]
    assert_scores_like_torchrec(load_any(tmp_path / "dlrm.pt"), sd)


def test_a_bare_collection_is_described_not_built(tmp_path):
    sd = {k: v for k, v in torchrec_state().items() if k.startswith(PREFIX)}
    torch.save(sd, tmp_path / "ebc.pt")
    found = describe(tmp_path / "ebc.pt")
    assert [(t.name, t.rows, t.dim) for t in found.tables] == [("t_a", 40, 4), ("t_b", 7, 4), ("t_c", 23, 4)]
    with pytest.raises(UserError, match="holds TorchRec embedding tables but no model"):
        load_any(tmp_path / "ebc.pt")


SHARD = '''
import os, sys, torch, torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata, init_from_local_shards

def work(rank, out, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    sd = torch.load(os.path.join(out, "full.pt"))
    state = {}
    for k, v in sd.items():
        if ".embedding_bags." in k:  # row-wise: rank 0 the first half of the rows, rank 1 the rest
            cut = v.shape[0] // 2 + 1
            off, n = (0, cut) if rank == 0 else (cut, v.shape[0] - cut)
            shard = Shard(v[off:off + n].clone(), ShardMetadata([off, 0], [n, v.shape[1]], f"rank:{rank}/cpu"))
            state[k] = init_from_local_shards([shard], list(v.shape))
        else:
            state[k] = v
    torch.save({"model." + k: v for k, v in state.items()}, os.path.join(out, "ranks", f"model_rank{rank}.pt"))
    dcp.save({"model": state}, checkpoint_id=os.path.join(out, "dcp"))
    for k, v in sd.items():  # column-wise: rank 0 the first 3 columns of every row, rank 1 the last one
        if ".embedding_bags." in k:
            off, n = (0, 3) if rank == 0 else (3, 1)
            shard = Shard(v[:, off:off + n].clone(), ShardMetadata([0, off], [v.shape[0], n], f"rank:{rank}/cpu"))
            state[k] = init_from_local_shards([shard], list(v.shape))
    dcp.save({"model": state}, checkpoint_id=os.path.join(out, "dcp_cols"))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard as Cut, distribute_tensor
    mesh = init_device_mesh("cpu", (2,))  # FSDP2's layout: cut as torch.chunk cuts (40: 20+20, 7: 4+3, 1: 1+0)
    placed = {k: distribute_tensor(v, mesh, [Cut(1) if k.endswith("t_c.weight") else Replicate() if "_linear.weight" in k
                                             else Cut(0)]) for k, v in sd.items()}
    torch.save(placed, os.path.join(out, "dtensor", f"rank{rank}.pt"))
    partial = DTensor.from_local(sd[next(iter(sd))] / 2, mesh, [Partial()])
    torch.save({**sd, next(iter(sd)): partial}, os.path.join(out, "partial", f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(work, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
'''


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    for folder in ("ranks", "dtensor", "partial"):
        (out / folder).mkdir()
    sd = torchrec_state(seed=4)
    torch.save(sd, out / "full.pt")
    (out / "shard.py").write_text(SHARD)
    r = subprocess.run([sys.executable, str(out / "shard.py"), str(out), str(29400 + os.getpid() % 500)],
                       capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return out, sd


@pytest.mark.parametrize("assemble", [False, True])
def test_per_rank_sharded_tensor_files_merge_offline(sharded, monkeypatch, assemble):
    # assemble: every table counts as big (MAP_BYTES 0), so its row-wise pieces go through Stored._assembled
    # (into memory here: Scratch keeps its own 16 MB threshold; test_mapped_load covers the file): same scores
    out, sd = sharded
    if assemble:
        monkeypatch.setattr("recompress.adapters.stored.MAP_BYTES", 0)
    before = tree_hash(out / "ranks")
    assert_scores_like_torchrec(load_any(out / "ranks"), sd)  # no process group here
    assert tree_hash(out / "ranks") == before


def test_per_rank_dtensor_files_merge_offline(sharded, tmp_path):
    """FSDP2-style DTensor state dicts, one torch.save per rank: rows and columns cut as torch.chunk cuts them
    (the last layer's one bias value: rank 1's shard is empty, placed at the end as torch places it), replicated
    layers taken once; a missing rank and a Partial placement are refused by name."""
    out, sd = sharded
    before = tree_hash(out / "dtensor")
    assert_scores_like_torchrec(load_any(out / "dtensor"), sd)
    assert tree_hash(out / "dtensor") == before
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "rank1.pt").write_bytes((out / "dtensor" / "rank1.pt").read_bytes())
    with pytest.raises(UserError, match=r"the chunks of \S*t_a\.weight cover it with gaps \(80 of 160 values missing\)"):
        load_any(tmp_path / "one")
    with pytest.raises(UserError, match=r"is a DTensor placed as Partial \(Partial is not read\)"):
        load_any(out / "partial")


FSDP2 = '''
import os, sys, torch, torch.distributed as dist
import torch.multiprocessing as mp

def work(rank, out, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=4)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (4,))
    sd = torch.load(os.path.join(out, "full.pt"))
    torch.save({k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in sd.items()}, os.path.join(out, "ranks", f"r{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(work, args=(sys.argv[1], int(sys.argv[2])), nprocs=4)
'''


def test_fsdp2_files_of_four_ranks_place_empty_shards_where_torch_does(tmp_path):
    """Found by an independent review: FSDP2's default, every parameter Shard(0) over 4 ranks; the last layer's
    single bias value leaves ranks 1-3 empty shards, which torch places at offset 1 (not 1, 2, 3): refused before."""
    sd = torchrec_state(seed=8)
    (tmp_path / "ranks").mkdir()
    torch.save(sd, tmp_path / "full.pt")
    (tmp_path / "fsdp2.py").write_text(FSDP2)
    r = subprocess.run([sys.executable, str(tmp_path / "fsdp2.py"), str(tmp_path), str(29900 + os.getpid() % 90)],
                       capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert_scores_like_torchrec(load_any(tmp_path / "ranks"), sd)


@pytest.mark.parametrize("assemble", [False, True])
def test_a_dcp_folder_merges_offline(sharded, monkeypatch, assemble):
    out, sd = sharded
    if assemble:
        monkeypatch.setattr("recompress.adapters.stored.MAP_BYTES", 0)
    assert sorted(p.name for p in (out / "dcp").iterdir() if p.suffix == ".distcp") == ["__0_0.distcp", "__1_0.distcp"]
    assert_scores_like_torchrec(load_any(out / "dcp"), sd)


def test_missing_shards_are_refused_with_what_is_missing(sharded, tmp_path):
    out, _ = sharded
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "model_rank0.pt").write_bytes((out / "ranks" / "model_rank0.pt").read_bytes())
    with pytest.raises(UserError, match=r"cover it with gaps \(\d+ of 160 values missing\)"):
        load_any(tmp_path / "one")
    import shutil
    shutil.copytree(out / "dcp", tmp_path / "dcp")
    (tmp_path / "dcp" / "__1_0.distcp").unlink()
    with pytest.raises(UserError, match="which is missing"):
        load_any(tmp_path / "dcp")


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-dcp",))


def test_hostile_dcp_metadata_is_refused_without_running(sharded, tmp_path, monkeypatch):
    import shutil
    out, _ = sharded
    shutil.copytree(out / "dcp", tmp_path / "dcp")
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": Evil()}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"\.metadata would run code when unpickled: it calls posix\.system"):
        load_any(tmp_path / "dcp")
    assert not (tmp_path / "pwned-by-dcp").exists()


def test_tbe_rows_are_the_bytes_torchrec_stores():
    """The fused row TorchRec 1.9.2's quantized collection (QEBC.from_float, qint8) stored for [0, 1, ..., 6, 7.5]:
    fp16 scale 7.5 / 255, fp16 bias 0, the values, zero padding to 16 bytes."""
    from recompress.tables import DenseTable, tbe_rows
    t = DenseTable(1, 8, torch.tensor([[0.0, 1, 2, 3, 4, 5, 6, 7.5]]))
    t.quantize("int8")
    fused = tbe_rows.pack(t.stores["weight"])
    assert fused.tolist() == [[136, 39, 0, 0, 0, 34, 68, 102, 136, 170, 204, 255, 0, 0, 0, 0]]
    back = tbe_rows.unpack(fused, 8, "int8")
    assert back["data"].tolist() == [[0, 34, 68, 102, 136, 170, 204, 255]] and float(back["bias"][0]) == 0.0
    assert tbe_rows.formats_of(32, 16) == ["int8"] and tbe_rows.formats_of(16, 20) == ["int4"]
    assert tbe_rows.formats_of(16, 8) == ["int8", "int4"] and tbe_rows.formats_of(17, 8) == []


@pytest.mark.parametrize("method", [None, "int8", "int4", "tt"])
def test_export_to_torchrec_reads_back_as_the_checkpoint(tmp_path, method):
    from click.testing import CliRunner

    from recompress.checkpoint import load_checkpoint
    from recompress.cli import main
    sd = torchrec_state(seed=5)
    torch.save(sd, tmp_path / "dlrm.pt")
    src = tmp_path / "dlrm.pt"
    if method:
        args = ["checkpoint", str(src), "--method", method, "-o", str(tmp_path / "c")] + (["--tt-rank", "2"] if method == "tt" else [])
        assert CliRunner().invoke(main, args).exit_code == 0
        src = tmp_path / "c"
    res = CliRunner().invoke(main, ["export", str(src), "--target", "torchrec", "-o", str(tmp_path / "x")])
    assert res.exit_code == 0, res.output
    out = torch.load(tmp_path / "x" / "model.pt", weights_only=True)
    assert list(out) == list(sd)  # TorchRec's keys, in its order
    w = out[f"{PREFIX}.t_a.weight"]
    assert (w.dtype, tuple(w.shape)) == {None: (torch.float32, (40, 4)), "tt": (torch.float32, (40, 4)),
                                         "int8": (torch.uint8, (40, 16)), "int4": (torch.uint8, (40, 16))}[method]
    reference = load_any(tmp_path / "dlrm.pt") if method is None else load_checkpoint(src)
    dense, ids = inputs()
    hp = {"quantized_rows": method} if method in ("int8", "int4") else None  # width 4: both pad to 16 bytes
    if hp:
        with pytest.raises(UserError, match="does not say quantized_rows"):
            load_any(tmp_path / "x" / "model.pt")
    with torch.no_grad():
        got, want = load_any(tmp_path / "x" / "model.pt", hp).model(dense, ids.unsqueeze(-1)), reference.model(dense, ids.unsqueeze(-1))
    assert torch.allclose(got, want, atol={"int8": 2e-3}.get(method, 1e-6))
    if method is None:
        assert torch.equal(out["over_arch.model.0._mlp.0._linear.weight"], sd["over_arch.model.0._mlp.0._linear.weight"])


DLRM_V3 = '''
import sys, torch
import torch.distributed.checkpoint as dcp
out = sys.argv[1]
tables = {"item_id": torch.randn(50, 8), "user_id": torch.randn(30, 8)}
dcp.save({"sparse_dict": {f"_embedding_collection.embeddings.{k}.weight": v for k, v in tables.items()}},
         checkpoint_id=out + "/sparse")
torch.save({"dense_dict": {"_hstu_transducer.w": torch.ones(3)}, "optimizer_dict": {},
            "sparse_tensor_keys": {"_embedding_collection.embeddings.item_id.weight"}}, out + "/non_sparse.ckpt")
'''


def test_dlrm_v3_checkpoints_are_described_and_a_missing_part_is_named(tmp_path):
    """save_dmp_checkpoint's layout: non_sparse.ckpt + a DCP sparse/ folder in one timestamped folder."""
    run = tmp_path / "2026_12_06_10_00_00"
    run.mkdir()
    (tmp_path / "make.py").write_text(DLRM_V3)
    r = subprocess.run([sys.executable, str(tmp_path / "make.py"), str(run)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    found = describe(run)
    assert found.format == "dlrm_v3" and [(t.name, t.rows, t.dim) for t in found.tables] == [("item_id", 50, 8), ("user_id", 30, 8)]
    with pytest.raises(UserError, match="is a dlrm_v3 checkpoint recompress does not rebuild: its tables"):
        load_any(run)
    with pytest.raises(UserError, match="is one part of a dlrm_v3 checkpoint"):
        describe(run / "sparse")
    import shutil
    shutil.move(run / "non_sparse.ckpt", tmp_path / "elsewhere.ckpt")
    with pytest.raises(UserError, match=r"holds the sparse part \(sparse/\) of a dlrm_v3 checkpoint but not non_sparse.ckpt"):
        describe(run)
    shutil.move(tmp_path / "elsewhere.ckpt", run / "non_sparse.ckpt")
    shutil.rmtree(run / "sparse")
    with pytest.raises(UserError, match=r"holds the dense part \(non_sparse.ckpt\) of a dlrm_v3 checkpoint but not sparse"):
        describe(run)


def test_a_size_the_metadata_states_is_checked_before_it_is_allocated(sharded, tmp_path):
    """Found by an independent review: a DCP table claimed to be 10^6 x 10^6 was allocated (4 TB) first."""
    import shutil
    out, _ = sharded
    shutil.copytree(out / "dcp", tmp_path / "dcp")
    meta = pickle.loads((tmp_path / "dcp" / ".metadata").read_bytes())  # our own test file: torch's classes
    key = next(k for k in meta.state_dict_metadata if k.endswith("t_a.weight"))
    meta.state_dict_metadata[key].size = torch.Size([10**6, 10**6])
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(UserError, match=r"cover it with gaps \(999,999,999,840 of 1,000,000,000,000 values missing\)"):
        load_any(tmp_path / "dcp")


STREAMED = [("int8", {}), ("tt,int8", {"tt_rank": 2}), ("lowrank", {"rank": 2})]


@pytest.mark.parametrize("source", ["full.pt", "ranks", "dtensor", "dcp", "dcp_cols"])
@pytest.mark.parametrize("method,params", STREAMED, ids=[m for m, _ in STREAMED])
def test_upstream_tables_stream_into_the_checkpoint_the_in_memory_path_writes(sharded, tmp_path, monkeypatch, source,
                                                                             method, params):
    """Every table left in the upstream files (a plain torch file, per-rank shard files, DCP with row-wise and
    column-wise chunks) and read by row blocks: the same checkpoint, bit for bit, as loading the model whole."""
    from click.testing import CliRunner

    import recompress.adapters
    from recompress.adapters import load_streamed
    from recompress.checkpoint import load_checkpoint, save_checkpoint
    from recompress.cli import main
    from recompress.compress.registry import Context, compress, parse_methods
    out, sd = sharded
    src = out / source
    ref = compress(load_any(src), parse_methods(method, params), Context())
    ref.spec.provenance.setdefault("compressed_from", str(src))
    save_checkpoint(ref, tmp_path / "ref")
    ckpt, rows = load_streamed(src)
    assert sorted(rows) == ["t_a", "t_b", "t_c"] and all(t.weight.is_meta for t in ckpt.model.tables.values())
    assert torch.equal(rows["t_a"][5:33], sd[f"{PREFIX}.t_a.weight"][5:33])  # rows that straddle the shards
    before = tree_hash(out)
    monkeypatch.setattr(recompress.adapters, "load_any", lambda *a: pytest.fail("the model was loaded whole"))
    flags = [str(x) for k, v in params.items() for x in (f"--{k.replace('_', '-')}", v)]
    res = CliRunner().invoke(main, ["checkpoint", str(src), "--method", method, *flags, "-o", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    a, b = load_checkpoint(tmp_path / "ref"), load_checkpoint(tmp_path / "s")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.spec.to_json() == b.spec.to_json()
    assert tree_hash(out) == before


@pytest.mark.parametrize("shared", [False, True])
def test_a_nan_in_a_table_left_in_its_file_is_refused_and_nothing_is_written(tmp_path, shared):
    """shared: one tensor saved for two tables (the review found the message naming only the second)."""
    from click.testing import CliRunner

    from recompress.cli import main
    sd = torchrec_state(seed=6, rows=(40, 7, 7) if shared else ROWS)
    if shared:
        sd[f"{PREFIX}.t_c.weight"] = sd[f"{PREFIX}.t_b.weight"]
    sd[f"{PREFIX}.t_b.weight"][3, 1] = float("inf")
    torch.save(sd, tmp_path / "dlrm.pt")
    res = CliRunner().invoke(main, ["checkpoint", str(tmp_path / "dlrm.pt"), "--method", "int8", "-o", str(tmp_path / "q")])
    name = "t_b.weight and t_c.weight" if shared else "t_b.weight"
    assert res.exit_code == 2 and f"'{name}' has 1 NaN/Inf values" in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dlrm.pt"]


BIG_DCP = """
import sys, warnings, torch
import torch.distributed.checkpoint as dcp
sys.path.insert(0, sys.argv[3])
from tests.test_torchrec_format import torchrec_state
warnings.simplefilter("ignore")  # DCP without a process group says it saves as one process
sd = torchrec_state(rows=(int(sys.argv[2]), 7, 23), dim=64)
dcp.save({"model": sd}, checkpoint_id=sys.argv[1])
print(sd[next(k for k in sd if k.endswith("t_a.weight"))].numel() * 4)
"""


@pytest.mark.big
def test_int8_of_a_big_dcp_table_does_not_load_it(tmp_path):
    """A 2M x 64 table (512 MB) in a DCP folder: the streamed int8 run stays within 0.25x the table of the same
    command on a 1,000-row table; merging the chunks in memory, as before, took > 1x."""
    from .test_stream import _peak_rss
    root = str(Path(__file__).resolve().parents[1])
    make = lambda name, rows: int(subprocess.run([sys.executable, "-c", BIG_DCP, str(tmp_path / name), str(rows), root],
                                                 capture_output=True, text=True, check=True).stdout)
    table, _ = make("big", 2_000_000), make("small", 1000)
    run = [sys.executable, "-m", "recompress", "checkpoint"]
    base = _peak_rss([*run, str(tmp_path / "small"), "--method", "int8", "-o", str(tmp_path / "o1")])
    peak = _peak_rss([*run, str(tmp_path / "big"), "--method", "int8", "-o", str(tmp_path / "o2")])
    assert peak - base < 0.25 * table, (peak, base)


@pytest.mark.parametrize("damage", ["a flipped byte", "a local header moved"])
def test_a_damaged_record_left_in_its_file_is_refused_by_its_crc(tmp_path, damage):
    """Found by an independent review: the streamed path read a table's bytes without the zip's CRC-32 check that
    torch.load and the in-memory path make, and wrote a checkpoint from a damaged file (a moved header: every value
    shifted by one)."""
    import zipfile

    from click.testing import CliRunner

    from recompress.cli import main
    torch.save(torchrec_state(seed=7), tmp_path / "dlrm.pt")
    with zipfile.ZipFile(tmp_path / "dlrm.pt") as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size == 40 * D * 4)  # t_a's rows
    raw = bytearray((tmp_path / "dlrm.pt").read_bytes())
    head = info.header_offset
    begin = head + 30 + int.from_bytes(raw[head + 26:head + 28], "little") + int.from_bytes(raw[head + 28:head + 30], "little")
    if damage == "a flipped byte":
        raw[begin + 101] ^= 0x10
    else:  # the extra field 4 bytes longer: the record's data seems to start 4 bytes later
        raw[head + 28:head + 30] = (int.from_bytes(raw[head + 28:head + 30], "little") + 4).to_bytes(2, "little")
    (tmp_path / "dlrm.pt").write_bytes(bytes(raw))
    res = CliRunner().invoke(main, ["checkpoint", str(tmp_path / "dlrm.pt"), "--method", "int8", "-o", str(tmp_path / "q")])
    assert res.exit_code == 2 and "do not match the CRC-32 its archive records" in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dlrm.pt"]


def _fake_dtensor_files(folder: Path, sd: dict, local, shape, placements, coords) -> None:
    """Per-rank files whose t_a is a DTensor-like record: objects of classes named as torch's, in a module under
    torch.distributed.tensor (what the reader stubs), with the given fields."""
    import types
    mod = types.ModuleType("torch.distributed.tensor._recompress_test")
    sys.modules[mod.__name__] = mod
    def cls(name, **extra):
        c = type(name, (), {"__module__": mod.__name__, "__qualname__": name, **extra})
        setattr(mod, name, c)
        return c
    DT, Spec, Mesh, Shard, Meta = cls("DTensor"), cls("DTensorSpec"), cls("DeviceMesh"), cls("Shard"), \
        cls("TensorMeta", __getnewargs__=lambda self: self.a)
    def mk(c, **state):
        o = c.__new__(c)
        o.__dict__.update(state)
        return o
    key = f"{PREFIX}.t_a.weight"
    folder.mkdir()
    for r in range(2):
        meta = mk(Meta, a=(shape, (4, 1), torch.float32))
        dt = mk(DT, _local_tensor=local(r), _spec=mk(Spec, mesh=mk(Mesh, _coordinate_on_dim=coords(r)),
                                                    placements=tuple(mk(Shard, dim=d) for d in placements), tensor_meta=meta))
        torch.save({**sd, key: dt}, folder / f"rank{r}.pt")


BROKEN_DTENSORS = {"a dimension it does not have": dict(placements=(7,)), "coordinates that are no list": dict(coords=lambda r: r),
                   "coordinates that are not numbers": dict(coords=lambda r: ["x"]),
                   "no local tensor": dict(local=lambda r: "not a tensor"), "a shape of words": dict(shape=("x", 4))}


@pytest.mark.parametrize("how", list(BROKEN_DTENSORS))
def test_a_broken_dtensor_record_is_one_clear_error(tmp_path, how):
    """Found by an independent review: these raised IndexError/TypeError/ValueError tracebacks."""
    from click.testing import CliRunner

    from recompress.cli import main
    sd = torchrec_state(seed=9)
    w = sd[f"{PREFIX}.t_a.weight"]
    fields = {"local": lambda r: w[:20].clone() if r == 0 else w[20:].clone(), "shape": tuple(w.shape), "placements": (0,),
              "coords": lambda r: [r], **BROKEN_DTENSORS[how]}
    _fake_dtensor_files(tmp_path / "ranks", sd, **fields)
    res = CliRunner().invoke(main, ["checkpoint", str(tmp_path / "ranks"), "--method", "int8", "-o", str(tmp_path / "q")])
    assert res.exit_code == 2 and "is not a readable DTensor" in res.output, (res.output, res.exception)
    assert not (tmp_path / "q").exists()


def test_a_well_formed_record_of_the_same_kind_reads(tmp_path):
    """The records above, well formed: read as the state dict they hold (so the refusals are about the damage)."""
    sd = torchrec_state(seed=9)
    w = sd[f"{PREFIX}.t_a.weight"]
    _fake_dtensor_files(tmp_path / "ranks", sd, lambda r: w[:20].clone() if r == 0 else w[20:].clone(), tuple(w.shape),
                        (0,), lambda r: [r])
    assert_scores_like_torchrec(load_any(tmp_path / "ranks"), sd)


def test_a_column_major_table_is_read_whole_with_its_strides(tmp_path, monkeypatch):
    """Found by an independent review: a table saved column-major (a transposed view) cannot stream by rows, so it is
    read whole; it was re-laid row-major, and lowrank then differed from the in-memory path in the last bits."""
    from click.testing import CliRunner

    import recompress.compress.stream
    from recompress.adapters import load_streamed
    from recompress.checkpoint import load_checkpoint
    from recompress.cli import main
    sd = torchrec_state(seed=10)
    key = f"{PREFIX}.t_a.weight"
    sd[key] = sd[key].t().contiguous().t()
    torch.save(sd, tmp_path / "dlrm.pt")
    ckpt, rows = load_streamed(tmp_path / "dlrm.pt")
    assert sorted(rows) == ["t_b", "t_c"] and ckpt.model.tables["t_a"].weight.stride() == (1, 40)
    args = ["checkpoint", str(tmp_path / "dlrm.pt"), "--method", "lowrank", "--rank", "2", "-o"]
    assert CliRunner().invoke(main, [*args, str(tmp_path / "s")]).exit_code == 0
    monkeypatch.setattr(recompress.compress.stream, "streams", lambda *a: False)
    assert CliRunner().invoke(main, [*args, str(tmp_path / "m")]).exit_code == 0
    a, b = load_checkpoint(tmp_path / "s").model.state_dict(), load_checkpoint(tmp_path / "m").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("layout", ["dlrm", "torchrec", "hstu"])
def test_optimizer_state_saved_beside_the_model_is_never_read_by_streaming(tmp_path, monkeypatch, layout):
    """Adagrad/Adam state is as large as the tables (dlrm --optimizer adagrad, TorchRec's fused optimizers,
    train.py's Adam): a streamed compression reads the model and leaves the optimizer's tensors in the file.
    The optimizer tensors here are 41 x 3 (a shape nothing in the model has); none may be read."""
    from click.testing import CliRunner

    from recompress.adapters import stored
    from recompress.cli import main

    from .test_checkpoints import dlrm_state
    from .test_upstream_formats import write_research_hstu
    moments = {"state": {i: {"exp_avg": torch.randn(41, 3), "sum": torch.randn(41, 3)} for i in range(3)},
               "param_groups": [{"lr": 0.1, "params": [0, 1, 2]}]}
    name = tmp_path / "model.pt"
    if layout == "dlrm":
        obj = {"state_dict": dlrm_state(), "opt_state_dict": moments, "nepochs": 1}
    elif layout == "torchrec":
        obj = {"model": torchrec_state(seed=3), "optimizer": moments}
    else:
        name = write_research_hstu(tmp_path)[0]
        obj = {**torch.load(name, weights_only=True), "optimizer_state_dict": moments}
    torch.save(obj, name)
    shapes = []
    load = stored.Stored.load
    monkeypatch.setattr(stored.Stored, "load", lambda self: shapes.append(tuple(self.size)) or load(self))
    res = CliRunner().invoke(main, ["checkpoint", str(name), "--method", "int8", "-o", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    assert shapes and (41, 3) not in shapes, shapes


def test_a_table_whose_name_contains_optim_is_still_read(tmp_path):
    """Found by a review: the optimizer filter matched 'optim' anywhere, so a column-major table named
    t_optimization_goal (read whole, not streamed) was left unread and the streamed run failed."""
    from click.testing import CliRunner

    from recompress.cli import main
    sd = {k.replace(".t_b.", ".t_optimization_goal."): v for k, v in torchrec_state(seed=4).items()}
    key = f"{PREFIX}.t_optimization_goal.weight"
    sd[key] = sd[key].t().contiguous().t()  # column-major: read whole
    torch.save({"model": sd, "optim": {"state": {}}}, tmp_path / "m.pt")
    res = CliRunner().invoke(main, ["checkpoint", str(tmp_path / "m.pt"), "--method", "lowrank", "--rank", "2",
                                    "-o", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output


def test_a_table_of_zero_rows_is_refused_by_name(tmp_path):
    """Found by a review: a 0-row table left in its file reached the writer as a meta tensor (traceback streamed;
    in memory, a checkpoint written that its own loader refuses)."""
    from click.testing import CliRunner

    from recompress.cli import main
    torch.save(torchrec_state(rows=(40, 0, 23)), tmp_path / "m.pt")
    for method in ("int8", "tt"):
        res = CliRunner().invoke(main, ["checkpoint", str(tmp_path / "m.pt"), "--method", method, "-o", str(tmp_path / "q")])
        assert res.exit_code == 2 and "table t_b has no rows" in res.output and "Traceback" not in res.output, res.output
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
