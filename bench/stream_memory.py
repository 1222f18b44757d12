"""Benchmark (not a test): peak memory and time of data-free compression of one big table, streamed.

    python bench/stream_memory.py --out bench/results/stream_memory.json [--rows 1000000,10000000,40000000]
                                  [--dim 64] [--methods int8,tt] [--in-memory-up-to 10000000]
    python bench/stream_memory.py --out bench/results/stream_memory_lowrank_hash.json --methods lowrank,hash,qr
    python bench/stream_memory.py --out bench/results/stream_larger_than_ram.json --rows 130000000 --dim 64 \
                                  --methods int8 --in-memory-up-to 0 --zeros

    python bench/stream_memory.py --out bench/results/stream_memory_dcp.json --source dcp
    python bench/stream_memory.py --out bench/results/stream_memory_dcp_vs_native.json --source native,dcp \
                                  --rows 10000000 --in-memory-up-to 0 --repeats 2
    python bench/stream_memory.py --out bench/results/stream_memory_dcp_vs_native_40m.json --source native,dcp \
                                  --rows 40000000 --in-memory-up-to 0
    python bench/stream_memory.py --out bench/results/stream_memory_hash.json --methods hash --in-memory-up-to 0
    python bench/stream_memory.py --out bench/results/stream_memory_nvidia.json --source nvidia --methods int8,tt \
                                  --rows 1000000,10000000

For each size, a DLRM checkpoint with one ``rows x dim`` fp32 table (values N(0, 0.05), written in blocks
so this script never holds it) is compressed by ``recompress checkpoint CKPT --method M`` in its own
process under ``/usr/bin/time -v``: its maximum resident set size and wall time. The same command on a
1,000-row table gives the process's fixed memory (Python, torch, recompress). For sizes up to
``--in-memory-up-to`` the load-compress-save path that the CLI used before streaming (and still uses
for methods that need data) runs too, for comparison. ``--source dcp``: the checkpoint is TorchRec's DLRM
(one table) saved by ``torch.distributed.checkpoint`` instead of a native one; the table is a memory-mapped
file filled in blocks, so neither this script nor DCP holds it in memory; ``--source nvidia``: NVIDIA
DeepLearningExamples' DLRM folder (a raw .bin table). ``--source native,dcp`` makes and
compresses both, one after the other for each size and repeat, so that their times compare within one run.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

METHODS = {"int8": ("int8", {}), "tt": ("tt", {"tt_rank": 16}), "lowrank": ("lowrank", {"rank": 8}),
           "hash": ("hash", {"ratio": 16.0}), "qr": ("qr", {"collisions": 4})}
IN_MEMORY = """
import json, sys
from recompress.checkpoint import save_checkpoint
from recompress.compress.registry import Context, compress, parse_methods
from recompress.adapters import load_any
ckpt = load_any(sys.argv[1])
save_checkpoint(compress(ckpt, parse_methods(sys.argv[3], json.loads(sys.argv[4])), Context()), sys.argv[2])
"""


def write_rows(file: Path, rows: int, dim: int, gen: torch.Generator,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A raw ``rows x dim`` table of N(0, 0.05) values (drawn in float32, stored as ``dtype``) written to ``file``
    in 16 MB blocks; the file, memory-mapped (nothing of its size is held: torch.save and DCP write it from the
    page cache)."""
    step = (1 << 24) // (4 * dim)
    with open(file, "wb") as f:
        for s in range(0, rows, step):
            block = (torch.randn(min(step, rows - s), dim, generator=gen) * 0.05).to(dtype)
            f.write(block.view(torch.uint8).numpy().tobytes())
    return torch.from_file(str(file), size=rows * dim, dtype=dtype).view(rows, dim)


