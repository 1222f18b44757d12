"""Upstream side of bench/upstream_hstu_accuracy.py (not a test): a research HSTU trained to the end by
generative-recommenders' own ``train_fn`` (research/trainer/train.py, checked at 2e81fab) on MovieLens, with
the accuracy its own evaluation prints.

    HSTU_PYTHON bench/upstream_hstu_train.py GR_REPO MOVIELENS_DIR OUT [EPOCHS]

MOVIELENS_DIR holds a GroupLens ``ratings.csv`` (or ``.csv.gz``) + ``movies.csv`` (ml-latest-small, the one MovieLens set that
may be committed, or ml-20m itself). Upstream's own ``MovielensDataProcessor`` (its ml-20m branch: the same two
files) turns it into ``OUT/tmp/ml-20m/sasrec_format.csv``; ``get_reco_dataset('ml-20m')`` reads it, told the
file's own largest movie id (ml-20m's constants are 131,262 and 26,744 items). ``train_fn`` runs from its own
source with three lines changed so that it runs on a CPU: ``init_process_group("gloo")`` for "nccl", ``device =
"cpu"`` for the GPU index, DDP without ``device_ids``; and with ``create_data_loader`` in-process (0 workers).
The config is upstream's ml-1m HSTU config (configs/ml-1m/hstu-sampled-softmax-n128-final.gin: 2 blocks, 1 head,
d 50, L 200, 128 sampled negatives) with ``num_epochs`` EPOCHS. ``train_fn`` seeds only ``random``; torch and
numpy are seeded here (0) so that a rerun trains the same model.

Writes OUT/ckpts/ml-20m-l200/HSTU-...(train.py's name), OUT/train.log (train_fn's log: the accuracy it printed)
and OUT/upstream_eval.json: per user (upstream's user id), the target and its NDCG@10/50, HR@10/50 and MRR as
``eval_metrics_v2_from_tensors`` computes them in train.py's end-of-epoch evaluation, recomputed here after
training over the eval set in file order (the same model in eval mode: the same numbers train.py printed).
"""

import json
import logging
import os
import random
import sys
import types

REPO, MOVIELENS, OUT = sys.argv[1], os.path.abspath(sys.argv[2]), os.path.abspath(sys.argv[3])
EPOCHS = int(sys.argv[4]) if len(sys.argv) > 4 else 40

sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fbgemm_shim  # noqa: F401,E402  (torch.ops.fbgemm.* stand-ins; fbgemm-gpu-cpu does not load on torch 2.13)
from gr_movielens import movielens_processor  # noqa: E402

import gin  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import generative_recommenders.research.data.preprocessor as preprocessor  # noqa: E402
import generative_recommenders.research.data.reco_dataset as reco_dataset  # noqa: E402

TRAIN_PY = os.path.join(REPO, "generative_recommenders/research/trainer/train.py")
CONFIG = os.path.join(REPO, "configs/ml-1m/hstu-sampled-softmax-n128-final.gin")
CPU_LINES = (('dist.init_process_group("nccl"', 'dist.init_process_group("gloo"'),
             ("device = rank\n", 'device = "cpu"\n'),
             ("DDP(model, device_ids=[rank], broadcast_buffers=False)", "DDP(model, broadcast_buffers=False)"))


def untitled(path: str) -> None:
    """get_reco_dataset splits each movie's ``cleaned_title`` (the title less its last 7 characters); a title
    as short as ml-latest-small's "Babylon 5" leaves it empty, which pandas reads back as NaN and upstream fails
    on (AttributeError). The title stands in for it: these item features are built and never used by train_fn."""
    movies = pd.read_csv(path)
    movies["cleaned_title"] = movies["cleaned_title"].fillna(movies["title"])
    movies.to_csv(path, index=False)


