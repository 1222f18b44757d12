"""Benchmark (not a test): does recompress score RecBole's own checkpoints as RecBole scored them?

    python bench/upstream_recbole.py --out bench/results/upstream_recbole.json
    python bench/upstream_recbole.py --runs DIR --out bench/results/upstream_recbole_models.json

With ``--runs``: DIR is what ``bench/upstream_recbole_build.py`` wrote with RecBole's own code (BERT4Rec and
GRU4Rec trained on ml-100k, RecBole's returned metrics, its ``full_sort_predict`` scores). For each checkpoint:
the metrics recompress computes on the same data against RecBole's (which rounds to 4 decimals), the largest
score difference against RecBole's on every test user and item, int8 item rows (paired difference with its
confidence interval on the same users), and ONNX export parity.

Without it:
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
    ap.add_argument("--runs", type=Path, help="a folder written by bench/upstream_recbole_build.py")
    a = ap.parse_args()
    if a.runs:
        result = runs(a.runs, run)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=1))
        return
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


def score_parity(ckpt: Path, ref_file: Path) -> float:
    """Largest |recompress score - RecBole's full_sort_predict score| over every test user and real item."""
    import torch

    from recompress.adapters import load_any

    ref = torch.load(ref_file, weights_only=True)
    seq, n = ref["item_seq"], ref["item_seq_len"]
    left = torch.zeros_like(seq)  # RecBole's items from column 0 -> recompress's left padding
    for r in range(len(seq)):
        left[r, seq.shape[1] - n[r]:] = seq[r, :n[r]]
    with torch.no_grad():
        got = load_any(ckpt).model(left, torch.arange(ref["scores"].shape[1])[None])
    return float((got[:, 1:] - ref["scores"][:, 1:]).abs().max())


def runs(folder: Path, run) -> dict:
    upstream = json.loads((folder / "results.json").read_text())
    out: dict = {"runs": str(folder), "data": str(DATA), "checkpoints": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run("data", "sequences", str(DATA), "--layout", "recbole", "-o", str(work / "d"))
        for name, theirs in upstream.items():
            ckpt = folder / name
            info = json.loads(run("inspect", str(ckpt), "--json"))
            entry = {"family": info["family"], "hparams": info["hparams"], "hparam_source": info["hparam_source"],
                     "recbole": {"val": theirs["best_valid_result"], "test": theirs["test_result"]}}
            run("checkpoint", str(ckpt), "--method", "int8", "-o", str(work / f"{name}.q"))
            for split in ("val", "test"):
                base, q = work / f"{name}.{split}.json", work / f"{name}.{split}.q.json"
                run("evaluate", str(ckpt), "--data", str(work / "d"), "--split", split, "--no-latency", "--json", str(base))
                run("evaluate", str(work / f"{name}.q"), "--data", str(work / "d"), "--split", split, "--no-latency",
                    "--compare", str(base), "--json", str(q))
                mine, quant = (json.loads(f.read_text()) for f in (base, q))
                acc = mine["accuracy"]["torch"]
                entry[split] = {"users": mine["data"]["rows"], **{m: acc[m] for m in METRICS},
                                "equal_to_recbole_at_4_decimals": all(
                                    round(acc[m], 4) == entry["recbole"][split][m.replace("hr@", "hit@")] for m in METRICS),
                                "int8": {m: quant["accuracy"]["torch"][m] for m in METRICS}, "int8_vs_base": quant["compare"]}
                entry["table_bytes"] = {"base": mine["bytes"]["tables"], "int8": quant["bytes"]["tables"]}
            entry["max_abs_score_diff_vs_recbole"] = score_parity(ckpt, folder / name.replace(".pth", "_ref.pt"))
            run("export", str(ckpt), "--data", str(work / "d"), "-o", str(work / f"{name}.onnx"))
            entry["onnx_parity"] = json.loads((work / f"{name}.onnx" / "manifest.json").read_text())["parity"]
            out["checkpoints"][name] = entry
    return out


if __name__ == "__main__":
    main()
