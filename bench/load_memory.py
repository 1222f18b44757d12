"""Benchmark (not a test): peak memory and time of ``recompress evaluate`` and ``recompress export`` on a
checkpoint with one big table, this checkout against a baseline revision, interleaved.

    python bench/load_memory.py --out bench/results/load_memory.json --baseline 1b092bd \
                                --rows 1000,1000000,10000000 [--dim 64] [--repeats 2]
    python bench/load_memory.py --out bench/results/load_larger_than_ram.json --rows 130000000 --zeros \
                                --checkpoints fp32 --commands evaluate --repeats 1
    python bench/load_memory.py --out bench/results/load_memory_upstream.json --baseline c7d5a35 \
                                --source dlrm,nvidia --checkpoints fp32 --rows 1000,1000000,10000000
    python bench/load_memory.py --out bench/results/load_memory_fp16.json --baseline 8907405 \
                                --source dlrm-fp16 --checkpoints fp32 --rows 1000,10000000
    python bench/load_memory.py --out bench/results/export_over_memory_limit.json --baseline b81b7bd \
                                --rows 20000000 --zeros --checkpoints fp32 --commands evaluate,export --repeats 1 \
                                --memory-limit-gb 2
    python bench/load_memory.py --out bench/results/export_larger_than_ram.json --rows 100000000 --zeros \
                                --checkpoints fp32 --commands export --repeats 1
    python bench/load_memory.py --out bench/results/export_dense_int8_over_memory_limit.json --baseline 927c8ef \
                                --rows 20000000 --zeros --checkpoints fp32 --commands export-dense-int8 \
                                --repeats 1 --memory-limit-gb 2
    python bench/load_memory.py --out bench/results/trt_build_memory.json --baseline 32be0b1 \
                                --rows 1000,10000000 --checkpoints fp32 --commands export-trt --repeats 1
    python bench/load_memory.py --out bench/results/finetune_memory.json --checkpoints fp32 \
                                --commands finetune-adam,finetune-rowwise-adagrad --rows 1000,10000000
    python bench/load_memory.py --out bench/results/keep_best_memory.json --baseline 64507bf --checkpoints fp32 \
                                --commands finetune-rowwise-adagrad-keep-best --rows 1000,10000000

For each size, a DLRM checkpoint with one ``rows x dim`` fp32 table (bench/stream_memory.py's, written in
blocks), its int8 version (``recompress checkpoint --method int8``, streamed) and a synthetic dataset with a
vocabulary of the same size (40,000 rows) are made once. Then, per repeat and checkout (ABAB), each of
``evaluate CKPT --no-latency`` and ``export CKPT --target onnx`` (``export-dense-int8``: with ``--dense int8``;
``export-trt``: ``--target trt``) runs in its own process under
``/usr/bin/time -v`` (wall time, maximum resident set size: the process's own memory plus the pages of
files it maps), while a thread in that process samples its own anonymous memory (bench/measure.py ANON_PEAK) (``RssAnon``: what a
copy of a table costs; mapped file pages are the page cache's and the kernel can drop them). Sizes from
``--this-only-from`` run this checkout only (the baseline's copies would not fit in memory). ``--zeros``: the
table is left as a sparse file of zeros (bench/stream_memory.py's), so that one larger than this machine's
memory and free disk costs nothing to make. ``--source dlrm,nvidia``: the checkpoint is an upstream one
instead (bench/stream_memory.py's makers: a facebookresearch/dlrm ``--save-model`` file, an NVIDIA DLRM
folder; ``dlrm-fp16``: the dlrm file with its table saved as fp16), read by recompress's adapters (``fp32``
only: the file as upstream wrote it). ``table_bytes``: as the file stores the table; the ratios are to its
float32 size, which the model reads. ``--commands
finetune-adam,finetune-rowwise-adagrad``: 20 steps of ``checkpoint --method finetune`` with that optimizer
(``...-keep-best``: with ``--keep-best``, checkpoint's default). ``--memory-limit-gb G``: each command runs in a
memory cgroup of G GiB (root, cgroup v1: bench/measure.py ``MemoryLimit``), page cache included, as on a machine
with that much memory; the group's peak and how often it reached the limit are recorded, and a command killed
there is a result (``failed``: its exit status), not an error.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from measure import MemoryLimit, anon_peak_command, checkouts, recompress, timed  # bench/measure.py, beside this script
from stream_memory import MAKERS, make_checkpoint

def versions() -> dict[str, str]:
    """The versions of what the commands ran on (TensorRT's flavor among them, for ``export-trt``)."""
    from importlib import metadata
    out = {}
    for pkg in ("torch", "onnxruntime", "onnx", "tensorrt", "tensorrt-rtx"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def command_args(command: str, ckpt: Path, data: Path, out: Path) -> list[str]:
    """``evaluate``, ``export``, ``export-dense-int8``, ``export-trt``, or ``finetune-OPTIMIZER[-keep-best]`` (20
    steps of ``checkpoint --method finetune``, without keep-best unless the name ends so)."""
    if command == "evaluate":
        return ["evaluate", str(ckpt), "--data", str(data), "--no-latency"]
    if command in ("export", "export-dense-int8", "export-trt"):
        dense = ["--dense", "int8"] if command == "export-dense-int8" else []
        target = "trt" if command == "export-trt" else "onnx"
        return ["export", str(ckpt), "--data", str(data), "--target", target, *dense, "-o", str(out)]
    optimizer = command.removeprefix("finetune-").removesuffix("-keep-best")
    keep = "--keep-best" if command.endswith("-keep-best") else "--no-keep-best"
    return ["checkpoint", str(ckpt), "--method", "finetune", "--data", str(data), "--steps", "20", keep,
            "--optimizer", optimizer, "-o", str(out)]


def measure(root: Path, tmp: Path, args: list[str], limit: MemoryLimit | None = None) -> dict:
    """One command of the checkout at ``root``: seconds, peak RSS and peak anonymous memory, or how it failed (a
    result, not fatal: a command killed at a memory limit, or refused); in ``limit``'s memory cgroup, also the
    group's peak (page cache included)."""
    anon = tmp / "anon.txt"
    anon.unlink(missing_ok=True)
    if limit is None:
        r = timed(anon_peak_command(root, anon, args), may_fail=True)
    else:
        limit.reset()
        r = {**timed([*limit.prefix, *anon_peak_command(root, anon, args)], may_fail=True), **limit.usage()}
    if anon.exists():
        r["peak_anon_bytes"] = int(anon.read_text())
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="1000000,10000000")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baseline", default=None, help="git revision measured too, interleaved")
    ap.add_argument("--this-only-from", type=int, default=None, help="sizes from this many rows: this checkout only")
    ap.add_argument("--zeros", action="store_true", help="tables of zeros in sparse files")
    ap.add_argument("--checkpoints", default="fp32,int8")
    ap.add_argument("--commands", default="evaluate,export")
    ap.add_argument("--source", default="native", help=f"native or upstream formats: {', '.join(MAKERS)}")
    ap.add_argument("--memory-limit-gb", type=float, default=None,
                    help="run each command in a memory cgroup of this size (bench/measure.py MemoryLimit)")
    a = ap.parse_args()
    limit = MemoryLimit(int(a.memory_limit_gb * 2**30)) if a.memory_limit_gb else None
    results = []
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        tmp = Path(tmp)
        with checkouts(a.baseline, tmp / "baseline") as trees:
            for rows, source in [(int(r), s) for r in a.rows.split(",") for s in a.source.split(",")]:
                if source == "native":
                    table = make_checkpoint(tmp / "fp32", rows, a.dim, zeros=a.zeros)
                else:
                    table = MAKERS[source](tmp / "fp32", rows, a.dim)
                if "int8" in a.checkpoints.split(","):
                    assert source == "native", "--checkpoints int8 compresses a native checkpoint"
                    recompress("checkpoint", str(tmp / "fp32"), "--method", "int8", "-o", str(tmp / "int8"))
                recompress("data", "synthetic", "-o", str(tmp / "data"), "--tables", str(rows), "--samples", "40000")
                only_here = a.this_only_from is not None and rows >= a.this_only_from
                for rep in range(a.repeats):
                    for name, root in trees.items():
                        if only_here and name != "this checkout":
                            continue
                        for ckpt in a.checkpoints.split(","):
                            for command in a.commands.split(","):
                                args = command_args(command, tmp / ckpt, tmp / "data", tmp / "x")
                                r = {"rows": rows, "dim": a.dim, "table_bytes": table, "source": source, "checkpoint": ckpt,
                                     "command": command, "checkout": name, "repeat": rep,
                                     **measure(root, tmp, args, limit)}
                                fp32 = rows * a.dim * 4  # what the model reads, whatever the file stores
                                if "failed" not in r:
                                    r["peak_over_fp32_table"] = round(r["peak_rss_bytes"] / fp32, 3)
                                    r["anon_over_fp32_table"] = round(r["peak_anon_bytes"] / fp32, 3)
                                results.append(r)
                                print(json.dumps(r), flush=True)
                                shutil.rmtree(tmp / "x", ignore_errors=True)
                for p in ("fp32", "int8", "data"):
                    shutil.rmtree(tmp / p, ignore_errors=True)
                (tmp / "fp32").unlink(missing_ok=True)  # dlrm's is a file
    if limit is not None:
        limit.close()
    Path(a.out).write_text(json.dumps({"machine": "2 CPU cores, 24 GB", "versions": versions(),
                                       "baseline": a.baseline, "zeros": a.zeros,
                                       "source": a.source, "memory_limit_gb": a.memory_limit_gb,
                                       "vm_overcommit_memory": Path("/proc/sys/vm/overcommit_memory").read_text().strip(),
                                       "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
