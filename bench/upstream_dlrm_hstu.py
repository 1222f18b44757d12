"""Benchmark (not a test): does recompress score a DlrmHSTU ranker that generative-recommenders' dlrm_v3 code trained,
on its own data, as dlrm_v3's own ``eval_loop`` scored it; and what do int8 rows and an ONNX export change?

    python bench/upstream_dlrm_hstu.py --repo GR_REPO --python GR_PYTHON \
        --movielens ../shared/data/movielens_latest_small --out bench/results/upstream_dlrm_hstu.json [--work DIR]

``bench/upstream_dlrm_hstu_train.py`` runs under GR_PYTHON (see there): upstream's processor writes the
``sasrec_format.csv`` its movielens-20m dataset reads, upstream's ``make_optimizer_and_shard``/``train_loop`` train
its movielens-20m config for one epoch on the CPU (tables cut to the data's largest ids; upstream's uih KJT bug
fixed, see there) and save the checkpoint with ``save_dmp_checkpoint``, and upstream's ``eval_loop`` prints MSE/MAE
(``train.log``) while every test batch's predictions are recorded (``eval_dump.pt``). Here recompress reads the
checkpoint folder (``inspect``: nothing else is told), prepares the same csv with ``--format gr --layout gr``,
evaluates it (protocol ``dlrm_v3``) and compares candidate by candidate; then int8 rows of both tables (paired
against the float model, same candidates), and the int8 model exported to ONNX and evaluated from the export.
With ``--work DIR`` holding a finished training run, the training step is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PRINTED = re.compile(r"^metric/(\w+)/rating: ([\d.eE+-]+)$", re.M)


def run(*args: str | Path, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    if r.returncode:
        raise SystemExit(f"{' '.join(map(str, args))} failed:\n{r.stderr[-3000:]}")
    return r


def recompress(*args: str | Path) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "recompress", *args)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True)
    ap.add_argument("--python", required=True, help="the interpreter that runs upstream's training")
    ap.add_argument("--movielens", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=None, help="a folder to keep (and reuse) the training run in")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="dlrm_hstu_"))
    summary_file = work / "summary.json"
    if not summary_file.exists():
        t0 = time.time()
        train = run(a.python, HERE / "upstream_dlrm_hstu_train.py", "--repo", a.repo, "--movielens", a.movielens,
                    "--out", work)
        (work / "train.log").write_text(train.stdout + train.stderr)
        print(f"upstream training and evaluation: {time.time() - t0:.0f}s", flush=True)
    summary = json.loads(summary_file.read_text())
    printed = {k: float(v) for k, v in PRINTED.findall((work / "train.log").read_text())}
    ckpt = Path(summary["checkpoint"])

    import torch
    dump = torch.load(work / "eval_dump.pt", weights_only=True)
    upstream = torch.cat([p.reshape(-1) for p in dump["preds"]]).double().numpy()
    upstream_users = torch.cat(dump["user_ids"]).numpy()

    info = json.loads(recompress("inspect", ckpt, "--json").stdout)
    data = work / "recompress_data"
    if not data.exists():
        recompress("data", "sequences", work / "data/ml-20m/sasrec_format.csv", "--format", "gr", "--layout", "gr",
                   "-o", data)

    from recompress.data import open_dataset
    from recompress.models.dlrm_hstu import FAMILY, _user_ids
    from recompress.stats import decode, paired_delta
    ds = open_dataset(data)
    ours_users = _user_ids(ds)[FAMILY.split_users(ds, "test")[:len(upstream_users)]]

    def evaluate(path: Path, name: str) -> dict:
        t0 = time.time()
        recompress("evaluate", path, "--data", data, "--no-latency", "--json", work / f"{name}.json")
        r = json.loads((work / f"{name}.json").read_text())
        r["seconds"] = round(time.time() - t0, 1)
        r["values"] = decode(r["predictions"]["base64"], "<f4")
        return r

    base = evaluate(ckpt, "float")
    int8_ckpt = work / "int8"
    if not int8_ckpt.exists():
        recompress("checkpoint", ckpt, "--method", "int8", "-o", int8_ckpt)
    int8 = evaluate(int8_ckpt, "int8")
    onnx = work / "int8_onnx"
    if not onnx.exists():
        export = recompress("export", int8_ckpt, "-o", onnx, "--data", data)
        (work / "export.log").write_text(export.stdout + export.stderr)
    exported = evaluate(onnx, "int8_onnx")
    ones = np.ones(len(base["values"]))

    def delta(metric: str, new: np.ndarray) -> dict:
        return {k: v for k, v in paired_delta(metric, ones, new, base["values"]).items() if k != "resamples"}

    result = {
        "upstream": "facebookresearch/generative-recommenders@2e81fab dlrm_v3 (movielens-20m config, one epoch, CPU)",
        "data": "MovieLens latest-small through upstream's research MovielensDataProcessor (ml-20m branch)",
        "training": {k: summary[k] for k in ("epochs", "max_seq_len", "tables", "train_batches_per_epoch",
                                             "test_batches", "train_s", "eval_s")},
        "upstream_printed": printed,
        "inspect": {"format": info["format"], "family": info["family"],
                    "hparams": info["hparams"], "sources": info["hparam_source"],
                    "tables": {t["name"]: [t["rows"], t["dim"], t["dtype"]] for t in info["tables"]}},
        "recompress": {k: base["accuracy"]["torch"][k] for k in ("mse", "mae", "rows")},
        "same_test_users_in_order": bool(len(ours_users) == len(upstream_users)
                                         and (ours_users == upstream_users).all()),
        "candidates_compared": int(len(upstream)),
        "max_abs_prediction_diff_vs_upstream": float(np.abs(base["values"] - upstream).max()),
        "mse_diff_vs_printed": base["accuracy"]["torch"]["mse"] - printed["lifetime_mse"],
        "mae_diff_vs_printed": base["accuracy"]["torch"]["mae"] - printed["lifetime_mae"],
        "bytes": {"upstream_stored_fp16": info["embedding_bytes"], "float32_as_loaded": base["bytes"]["embeddings"],
                  "int8": int8["bytes"]["embeddings"]},
        "int8": {**{k: int8["accuracy"]["torch"][k] for k in ("mse", "mae")},
                 "delta_mse": delta("mse", int8["values"]), "delta_mae": delta("mae", int8["values"])},
        "int8_onnx": {"onnxruntime": {k: exported["accuracy"]["onnxruntime"][k] for k in ("mse", "mae")},
                      "export_vs_checkpoint": exported.get("export_vs_checkpoint"),
                      "export_log": (work / "export.log").read_text().strip().splitlines()[-1]},
        "seconds": {"evaluate_float": base["seconds"], "evaluate_int8": int8["seconds"],
                    "evaluate_int8_onnx": exported["seconds"]},
        "environment": {"cpus": os.cpu_count(), "torch": torch.__version__},
    }
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
