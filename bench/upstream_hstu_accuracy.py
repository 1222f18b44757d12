"""Benchmark (not a test): does recompress score a research HSTU that generative-recommenders trained, on its own
data, as generative-recommenders' own evaluation scored it?

    python bench/upstream_hstu_accuracy.py --repo GR_REPO --python HSTU_PYTHON \
        --movielens ../shared/data/movielens_latest_small --out bench/results/upstream_hstu_accuracy.json

``bench/upstream_hstu_train.py`` runs under HSTU_PYTHON (torch, gin-config, pandas): upstream's DataProcessor
turns the MovieLens files into its ``sasrec_format.csv``, upstream's ``train_fn`` trains its ml-1m HSTU config
for ``--epochs`` (on the CPU; three device lines changed, see there) and saves the checkpoint, and upstream's
``eval_metrics_v2_from_tensors`` scores every user (``upstream_eval.json``, beside ``train.log`` with what
``train_fn`` printed). Here recompress reads the same checkpoint (``inspect``: nothing else is told), prepares
the same file with ``--layout gr --items movies.csv`` (upstream's processed catalogue), evaluates full ranking
and compares user by user: upstream's rank r (1-based) is recompress's rank + 1, except that upstream stops
looking after its top 2,500 (a target below is given rank 2,501, which only MRR sees): both MRRs are recorded,
and recompress's ranks capped the same way. For contrast, the same file prepared two other ways. Then int8 rows (evaluated paired against the float model: same
users), and the int8 model exported to ONNX and evaluated from the export.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PRINTED = re.compile(r"eval @ epoch (\d+) in [\d.]+s: NDCG@10 ([\d.]+), NDCG@50 ([\d.]+), HR@10 ([\d.]+), "
                     r"HR@50 ([\d.]+), MRR ([\d.]+)")
UPSTREAM_MAX_K = 2500  # eval_metrics_v2_from_tensors's MAX_K: ranks beyond are MAX_K + 1


def per_user(rank1: np.ndarray) -> dict[str, np.ndarray]:
    """Upstream's per-user metrics from 1-based ranks."""
    r = rank1.astype(np.float64)
    out = {}
    for k in (10, 50):
        out[f"ndcg@{k}"] = np.where(r <= k, 1.0 / np.log2(r + 1.0), 0.0)
        out[f"hr@{k}"] = (r <= k).astype(np.float64)
    out["mrr"] = 1.0 / r
    return out


def ranks_of(results: Path) -> np.ndarray:
    from recompress.stats import decode

    pred = json.loads(results.read_text())["predictions"]
    assert pred["kind"] == "ranks" and not pred["sampled"], "every user's rank is needed"
    return decode(pred["base64"], "<i4").astype(np.int64)