def _linears(layers: dict[str, tuple[int, int]], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``{name.weight, name.bias}`` for each ``name: (out, in)``: small random weights, zero biases."""
    out = {}
    for name, shape in layers.items():
        out[f"{name}.weight"], out[f"{name}.bias"] = torch.randn(*shape, generator=gen) * 0.1, torch.zeros(shape[0])
    return out


def make_checkpoint(path: Path, rows: int, dim: int, zeros: bool = False) -> int:
    """A native DLRM checkpoint with one ``rows x dim`` table, written block by block (``zeros``: left as the
    file's zeros, a sparse file, so that a table larger than the disk's free space or RAM costs nothing to
    make); its table bytes."""
    from recompress.blockfile import TensorWriter
    from recompress.checkpoint import SPEC_FILE, WEIGHTS_FILE
    from recompress.models.dlrm import DLRM, default_hparams
    from recompress.spec import ModelSpec, TableSpec
    from recompress.tables import DenseTable

    hp = default_hparams(13, dim, [64, dim], [64, 1])
    model = DLRM(hp, {"C1": DenseTable(rows, dim, torch.empty(rows, dim, device="meta"))})  # the table: never allocated
    spec = ModelSpec(family="dlrm", hparams=hp, tables=[TableSpec(name="C1", rows=rows, dim=dim, role="sparse_feature")])
    state = model.state_dict()
    key = next(k for k in state if k.endswith("C1.weight"))
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    with TensorWriter(path / WEIGHTS_FILE, {k: (v.dtype, tuple(v.shape)) for k, v in state.items()},
                      {"format": "recompress"}) as w:
        for k, v in state.items():
            if k != key:
                w.write(k, 0, v)
        step = (1 << 24) // (4 * dim)
        for s in range(0, 0 if zeros else rows, step):
            w.write(key, s, torch.randn(min(step, rows - s), dim, generator=gen) * 0.05)
        if zeros:
            w.written[key] = rows
    (path / SPEC_FILE).write_text(spec.to_json() + "\n")
    return rows * dim * 4


def make_dcp(path: Path, rows: int, dim: int) -> int:
    """TorchRec's DLRM with one ``rows x dim`` table (``sparse_arch.embedding_bag_collection.embedding_bags.t``)
    saved as a DCP folder by one process; its table bytes."""
    import torch.distributed.checkpoint as dcp
    raw, gen = path.with_suffix(".table"), torch.Generator().manual_seed(0)
    state = {"sparse_arch.embedding_bag_collection.embedding_bags.t.weight": write_rows(raw, rows, dim, gen)}
    state.update(_linears({"dense_arch.model._mlp.0._linear": (64, 13), "dense_arch.model._mlp.1._linear": (dim, 64),
                           "over_arch.model.0._mlp.0._linear": (64, dim + 1), "over_arch.model.1": (1, 64)}, gen))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP without a process group: saved as one process, as it says
        dcp.save({"model": state}, checkpoint_id=str(path))
    raw.unlink()
    return rows * dim * 4


def make_nvidia(path: Path, rows: int, dim: int) -> int:
    """NVIDIA DeepLearningExamples' DLRM checkpoint folder with one ``rows x dim`` table (a raw float32 .bin
    written in blocks, its shape file, the MLPs, metadata.pt); its table bytes."""
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    write_rows(path / "bottom_model.embeddings.0.bin", rows, dim, gen)
    torch.save({"shape": torch.Size([rows, dim])}, path / "embeddings.0.meta.pt")
    pad = -(-(dim + 1) // 8) * 8  # the dot interaction of two vectors plus the dense one, padded to 8
    torch.save({"weights": [torch.randn(dim, 13, generator=gen) * 0.1], "biases": [torch.zeros(dim)]},
               path / "bottom_model.mlp.pt")
    torch.save({"weights": [torch.randn(64, pad, generator=gen) * 0.1], "biases": [torch.zeros(64)]},
               path / "top_model.mlp.pt")
    torch.save({"weight": torch.randn(1, 64, generator=gen) * 0.1, "bias": torch.zeros(1)}, path / "top_model.out.pt")
    torch.save({"config": {"embedding_dim": dim, "interaction_op": "cuda_dot"}}, path / "metadata.pt")
    return rows * dim * 4


def make_dlrm(path: Path, rows: int, dim: int, dtype: torch.dtype = torch.float32) -> int:
    """facebookresearch/dlrm's ``--save-model`` file (``dlrm_s_pytorch.py``'s layout: counters, metrics as numpy
    scalars, ``state_dict`` with ``emb_l``/``bot_l``/``top_l``) with one ``rows x dim`` table stored as ``dtype``
    (a model trained or saved in half precision); its table bytes as stored."""
    import numpy as np
    raw, gen = path.with_suffix(".table"), torch.Generator().manual_seed(0)
    state = {"emb_l.0.weight": write_rows(raw, rows, dim, gen, dtype),
             **_linears({"bot_l.0": (64, 13), "bot_l.2": (dim, 64), "top_l.0": (64, dim + 1), "top_l.2": (1, 64)}, gen)}
    torch.save({"epoch": 0, "nepochs": 1, "nbatches": 1, "nbatches_test": 1, "iter": 1, "state_dict": state,
                "train_acc": np.float64(0.75), "train_loss": np.float64(0.5), "test_acc": np.float64(0.75),
                "test_auc": np.float64(0.7)}, path)
    raw.unlink()
    return rows * dim * dtype.itemsize


def make_sasrec_pytorch(path: Path, rows: int, dim: int, max_len: int = 50) -> int:
    """pmixer/SASRec.pytorch's run folder (``model.py``'s keys, one block, one head, hyper-parameters in the file
    name and ``args.txt``) with an item table of ``rows`` rows (``rows - 1`` items and its padding row); its
    table bytes."""
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    raw = path / "items.table"
    state = {"item_emb.weight": write_rows(raw, rows, dim, gen),
             "pos_emb.weight": torch.randn(max_len + 1, dim, generator=gen) * 0.05,
             **_linears({"attention_layers.0.out_proj": (dim, dim), "forward_layers.0.conv1": (dim, dim),
                         "forward_layers.0.conv2": (dim, dim)}, gen),
             "attention_layers.0.in_proj_weight": torch.randn(3 * dim, dim, generator=gen) * 0.1,
             "attention_layers.0.in_proj_bias": torch.zeros(3 * dim)}
    for conv in ("conv1", "conv2"):  # Conv1d, kernel 1
        state[f"forward_layers.0.{conv}.weight"] = state[f"forward_layers.0.{conv}.weight"].unsqueeze(-1)
    for norm in ("attention_layernorms.0", "forward_layernorms.0", "last_layernorm"):
        state[f"{norm}.weight"], state[f"{norm}.bias"] = torch.ones(dim), torch.zeros(dim)
    torch.save(state, path / f"SASRec.epoch=1.lr=0.001.layer=1.head=1.hidden={dim}.maxlen={max_len}.pth")
    (path / "args.txt").write_text(f"dropout_rate,0.2\nhidden_units,{dim}\nmaxlen,{max_len}\nnorm_first,False\n"
                                   "num_blocks,1\nnum_heads,1\n")
    raw.unlink()
    return rows * dim * 4


MAKERS = {"dcp": make_dcp, "nvidia": make_nvidia, "dlrm": make_dlrm,
          "dlrm-fp16": functools.partial(make_dlrm, dtype=torch.float16), "sasrec.pytorch": make_sasrec_pytorch}
"""The upstream sources (native is make_checkpoint, with --zeros); dlrm's is a file, the others folders."""


