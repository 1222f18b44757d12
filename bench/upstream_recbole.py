"""Benchmark (not a test): does recompress score RecBole's own SASRec checkpoint as RecBole scored it?

    python bench/upstream_recbole.py --out bench/results/upstream_recbole.json

The checkpoint is ``../shared/fixtures/checkpoints/recbole_SASRec.pth`` (RecBole 1.2.1 trained it one epoch on
ml-100k and stored ``best_valid_score``, its validation MRR@10 with full ranking); the data is
``../shared/data/movielens_100k_recbole/ml-100k.inter.gz``, prepared with ``--layout recbole``. recompress
evaluates the validation and test splits, then compresses the item table to int8 and evaluates again (paired,
same users). RecBole itself is not run here (it needs numpy < 2 and torch < 2.6 shims); its stored score is the
reference.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
CKPT = SHARED / "fixtures/checkpoints/recbole_SASRec.pth"
DATA = SHARED / "data/movielens_100k_recbole/ml-100k.inter.gz"
METRICS = ("mrr@10", "ndcg@10", "hr@10")


def main() -> None:
    from measure import recompress as run  # bench/measure.py, beside this script

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    info = json.loads(run("inspect", str(CKPT), "--json"))
    result = {"checkpoint": str(CKPT), "data": str(DATA), "hparam_source": info["hparam_source"],
              "stored_by_recbole": {"best_valid_score (valid MRR@10)": float(info["notes"][0].split("= ")[1].split()[0])}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run("data", "sequences", str(DATA), "--layout", "recbole", "-o", str(work / "d"))
        run("checkpoint", str(CKPT), "--method", "int8", "-o", str(work / "q"))
        for split in ("val", "test"):
            run("evaluate", str(CKPT), "--data", str(work / "d"), "--split", split, "--no-latency",
                "--json", str(work / f"{split}.json"))
            run("evaluate", str(work / "q"), "--data", str(work / "d"), "--split", split, "--no-latency",
                "--compare", str(work / f"{split}.json"), "--json", str(work / f"{split}-int8.json"))
            base, q = (json.loads((work / f).read_text()) for f in (f"{split}.json", f"{split}-int8.json"))
            result[split] = {"users": base["data"]["rows"], **{m: base["accuracy"]["torch"][m] for m in METRICS},
                             "int8": {m: q["accuracy"]["torch"][m] for m in METRICS},
                             "int8_vs_base": q["compare"]}
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
