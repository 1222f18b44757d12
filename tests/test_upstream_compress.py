"""Every DLRM-style upstream format through the whole path a user takes (issue 12, part 6): rebuilt, evaluated
on data with its vocabularies, compressed with post-training MLET and with int8, exported to ONNX with parity.
Each checkpoint is drawn with every vector that enters the dot interaction (bottom-MLP output, table rows) in a
subspace of width - 1 dimensions, so MLET's cut to width - 1 loses nothing: the compressed model must still
score as the upstream forward."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from recompress.adapters import load_any
from recompress.checkpoint import load_checkpoint
from recompress.cli import main
from recompress.data.synthetic import make_synthetic

from .test_checkpoints import dlrm_state, qr_md_state, reference_dlrm
from .test_torchrec_format import D as TR_D
from .test_torchrec_format import ROWS as TR_ROWS
from .test_torchrec_format import torchrec_forward, torchrec_state


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write_nvidia(folder: Path, sd: dict[str, torch.Tensor]) -> None:
    """NVIDIA DeepLearningExamples' DlrmCheckpointWriter layout (raw float32 .bin tables with a shape file each,
    the MLPs as weight/bias lists, metadata.pt with its config) for a dlrm state dict of width 4 (dot
    interaction padded to a multiple of 8 by zero columns of the top MLP's input)."""
    folder.mkdir()
    tables = sorted(int(k.split(".")[1]) for k in sd if k.startswith("emb_l."))
    for t in tables:
        w = sd[f"emb_l.{t}.weight"]
        w.numpy().astype("<f4").tofile(folder / f"bottom_model.embeddings.{t}.bin")
        torch.save({"shape": w.shape}, folder / f"embeddings.{t}.meta.pt")
    torch.save({"weights": [sd["bot_l.0.weight"], sd["bot_l.2.weight"]], "biases": [sd["bot_l.0.bias"], sd["bot_l.2.bias"]]},
               folder / "bottom_model.mlp.pt")
    torch.save({"weights": [sd["top_l.0.weight"]], "biases": [sd["top_l.0.bias"]]}, folder / "top_model.mlp.pt")
    torch.save({"weight": sd["top_l.2.weight"], "bias": sd["top_l.2.bias"]}, folder / "top_model.out.pt")
    torch.save({"data": {"epoch": 0}, "config": {"embedding_dim": 4, "interaction_op": "cuda_dot"}}, folder / "metadata.pt")


def padded_state(rows=(30, 7, 12)):
    """A dlrm state whose top MLP reads the 10 interaction values padded to 16 (NVIDIA's cuda_dot)."""
    sd = dlrm_state(rows=rows)
    w = sd["top_l.0.weight"]
    sd["top_l.0.weight"] = torch.cat([w, torch.randn(w.shape[0], 16 - w.shape[1])], 1)
    return sd


def flat(sd: dict[str, torch.Tensor], bottom_out: str) -> dict[str, torch.Tensor]:
    """``sd`` with the last coordinate of every interaction vector zero: each table's last column (QR: the
    quotient's; mixed dimension: the projection's last row) and the bottom MLP's last output unit."""
    sd = {k: v.clone() for k, v in sd.items()}
    for k, v in sd.items():
        if k.endswith((".weight", ".weight_q")) and (k.startswith(("emb_l.", "sparse_arch.")) and "proj" not in k
                                                     and "embs" not in k):
            v[:, -1] = 0
        elif k.endswith("proj.weight"):
            v[-1] = 0
    sd[bottom_out + ".weight"][-1], sd[bottom_out + ".bias"][-1] = 0, 0
    return sd


def case(name: str, tmp: Path):
    """(checkpoint path, --hp options, table rows, dense features, reference forward(dense, ids))."""
    if name == "dlrm":
        sd = flat(dlrm_state(), "bot_l.2")
        torch.save({"state_dict": sd, "nepochs": 1, "test_auc": np.float64(0.7)}, tmp / "dlrm.pt")
        return tmp / "dlrm.pt", [], (30, 7, 12), 13, lambda x, i: reference_dlrm(sd, x, i)
    if name == "dlrm-qr-md":
        sd = flat(qr_md_state(), "bot_l.2")
        torch.save({"state_dict": sd}, tmp / "qr.pt")
        return (tmp / "qr.pt", ["--hp", "qr_operation=mult"], (30, 40, 12), 13,
                lambda x, i: reference_dlrm(sd, x, i, qr_op="mult"))
    if name == "nvidia":
        sd = flat(padded_state(), "bot_l.2")
        write_nvidia(tmp / "nv", sd)
        return tmp / "nv", [], (30, 7, 12), 13, lambda x, i: reference_dlrm(sd, x, i, pad=6)
    sd = flat(torchrec_state(seed=2), "dense_arch.model._mlp.1._linear")
    torch.save({"model_state_dict": sd}, tmp / "tr.pt")
    return tmp / "tr.pt", [], TR_ROWS, 5, lambda x, i: torchrec_forward(sd, x, i)


@pytest.mark.parametrize("fmt", ["dlrm", "dlrm-qr-md", "nvidia", "torchrec"])
def test_each_dlrm_format_evaluates_compresses_with_mlet_and_int8_and_exports(tmp_path, fmt):
    ckpt, hp, rows, n_dense, reference = case(fmt, tmp_path)
    data = make_synthetic(tmp_path / "data", samples=3000, table_rows=list(rows), num_dense=n_dense, seed=1)
    res = cli("evaluate", ckpt, *hp, "--data", data, "--no-latency", "--json", tmp_path / "base.json")
    assert res.exit_code == 0, res.output
    width = load_any(ckpt, dict(h.split("=") for h in hp[1::2])).spec.hparams["emb_dim"]
    g = torch.Generator().manual_seed(3)
    dense = torch.rand(11, n_dense, generator=g)
    ids = torch.stack([torch.randint(0, r, (11,), generator=g) for r in rows], 1)
    # the interaction vectors span width - 1 dimensions: the cut keeps them all (no fine-tuning)
    args = ["--method", "mlet", "--data", data, "--steps", 0]
    if fmt == "dlrm-qr-md":  # MLET's two-layer form cannot hold a QR table: it is cut to a dense one
        res = cli("checkpoint", ckpt, *hp, *args, "--dim", width - 1, "-o", tmp_path / "no")
        assert res.exit_code == 2 and "mlet cannot read qr tables" in res.output and "--tables" in res.output
        args += ["--tables", "emb_0,emb_2"]
    res = cli("checkpoint", ckpt, *hp, *args, "--dim", width - 1, "-o", tmp_path / "mlet")
    assert res.exit_code == 0, res.output
    cut = load_checkpoint(tmp_path / "mlet")
    assert {t.dim for t in cut.spec.tables} == {width - 1}
    with torch.no_grad():
        got, want = cut.model(dense, ids.unsqueeze(-1)), reference(dense, ids)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    res = cli("checkpoint", ckpt, *hp, *args, "--dim", width - 2, "-o", tmp_path / "lossy")  # below the span
    assert res.exit_code == 0, res.output
    with torch.no_grad():
        assert not torch.allclose(load_checkpoint(tmp_path / "lossy").model(dense, ids.unsqueeze(-1)), want, atol=1e-2)
    res = cli("checkpoint", ckpt, *hp, "--method", "int8", "-o", tmp_path / "int8")
    assert res.exit_code == 0, res.output
    for variant in ("mlet", "int8"):
        res = cli("export", tmp_path / variant, "--data", data, "-o", tmp_path / f"{variant}.onnx")
        assert res.exit_code == 0, res.output
        assert json.loads((tmp_path / f"{variant}.onnx" / "manifest.json").read_text())["parity"]["passed"]
        res = cli("evaluate", tmp_path / f"{variant}.onnx", "--data", data, "--no-latency", "--compare",
                  tmp_path / "base.json", "--json", tmp_path / f"{variant}.json")
        assert res.exit_code == 0, res.output
    base = json.loads((tmp_path / "base.json").read_text())["accuracy"]["torch"]["auc"]
    q = json.loads((tmp_path / "int8.json").read_text())["accuracy"]
    assert abs(next(iter(q.values()))["auc"] - base) < 0.01


STREAMED = [("int8", {}), ("tt,int8", {"tt_rank": 2}), ("lowrank", {"rank": 2}), ("hash", {"ratio": 2.0})]


@pytest.mark.parametrize("method,params", STREAMED, ids=[m for m, _ in STREAMED])
def test_nvidia_tables_stream_from_their_bin_files(tmp_path, monkeypatch, method, params):
    """NVIDIA's raw .bin tables are read by row blocks (never mapped or loaded whole): the same checkpoint, bit
    for bit, as loading the folder whole, and nothing in the folder changes."""
    import recompress.adapters
    from recompress.adapters import load_streamed
    from recompress.checkpoint import save_checkpoint
    from recompress.compress.registry import Context, compress, parse_methods

    from .conftest import tree_hash
    sd = padded_state()
    write_nvidia(tmp_path / "nv", sd)
    ref = compress(load_any(tmp_path / "nv"), parse_methods(method, params), Context())
    ref.spec.provenance.setdefault("compressed_from", str(tmp_path / "nv"))
    save_checkpoint(ref, tmp_path / "ref")
    ckpt, rows = load_streamed(tmp_path / "nv")
    assert sorted(rows) == ["emb_0", "emb_1", "emb_2"] and all(t.weight.is_meta for t in ckpt.model.tables.values())
    assert torch.equal(rows["emb_0"][3:29], sd["emb_l.0.weight"][3:29])
    before = tree_hash(tmp_path / "nv")
    monkeypatch.setattr(recompress.adapters, "load_any", lambda *a: pytest.fail("the model was loaded whole"))
    flags = [str(x) for k, v in params.items() for x in (f"--{k.replace('_', '-')}", v)]
    res = cli("checkpoint", tmp_path / "nv", "--method", method, *flags, "-o", tmp_path / "s")
    assert res.exit_code == 0, res.output
    a, b = load_checkpoint(tmp_path / "ref"), load_checkpoint(tmp_path / "s")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.spec.to_json() == b.spec.to_json() and tree_hash(tmp_path / "nv") == before


@pytest.mark.big
def test_int8_of_a_big_nvidia_table_does_not_map_it_whole(tmp_path):
    """A 2M x 64 .bin table (512 MB): the streamed int8 run stays within 0.25x the table of the same command on
    a 1,000-row table. Mapped and quantized whole, as before, every page of the file became resident (> 1x)."""
    import subprocess
    import sys

    from .test_stream import _bench, _peak_rss
    make = _bench().make_nvidia
    table = make(tmp_path / "big", 2_000_000, 64)
    make(tmp_path / "small", 1000, 64)
    run = [sys.executable, "-m", "recompress", "checkpoint"]
    base = _peak_rss([*run, str(tmp_path / "small"), "--method", "int8", "-o", str(tmp_path / "o1")])
    peak = _peak_rss([*run, str(tmp_path / "big"), "--method", "int8", "-o", str(tmp_path / "o2")])
    assert peak - base < 0.25 * table, (peak, base)
    assert subprocess.run(run[:-1] + ["inspect", str(tmp_path / "o2")], capture_output=True).returncode == 0


def test_an_nvidia_folder_exports(tmp_path):
    """Found by a review: export hashed a source folder as if it were a native checkpoint (spec.json missing)."""
    from recompress.checkpoint import checkpoint_hash
    write_nvidia(tmp_path / "nv", padded_state())
    res = cli("export", tmp_path / "nv", "-o", tmp_path / "x")
    assert res.exit_code == 0, res.output
    before = checkpoint_hash(tmp_path / "nv")
    (tmp_path / "nv" / "bottom_model.mlp.pt").write_bytes((tmp_path / "nv" / "bottom_model.mlp.pt").read_bytes() + b"x")
    assert checkpoint_hash(tmp_path / "nv") != before


@pytest.mark.parametrize("shape,message", [
    ([120], r"does not give a table's shape \(rows, width >= 1\): \[120\]"),
    (None, "does not give a table's shape"),
    ([-30, -4], r"\[-30, -4\]"),
    ([30, 4, 1], r"\[30, 4, 1\]"),
    ([0, 4], r"\[0, 4\]"),
])
def test_nvidia_shape_files_that_give_no_table_shape_are_refused(tmp_path, shape, message):
    """Found by a review: tracebacks (IndexError, KeyError, RuntimeError), or a 3-D shape accepted by inspect."""
    from recompress.errors import UserError
    write_nvidia(tmp_path / "nv", padded_state())
    torch.save({"shape": shape} if shape is not None else {"size": [30, 4]}, tmp_path / "nv" / "embeddings.0.meta.pt")
    for call in (lambda: load_any(tmp_path / "nv"), lambda: __import__("recompress.adapters").adapters.describe(tmp_path / "nv")):
        with pytest.raises(UserError, match=message):
            call()