def train_module() -> types.ModuleType:
    """research/trainer/train.py, run from its source with the CPU_LINES changes."""
    source = open(TRAIN_PY).read()
    for old, new in CPU_LINES:
        assert source.count(old) == 1, f"train.py changed: {old!r} not found once"
        source = source.replace(old, new)
    module = types.ModuleType("generative_recommenders.research.trainer.train")
    module.__file__ = TRAIN_PY
    sys.modules[module.__name__] = module
    exec(compile(source, TRAIN_PY, "exec"), module.__dict__)
    return module


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    os.chdir(OUT)  # upstream writes tmp/, exps/ and ckpts/ under the working directory
    np.random.seed(0)  # DataProcessor's shuffle of the users (DataFrame.sample)
    torch.manual_seed(0)
    random.seed(0)
    dp = movielens_processor(MOVIELENS)
    dp.preprocess_rating()
    untitled(dp.processed_item_csv())
    preprocessor.get_common_preprocessors = reco_dataset.get_common_preprocessors = lambda: {"ml-20m": dp}
    os.environ.setdefault("MASTER_ADDR", "localhost")
    log = logging.FileHandler(os.path.join(OUT, "train.log"), mode="w")
    logging.getLogger().addHandler(log)
    train = train_module()
    gin.parse_config_file(CONFIG)
    gin.parse_config([f"train_fn.dataset_name = 'ml-20m'", f"train_fn.num_epochs = {EPOCHS}",
                      "create_data_loader.num_workers = 0", "create_data_loader.prefetch_factor = None"])
    captured = {}
    ddp_init = train.DDP.__init__

    def keep_model(self, module, *a, **k):  # the model train_fn builds, for the evaluation below
        ddp_init(self, module, *a, **k)
        captured["model"] = module
    train.DDP.__init__ = keep_model
    original_cleanup = train.cleanup
    train.cleanup = lambda: None  # the process group stays up for the evaluation below
    train.train_fn(rank=0, world_size=1, master_port=int(os.environ.get("MASTER_PORT", "12355")))
    evaluate(train, captured["model"], dp)
    original_cleanup()
    logging.getLogger().removeHandler(log)


def evaluate(train: types.ModuleType, model: torch.nn.Module, dp: preprocessor.MovielensDataProcessor) -> None:
    """train.py's end-of-epoch evaluation (its functions, its arguments), user by user in file order."""
    cfg = gin.get_bindings("train_fn")
    dataset = reco_dataset.get_reco_dataset("ml-20m", cfg["max_sequence_length"], chronological=True)
    model.eval()
    sampler = train.LocalNegativesSampler(num_items=dataset.max_item_id, item_emb=model._embedding_module._item_emb,
                                          all_item_ids=dataset.all_item_ids, l2_norm=cfg["item_l2_norm"],
                                          l2_norm_eps=cfg["l2_norm_eps"])
    state = train.get_eval_state(model=model, all_item_ids=dataset.all_item_ids, negatives_sampler=sampler,
                                 top_k_module_fn=lambda e, i: train.get_top_k_module(
                                     top_k_method=cfg["top_k_method"], model=model, item_embeddings=e, item_ids=i),
                                 device="cpu")
    loader = torch.utils.data.DataLoader(dataset.eval_dataset, batch_size=128, shuffle=False)
    gr = cfg.get("gr_output_length", 10)
    rows = {k: [] for k in ("user_id", "target", "ndcg@10", "ndcg@50", "hr@10", "hr@50", "mrr")}
    for row in loader:
        features, target_ids, target_ratings = train.movielens_seq_features_from_row(row, device="cpu",
                                                                                      max_output_length=gr + 1)
        out = train.eval_metrics_v2_from_tensors(state, model, features, target_ids=target_ids,
                                                 target_ratings=target_ratings)
        rows["user_id"] += row["user_id"].tolist()
        rows["target"] += target_ids.squeeze(1).tolist()
        for k in ("ndcg@10", "ndcg@50", "hr@10", "hr@50", "mrr"):
            rows[k] += out[k].float().tolist()
    summary = {k: float(np.mean(rows[k])) for k in ("ndcg@10", "ndcg@50", "hr@10", "hr@50", "mrr")}
    with open(os.path.join(OUT, "upstream_eval.json"), "w") as f:
        json.dump({"epochs": EPOCHS, "config": CONFIG, "mean": summary, "per_user": rows,
                   "num_items": dataset.max_item_id, "candidates": len(dataset.all_item_ids),
                   "gr_output_length": gr}, f)
    print("upstream eval (all users, file order):", json.dumps(summary))


if __name__ == "__main__":
    main()