def main() -> None:
    from measure import timed  # bench/measure.py, beside this script

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="1000000,10000000,40000000")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--methods", default="int8,tt")
    ap.add_argument("--in-memory-up-to", type=int, default=10_000_000)
    ap.add_argument("--zeros", action="store_true", help="tables of zeros in sparse files (sizes beyond RAM)")
    ap.add_argument("--source", default="native", help="native, dcp, nvidia, or several (native,dcp: one after the "
                    "other per size)")
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        for rows in [1000, *map(int, a.rows.split(","))]:
            for repeat in range(a.repeats):
                for source in a.source.split(","):
                    src = Path(tmp) / f"t{rows}-{source}"
                    table = make_checkpoint(src, rows, a.dim, a.zeros) if source == "native" else \
                        MAKERS[source](src, rows, a.dim)
                    for method in a.methods.split(","):
                        name, params = METHODS[method]
                        args = [x for k, v in params.items() for x in (f"--{k.replace('_', '-')}", str(v))]
                        runs = [("streamed", ["recompress", "checkpoint", str(src), "--method", name, *args, "-o",
                                              str(Path(tmp) / f"s-{rows}-{method}")])]
                        if rows <= a.in_memory_up_to:
                            runs.append(("in memory (before)", [sys.executable, "-c", IN_MEMORY, str(src),
                                                                str(Path(tmp) / f"m-{rows}-{method}"), name,
                                                                json.dumps(params)]))
                        for path, cmd in runs:
                            r = {"rows": rows, "dim": a.dim, "table_bytes": table, "source": source, "repeat": repeat,
                                 "method": method, "path": path, **timed(cmd, digits=1)}
                            r["peak_over_table"] = round(r["peak_rss_bytes"] / table, 3)
                            results.append(r)
                            print(json.dumps(r), flush=True)
                            shutil.rmtree(cmd[-1] if path == "streamed" else cmd[-3])
                    shutil.rmtree(src) if src.is_dir() else src.unlink()
    Path(a.out).write_text(json.dumps({"machine": "2 CPU cores, 24 GB", "zeros": a.zeros, "results": results},
                                      indent=2) + "\n")


if __name__ == "__main__":
    main()
