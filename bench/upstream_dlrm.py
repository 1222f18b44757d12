"""Benchmark (not a test): does recompress score a model facebookresearch/dlrm trained as dlrm does?

    python bench/upstream_dlrm.py --repo /path/to/dlrm --python /path/to/python-with-numpy1 \
        --data ../shared/data/criteo_kaggle_head10k/criteo_train_head10k.txt.gz --out bench/results/upstream_dlrm.json

The upstream code is not part of recompress: pass a checkout of facebookresearch/dlrm and an interpreter
that can run it (its Kaggle preprocessing needs numpy < 2, and ``--mlperf-logging`` needs scikit-learn and
mlperf_logging). This script writes the Criteo lines as ``train.txt`` in a temporary folder, runs dlrm's
own ``dlrm_s_pytorch.py`` (its data processing, training on CPU, test passes, ``--save-model``), and keeps
what it printed last. recompress then prepares the same file with ``--layout dlrm`` (and from dlrm's
processed ``.npz``), evaluates the saved model, compresses its tables to int8 and evaluates again (paired
on the same test rows). Everything lands in one JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

LAST = re.compile(r"auc ([\d.]+), best auc [\d.]+, accuracy ([\d.]+) %")
FLAGS = ["--arch-sparse-feature-size=16", "--arch-mlp-bot=13-64-16", "--arch-mlp-top=64-1", "--data-generation=dataset",
         "--data-set=kaggle", "--loss-function=bce", "--round-targets=True", "--learning-rate=0.1",
         "--mini-batch-size=128", "--print-freq=10", "--test-freq=20", "--mlperf-logging"]


def main() -> None:
    from measure import run  # bench/measure.py, beside this script

    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True, help="a facebookresearch/dlrm checkout (dlrm_s_pytorch.py)")
    ap.add_argument("--python", required=True, help="an interpreter that runs it (numpy < 2, scikit-learn, mlperf_logging)")
    ap.add_argument("--data", required=True, help="Criteo Kaggle lines (train.txt or .gz)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=2)
    a = ap.parse_args()
    result: dict = {"upstream": "facebookresearch/dlrm", "repo": str(Path(a.repo).resolve()), "data": a.data,
                    "flags": [*FLAGS, f"--nepochs={a.epochs}"]}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        opener = gzip.open if a.data.endswith(".gz") else open
        with opener(a.data, "rb") as src, open(work / "train.txt", "wb") as dst:
            shutil.copyfileobj(src, dst)
        t0 = time.time()
        out = run([a.python, "-W", "ignore", str(Path(a.repo).resolve() / "dlrm_s_pytorch.py"), *result["flags"],
                   f"--raw-data-file={work / 'train.txt'}", f"--processed-data-file={work / 'processed.npz'}",
                   f"--save-model={work / 'dlrm.pt'}"], cwd=work)
        result["upstream_seconds"] = round(time.time() - t0, 1)
        auc, acc = LAST.findall(out)[-1]
        result["printed_by_upstream"] = {"auc": float(auc), "accuracy": float(acc) / 100}
        rc = [sys.executable, "-m", "recompress"]
        model = work / "dlrm.pt"
        result["inspect"] = json.loads(run([*rc, "inspect", str(model), "--json"]))["hparam_source"]
        run([*rc, "data", "criteo", str(work / "train.txt"), "--layout", "dlrm", "-o", str(work / "d")])
        run([*rc, "data", "criteo", str(work / "kaggleAdDisplayChallenge_processed.npz"), "--layout", "dlrm",
             "-o", str(work / "d_npz")])
        for name, data in (("recompress", "d"), ("recompress_from_npz", "d_npz")):
            run([*rc, "evaluate", str(model), "--data", str(work / data), "--no-latency", "--json", str(work / f"{name}.json")])
            r = json.loads((work / f"{name}.json").read_text())
            result[name] = {"rows": r["data"]["rows"], **{k: r["accuracy"]["torch"][k] for k in ("auc", "accuracy", "logloss")}}
        run([*rc, "checkpoint", str(model), "--method", "int8", "-o", str(work / "int8")])
        run([*rc, "evaluate", str(work / "int8"), "--data", str(work / "d"), "--no-latency",
             "--compare", str(work / "recompress.json"), "--json", str(work / "int8.json")])
        q = json.loads((work / "int8.json").read_text())
        result["int8"] = {k: q["accuracy"]["torch"][k] for k in ("auc", "accuracy", "logloss")}
        result["int8_vs_base"] = q["compare"]
        result["bytes"] = {"base": json.loads((work / "recompress.json").read_text())["bytes"], "int8": q["bytes"]}
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("printed_by_upstream", "recompress", "recompress_from_npz", "int8",
                                              "int8_vs_base")}, indent=1))


if __name__ == "__main__":
    main()
