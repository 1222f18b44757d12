"""Per-rank memory and time of 2-rank training with the tables replicated vs sharded by TorchRec
(``--shard-tables table-wise|column-wise``), against one process; interleaved, same global batch.

Each rank's own (anonymous) memory is sampled every 5 ms, as ``bench/measure.py`` does for one process; the
training loop's seconds come from the checkpoint (``metrics.train.seconds`` or the fine-tune's). Two
scenarios: ``train`` from scratch (every rank first initializes the whole model, as one process would) and
``finetune`` from a native checkpoint of the same model (mapped; row-wise Adagrad writes only the rows steps
touch). Ratios are to the replicated 2-rank run of the same repeat. One process runs with 2 threads (and 1, as a
reference), each rank with 1.

    python bench/shard_memory.py --out bench/results/shard_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

SAMPLER = """
import os, re, sys, threading, time
peak = [0]
def sample():
    while True:
        s = open("/proc/self/status").read()
        peak[0] = max(peak[0], int(re.search(r"RssAnon:\\s+(\\d+)", s).group(1)) << 10)
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
from recompress import distributed
exit_process = distributed.exit_process
def write_peak_then_exit(code):  # under torchrun a rank ends with os._exit, past any finally
    open(f"{sys.argv[1]}.{os.environ.get('RANK', '0')}", "w").write(str(peak[0]))
    exit_process(code)
distributed.exit_process = write_peak_then_exit
from recompress.cli import main
try:
    main(sys.argv[2:])
finally:
    write_peak_then_exit(0)
"""
VARIANTS = {"1 process": (1, None, 2), "1 process, 1 thread": (1, None, 1), "2 ranks, replicated": (2, None, 1),
            "2 ranks, table-wise": (2, "table-wise", 1), "2 ranks, column-wise": (2, "column-wise", 1)}
# (processes, --shard-tables, threads per process); weight differences are to both 1-process runs: with
# row-wise Adagrad, float-order differences (threads, ranks) grow over steps (the first update of a row is
# lr * g / |g|, whatever g's size)


def run(script: Path, peak: Path, args: list[str], nproc: int, threads: int) -> tuple[float, list[int]]:
    launcher = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                                  if nproc > 1 else [])]
    t0 = time.perf_counter()
    p = subprocess.run([*launcher, str(script), str(peak), *args], capture_output=True, text=True, check=False,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"recompress {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return wall, [int(Path(f"{peak}.{r}").read_text()) for r in range(nproc)]


def max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(str(a / "weights.safetensors")), load_file(str(b / "weights.safetensors"))
    return max(float(np.abs(wa[k].astype(np.float64) - wb[k].astype(np.float64)).max()) for k in wa)


def train_seconds(out: Path) -> float:
    spec = json.loads((out / "spec.json").read_text())
    return spec["history"][-1]["finetune"]["seconds"] if spec["history"] else spec["metrics"]["train"]["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/recompress-bench/shard")
    ap.add_argument("--tables", default="1000000,1000000,1000000,1000000")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    script = work / "sampled.py"
    script.write_text(SAMPLER)
    rows = [int(r) for r in args.tables.split(",")]
    table_bytes = sum(rows) * args.dim * 4
    data = work / "data"
    if not data.exists():
        subprocess.run([sys.executable, "-m", "recompress", "data", "synthetic", "--samples", "200000", "--tables",
                        args.tables, "-o", str(data)], check=True, capture_output=True)
    budget = ["--optimizer", "rowwise-adagrad", "--lr", "0.05", "--steps", str(args.steps),
              "--batch-size", str(args.batch_size)]
    base = work / "base"
    if not base.exists():  # the fine-tune scenario's checkpoint: the same model, trained for 1 step
        subprocess.run([sys.executable, "-m", "recompress", "train", "--data", str(data), "--dim", str(args.dim),
                        "--steps", "1", "-o", str(base)], check=True, capture_output=True)
    scenarios = {"train": ["train", "--data", str(data), "--dim", str(args.dim), *budget],
                 "finetune": ["checkpoint", str(base), "--method", "finetune", "--data", str(data),
                              "--no-keep-best", *budget]}
    results: dict[str, object] = {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "table_rows": rows,
                                  "dim": args.dim, "table_bytes": table_bytes, "budget": budget, "scenarios": {}}
    for scenario, cmd in scenarios.items():
        runs: list[dict[str, object]] = []
        for rep in range(args.repeats):
            for label, (nproc, shard, threads) in VARIANTS.items():
                out = work / f"{scenario}-{rep}-{label.replace(' ', '').replace(',', '-')}"
                extra = [*(["--shard-tables", shard] if shard else []), "-o", str(out), "--overwrite"]
                wall, peaks = run(script, work / "peak", [*cmd, *extra], nproc, threads)
                runs.append({"variant": label, "repeat": rep, "threads_per_process": threads,
                             "wall_seconds": round(wall, 2), "train_seconds": train_seconds(out),
                             "own_memory_peak_bytes_per_rank": peaks,
                             "own_memory_peak_over_tables": [round(p / table_bytes, 3) for p in peaks],
                             "max_weight_diff_to_1_process": max_diff(work / f"{scenario}-{rep}-1process", out),
                             "max_weight_diff_to_1_process_1_thread":
                                 max_diff(work / f"{scenario}-{rep}-1process-1thread", out) if nproc > 1 else None})
                print(scenario, label, rep, runs[-1]["train_seconds"], [p >> 20 for p in peaks], flush=True)
        ref = {r["repeat"]: r["train_seconds"] for r in runs if r["variant"] == "2 ranks, replicated"}
        for r in runs:
            r["train_time_ratio_to_replicated"] = round(r["train_seconds"] / ref[r["repeat"]], 3)
        results["scenarios"][scenario] = {"command": cmd, "runs": runs}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