def main() -> None:
    from measure import run  # bench/measure.py, beside this script

    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True, help="a facebookresearch/generative-recommenders checkout")
    ap.add_argument("--python", required=True, help="an interpreter with torch, gin-config and pandas")
    ap.add_argument("--movielens", default="../shared/data/movielens_latest_small",
                    help="a folder with GroupLens ratings.csv(.gz) and movies.csv")
    ap.add_argument("--epochs", type=int, default=101, help="train_fn.num_epochs (upstream's ml-1m config: 101)")
    ap.add_argument("--trained", default=None, help="skip training: the OUT folder of an upstream_hstu_train.py run")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    commit = subprocess.run(["git", "-C", a.repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result: dict = {"upstream": f"facebookresearch/generative-recommenders@{commit or 'unknown'}",
                    "data": str(Path(a.movielens).resolve()), "epochs": a.epochs}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        up = Path(a.trained).resolve() if a.trained else work / "upstream"
        if not a.trained:
            t0 = time.time()
            run([a.python, str(HERE / "upstream_hstu_train.py"), a.repo, a.movielens, str(up), str(a.epochs)])
            result["train_seconds"] = round(time.time() - t0, 1)
        printed = PRINTED.findall((up / "train.log").read_text())
        epoch, *values = printed[-1]
        result["printed_by_upstream"] = {"epoch": int(epoch), **dict(zip(("ndcg@10", "ndcg@50", "hr@10", "hr@50", "mrr"),
                                                                        map(float, values)))}
        ref = json.loads((up / "upstream_eval.json").read_text())
        result["upstream_eval"] = ref["mean"]
        ckpt = next((up / "ckpts").rglob("HSTU-*"))
        result["checkpoint"] = str(ckpt.relative_to(up))
        rc = [sys.executable, "-m", "recompress"]
        info = json.loads(run([*rc, "inspect", str(ckpt), "--json"]))
        result["inspect"] = {"format": info["format"], "hparam_source": info["hparam_source"]}
        data = work / "data"
        run([*rc, "data", "sequences", str(up / "tmp/ml-20m/sasrec_format.csv"), "--layout", "gr", "--items",
             str(up / "tmp/processed/ml-20m/movies.csv"), "-o", str(data)])
        users = np.load(data / "user_ids.npy")
        order = {u: i for i, u in enumerate(ref["per_user"]["user_id"])}
        theirs = [order[int(u)] for u in users]  # upstream's rows in recompress's user order
        run([*rc, "evaluate", str(ckpt), "--data", str(data), "--no-latency", "--json", str(work / "base.json")])
        mine = ranks_of(work / "base.json") + 1
        capped = np.minimum(mine, UPSTREAM_MAX_K + 1)
        ours, ours_capped = per_user(mine), per_user(capped)
        diff = {}
        for k, v in ours_capped.items():
            up_k = np.asarray(ref["per_user"][k], dtype=np.float64)[theirs]
            diff[k] = {"upstream": float(up_k.mean()), "recompress": float(ours[k].mean()),
                       "recompress_ranks_capped_as_upstream": float(v.mean()),
                       "users_that_differ": int((np.abs(v - up_k) > 1e-6).sum()),
                       "max_abs_diff_per_user": float(np.abs(v - up_k).max())}
        result["recompress_vs_upstream"] = {"users": len(mine), "ranks_beyond_upstream_top_k": int((mine > UPSTREAM_MAX_K).sum()),
                                            "metrics": diff}
        otherwise = {}  # what preparing the file another way would score: the rules matter
        for name, extra in (("--layout gr without --items (catalogue: the rated items only)", ["--layout", "gr"]),
                            ("--layout sasrec (every id a candidate, the whole history excluded)", ["--layout", "sasrec"])):
            other = work / f"other{len(otherwise)}"
            run([*rc, "data", "sequences", str(up / "tmp/ml-20m/sasrec_format.csv"), *extra, "-o", str(other)])
            run([*rc, "evaluate", str(ckpt), "--data", str(other), "--no-latency", "--json", str(work / f"{other.name}.json")])
            r = per_user(ranks_of(work / f"{other.name}.json") + 1)
            otherwise[name] = {k: float(v.mean()) for k, v in r.items()}
        result["read_otherwise"] = otherwise
        run([*rc, "checkpoint", str(ckpt), "--method", "int8", "-o", str(work / "int8")])
        run([*rc, "evaluate", str(work / "int8"), "--data", str(data), "--no-latency", "--compare",
             str(work / "base.json"), "--json", str(work / "int8.json")])
        q = json.loads((work / "int8.json").read_text())
        result["int8"] = {"accuracy": q["accuracy"]["torch"], "vs_float": q["compare"], "bytes": q["bytes"]}
        run([*rc, "export", str(work / "int8"), "-o", str(work / "onnx")])
        run([*rc, "evaluate", str(work / "onnx"), "--data", str(data), "--no-latency", "--json", str(work / "onnx.json")])
        o = json.loads((work / "onnx.json").read_text())
        result["int8_onnx"] = {"accuracy": o["accuracy"], "export_vs_checkpoint": o["export_vs_checkpoint"]}
        result["float_bytes"] = json.loads((work / "base.json").read_text())["bytes"]
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("printed_by_upstream", "upstream_eval", "recompress_vs_upstream")}, indent=1))


if __name__ == "__main__":
    main()
