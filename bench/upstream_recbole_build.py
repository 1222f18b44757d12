"""Upstream side of ``bench/upstream_recbole.py --runs``: RecBole's own code trains BERT4Rec and GRU4Rec on
ml-100k and writes their checkpoints, the metrics RecBole returns, and reference scores.

    $RECBOLE_PYTHON bench/upstream_recbole_build.py --out DIR

Run it with a Python that has ``recbole==1.2.1`` (with torch 2.13: ``pip install torch==2.13.0 recbole==1.2.1
'numpy<2' 'pandas<3'``), never with recompress's. Shims, in this process only: numpy's removed aliases
(RecBole's MRR uses ``np.float``), ``torch.load(weights_only=False)`` for RecBole reloading its own
checkpoints, and an empty ``ray.tune`` when ray fails to import (``run_recbole`` never tunes). Data: the
ml-100k bundled in the recbole wheel (the same bytes as ../shared/data/movielens_100k_recbole).

Writes into DIR: ``{run}.pth`` (byte copies of what ``Trainer._save_checkpoint`` wrote), ``{run}_ref.pt``
(``full_sort_predict`` scores for every test user, with RecBole's ``item_seq`` / ``item_seq_len`` / targets;
tensors only), and ``results.json`` (``run_recbole``'s best_valid_result and test_result per file).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

for alias, value in {"float_": np.float64, "bool8": np.bool_, "int": int, "float": float, "bool": bool,
                     "long": np.int64, "str": str, "object": object, "complex_": np.complex128,
                     "unicode_": np.str_}.items():
    if not hasattr(np, alias):
        setattr(np, alias, value)
_load = torch.load
torch.load = lambda *a, **k: _load(*a, **{"weights_only": False, **k})
try:
    from ray import tune  # noqa: F401
except Exception:  # ray 2.6 needs pkg_resources; only hyper-parameter tuning uses it
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        del sys.modules[name]
    sys.modules["ray"], sys.modules["ray.tune"] = types.ModuleType("ray"), types.ModuleType("ray.tune")
    sys.modules["ray"].tune = sys.modules["ray.tune"]

import recbole  # noqa: E402
from recbole.quick_start import load_data_and_model, run_recbole  # noqa: E402

COMMON = {"data_path": str(Path(recbole.__file__).parent / "dataset_example"), "epochs": 3, "train_batch_size": 512,
          "eval_batch_size": 512, "MAX_ITEM_LIST_LENGTH": 20, "loss_type": "CE", "train_neg_sample_args": None,
          "stopping_step": 10, "eval_step": 1, "device": "cpu", "use_gpu": False, "seed": 2020,
          "metrics": ["MRR", "NDCG", "Hit"], "topk": [10], "valid_metric": "MRR@10", "show_progress": False}
RUNS = {"BERT4Rec": ("BERT4Rec", {"n_layers": 2, "n_heads": 2, "hidden_size": 32, "inner_size": 64}),
        "GRU4Rec": ("GRU4Rec", {"embedding_size": 32, "hidden_size": 64, "num_layers": 2, "dropout_prob": 0.3}),
        "GRU4Rec_1layer": ("GRU4Rec", {"embedding_size": 32, "hidden_size": 32, "num_layers": 1, "dropout_prob": 0.3})}


def train(out: Path, run: str, model: str, extra: dict) -> dict:
    (out / "saved").mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{run}-", dir=out / "saved"))  # a fresh folder: one file in it
    res = run_recbole(model=model, dataset="ml-100k", config_dict={**COMMON, **extra, "checkpoint_dir": str(folder)})
    (written,) = folder.glob("*.pth")
    shutil.copyfile(written, out / f"{run}.pth")
    return {"model": model, "config": extra, "best_valid_result": {k: float(v) for k, v in res["best_valid_result"].items()},
            "test_result": {k: float(v) for k, v in res["test_result"].items()}}


@torch.no_grad()
def references(out: Path, run: str) -> None:
    config, model, dataset, _, _, test_data = load_data_and_model(str(out / f"{run}.pth"))
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("user_id", "item_seq", "item_seq_len", "target", "scores")}
    for interaction, _, _, positive_i in test_data:
        parts["user_id"].append(interaction[dataset.uid_field])
        parts["item_seq"].append(interaction[model.ITEM_SEQ])
        parts["item_seq_len"].append(interaction[model.ITEM_SEQ_LEN])
        parts["target"].append(positive_i)
        parts["scores"].append(model.full_sort_predict(interaction))
    torch.save({k: torch.cat(v).contiguous() for k, v in parts.items()}, out / f"{run}_ref.pt")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    out = ap.parse_args().out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # RecBole writes log/ and log_tensorboard/ into the working folder
    results = {}
    for run, (model, extra) in RUNS.items():
        results[f"{run}.pth"] = train(out, run, model, extra)
        references(out, run)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
