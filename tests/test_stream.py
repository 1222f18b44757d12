"""Streamed data-free compression: same checkpoint as the in-memory path, bounded memory, clean refusals."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from recompress.compress.registry import Context, Selection, compress, parse_methods
from safetensors.torch import load_file, save_file

from recompress.blockfile import TensorFile, TensorWriter
from recompress.checkpoint import WEIGHTS_FILE, load_checkpoint, save_checkpoint
from recompress.cli import main

from .conftest import _bench, tree_hash

ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_blockfile_reads_and_writes_what_safetensors_does(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(37, 5, generator=gen), "b": torch.randint(0, 255, (11, 3), generator=gen).to(torch.uint8),
               "c": torch.randn(9, generator=gen).to(torch.bfloat16), "d": torch.tensor(3.5), "e": torch.zeros(0, 4),
               "f": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    f = TensorFile(tmp_path / "ref.safetensors")
    for k, v in tensors.items():
        assert torch.equal(f.read(k), v)
    assert torch.equal(f.read("a", 10, 20), tensors["a"][10:20])
    with TensorWriter(tmp_path / "ours.safetensors", {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()},
                      {"format": "x"}) as w:
        for k, v in tensors.items():
            if k == "a":  # in blocks, out of order
                w.write(k, 20, v[20:])
                w.write(k, 0, v[:20])
            else:
                w.write(k, 0, v)
    back = load_file(str(tmp_path / "ours.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    ours = TensorFile(tmp_path / "ours.safetensors")  # every tensor aligned for its dtype, as safetensors lays them
    assert all(e.begin % e.dtype.itemsize == 0 for e in ours.entries.values())
    assert all(ours.entries[k].begin - ours.entries["a"].begin == f.entries[k].begin - f.entries["a"].begin
               for k in tensors)


def test_writer_refuses_to_finish_a_file_with_missing_rows(tmp_path):
    with pytest.raises(RuntimeError, match="rows missing"), \
            TensorWriter(tmp_path / "x.safetensors", {"a": (torch.float32, (4, 2))}) as w:
        w.write("a", 0, torch.zeros(3, 2))


METHODS = [("int8", {}), ("int4", {}), ("fp16", {}), ("bf16", {}), ("int8", {"align": 16}), ("tt", {"tt_rank": 4}),
           ("tt,int8", {"tt_rank": 4}), ("lowrank", {"rank": 3}), ("lowrank,int8", {"rank": 3}), ("hash", {"ratio": 4.0}),
           ("qr", {"collisions": 5}), ("qr", {"collisions": 5, "op": "add"}), ("qr", {"collisions": 5, "op": "concat"})]


@pytest.mark.parametrize("method,params", METHODS, ids=[f"{m}{p or ''}" for m, p in METHODS])
def test_streamed_checkpoint_equals_the_in_memory_one(tiny_ckpt, tmp_path, monkeypatch, method, params):
    ref = compress(load_checkpoint(tiny_ckpt), parse_methods(method, params), Context(select=Selection(min_rows=40)))
    ref.spec.provenance.setdefault("compressed_from", str(tiny_ckpt))
    save_checkpoint(ref, tmp_path / "ref")
    import recompress.adapters
    monkeypatch.setattr(recompress.adapters, "load_any", lambda p: pytest.fail("the table was loaded whole"))
    flags = [x for k, v in params.items() for x in (f"--{k.replace('_', '-')}", v)]
    res = cli("checkpoint", tiny_ckpt, "--method", method, *flags, "--min-rows", 40, "-o", tmp_path / "s")
    assert res.exit_code == 0, res.output
    a, b = load_checkpoint(tmp_path / "ref"), load_checkpoint(tmp_path / "s")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.spec.to_json() == b.spec.to_json()  # tables, history (errors, bytes), provenance
    assert b.model.tables["C4"].kind == "dense"  # 7 rows: below --min-rows, copied from the file
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.startswith(".step")]
    steps = len(method.split(","))  # the progress names the output, not its staging folder
    said = [ln for ln in res.stderr.splitlines() if ln.startswith("writing ")]
    assert said and all(ln.startswith("writing s" + (f" (step " if steps > 1 else ":")) for ln in said), said


def _damage(src: Path, dst: Path, how: str) -> None:
    shutil.copytree(src, dst)
    path = dst / WEIGHTS_FILE
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
        return
    if how == "list-header":  # valid JSON, but not the object safetensors puts there
        body = b"[1, 2]     "
        path.write_bytes(len(body).to_bytes(8, "little") + body + b"\0" * 64)
        return
    entry = TensorFile(path).entries["tables.C1.weight"]
    with open(path, "r+b") as f:  # a NaN in the middle of the big table
        f.seek(entry.begin + 123 * entry.row_bytes)
        f.write(torch.tensor([float("nan")]).numpy().tobytes())


@pytest.mark.parametrize("how,message", [("nan", "has 1 NaN/Inf values"), ("truncate", "not a readable safetensors"),
                                         ("list-header", "header is a JSON list")])
def test_streaming_refuses_a_damaged_file_and_writes_nothing(tiny_ckpt, tmp_path, how, message):
    src = tmp_path / "bad"
    _damage(tiny_ckpt, src, how)
    before = tree_hash(src)
    res = cli("checkpoint", src, "--method", "int8", "-o", tmp_path / "out")
    assert res.exit_code == 2 and message in res.output, res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["bad"]
    assert tree_hash(src) == before


def _peak_rss(args: list[str]) -> int:
    code = ("import resource, subprocess, sys\n"
            "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
    return int(subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True).stdout)


@pytest.mark.big
def test_int8_of_a_big_table_does_not_load_it(tmp_path):
    """A 2M x 64 table (512 MB): the streamed int8 run stays within 0.25x the table of the same command on a
    1,000-row table (the process's own memory); loading the table, as the old path did, takes > 1x."""
    bench = _bench()
    table = bench.make_checkpoint(tmp_path / "big", 2_000_000, 64)
    bench.make_checkpoint(tmp_path / "small", 1000, 64)
    run = [sys.executable, "-m", "recompress", "checkpoint"]
    base = _peak_rss([*run, str(tmp_path / "small"), "--method", "int8", "-o", str(tmp_path / "o1")])
    peak = _peak_rss([*run, str(tmp_path / "big"), "--method", "int8", "-o", str(tmp_path / "o2")])
    assert peak - base < 0.25 * table, (peak, base)
    got = TensorFile(tmp_path / "o2" / WEIGHTS_FILE)
    src = TensorFile(tmp_path / "big" / WEIGHTS_FILE)
    rows = src.read("tables.C1.weight", 1_999_000)  # the last rows, against FBGEMM's own int8 rows
    packed = torch.ops.quantized.embedding_bag_byte_prepack(rows)
    assert torch.equal(got.read("tables.C1.stores.weight.data", 1_999_000), packed[:, :64])
    assert torch.equal(got.read("tables.C1.stores.weight.scale", 1_999_000), packed[:, 64:68].contiguous().view(torch.float32)[:, 0])


def test_the_hashing_fit_holds_its_output_once(tmp_path):
    """hash --ratio 4 of a 2M x 64 table (512 MB) -> 500k buckets (128 MB of float32 output): the fit sums into
    the output itself, so the run stays within 1.5x the output plus ~160 MB of row blocks (65,536 rows in
    float64, a few at a time) over the same command on 1,000 rows. Summing in a float64 accumulator, then
    copying it to float32, took 2x the output more (394 MB over, here 343 MB is the limit)."""
    bench = _bench()
    bench.make_checkpoint(tmp_path / "big", 2_000_000, 64)
    bench.make_checkpoint(tmp_path / "small", 1000, 64)
    run = [sys.executable, "-m", "recompress", "checkpoint"]
    hashed = ["--method", "hash", "--ratio", "4"]
    base = _peak_rss([*run, str(tmp_path / "small"), *hashed, "-o", str(tmp_path / "o1")])
    peak = _peak_rss([*run, str(tmp_path / "big"), *hashed, "-o", str(tmp_path / "o2")])
    output = 500_000 * 64 * 4
    assert peak - base < 1.5 * output + (160 << 20), (peak, base)


def test_streaming_never_allocates_the_dense_table(tmp_path, monkeypatch):
    """A table larger than memory must stream: no CPU tensor of the table's size is ever asked for (the model's
    dense tables live on the meta device). The table here is a sparse file of zeros; any CPU allocation of more
    than 64 MB fails the test (blocks are 16-32 MB)."""
    from recompress.checkpoint import SPEC_FILE
    from recompress.models.dlrm import DLRM, default_hparams
    from recompress.spec import ModelSpec, TableSpec
    from recompress.tables import DenseTable

    rows, dim = 1_500_000, 32  # 192 MB
    hp = default_hparams(13, dim, [16, dim], [16, 1])
    model = DLRM(hp, {"C1": DenseTable(8, dim)})
    state = {k: v for k, v in model.state_dict().items() if "C1" not in k}
    src = tmp_path / "big"
    src.mkdir()
    layout = {**{k: (v.dtype, tuple(v.shape)) for k, v in state.items()}, "tables.C1.weight": (torch.float32, (rows, dim))}
    with TensorWriter(src / WEIGHTS_FILE, layout, {"format": "recompress"}) as w:
        for k, v in state.items():
            w.write(k, 0, v)
        w.written["tables.C1.weight"] = rows  # left as the file's zeros (sparse on disk)
    spec = ModelSpec(family="dlrm", hparams=hp, tables=[TableSpec(name="C1", rows=rows, dim=dim, role="sparse_feature")])
    (src / SPEC_FILE).write_text(spec.to_json() + "\n")
    real_empty = torch.empty

    def guarded(*size, **kw):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        numel = 1
        for s in shape:
            numel *= int(s)
        if str(kw.get("device", torch.get_default_device())) != "meta" and numel * 4 > 64 << 20:
            raise AssertionError(f"torch.empty{tuple(shape)} on the CPU: the table was allocated")
        return real_empty(*size, **kw)

    monkeypatch.setattr(torch, "empty", guarded)
    res = cli("checkpoint", src, "--method", "int8", "-o", tmp_path / "q")
    assert res.exit_code == 0, res.output
    monkeypatch.setattr(torch, "empty", real_empty)
    q = load_checkpoint(tmp_path / "q")
    assert q.model.tables["C1"].rows == rows and float(q.model.tables["C1"].lookup(torch.tensor([0, rows - 1])).abs().max()) == 0
