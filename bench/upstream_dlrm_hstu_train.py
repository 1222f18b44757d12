"""Benchmark helper (run by bench/upstream_dlrm_hstu.py, not a test): train, save and evaluate generative-recommenders'
dlrm_v3 DlrmHSTU ranker ("movielens-20m" config) on the CPU, on MovieLens latest-small, with upstream's own functions
(dlrm_v3/train/utils.py: make_model's recipe, make_optimizer_and_shard, make_train_test_dataloaders, train_loop,
eval_loop; dlrm_v3/checkpoint.py).

    GR_PYTHON bench/upstream_dlrm_hstu_train.py --repo GR_REPO --movielens ML_DIR --out WORK [--epochs 1]

GR_PYTHON: this project's venv with, on its path, what upstream's training imports and the venv lacks:
gin-config, tensorboard (dlrm_v3/utils.py imports it; MetricsLogger.compute_and_log asserts a SummaryWriter),
torchmetrics==1.0.3 + lightning-utilities (--no-deps; torchrec 1.9.2 pins 1.0.3) and pandas. ML_DIR: a GroupLens
ratings.csv(.gz) + movies.csv. Outputs under WORK: data/ml-20m/sasrec_format.csv, ckpt/<date>/{non_sparse.ckpt,
sparse/}, tb/, eval_dump.pt (every test batch's predictions, labels and user ids, in order), summary.json.

What differs from train_ranker.py's _main_func (which is CUDA-only):
  * process group: gloo, rank 0, world 1, device cpu (upstream's setup() hard-codes NCCL + torch.cuda.set_device);
  * the gin file train/gin/movielens_20m.gin is parsed, then a few bindings are overridden for this machine:
    new_path_prefix=/tmp/dv3, num_workers=0, prefetch_factor=None, output_trace=False (the profiler
    exports to manifold://), num_epochs=--epochs, MetricsLogger.tensorboard_log_path=/tmp/dv3/tb, and
    save_dmp_checkpoint.path=/tmp/dv3/ckpt (the gin file sets none, and with path "" train_loop's
    save_dmp_checkpoint silently returns without saving);
  * the model is make_model("movielens-20m")'s recipe, but with every table's num_embeddings = largest id in the
    data + 1 (instead of HASH_SIZE = 10M) and hstu_config.max_seq_len = --max-seq-len; torch.manual_seed(0) first;
  * train and eval run in one process (upstream runs them as two launches with load_dmp_checkpoint in between);
    eval gets its own MetricsLogger with window_size=sys.maxsize, as _main_func does for mode "eval";
  * environment workaround: torchmetrics' compute wrapper cannot squeeze torchrec's frozen MetricComputationReport
    (allow_torchrec_metric_compute);
  * upstream bug fix, on by default: the movielens uih KJT carries more values than its lengths, which misaligns
    every batched sample after the first (fix_movielens_uih_kjt; --upstream-uih-kjt keeps upstream's behaviour);
  * during eval, model.forward is wrapped to record mt_target_preds / mt_target_labels / uih user ids per batch
    into /tmp/dv3/eval_dump.pt.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

def prepare_data(work: str, movielens: str) -> str:
    """Upstream's research MovielensDataProcessor (its ml-20m branch) over ``movielens``; its
    tmp/ml-20m/sasrec_format.csv is copied to ``work``/data/ml-20m/sasrec_format.csv, where dlrm_v3's
    get_dataset("movielens-20m") reads it."""
    from gr_movielens import movielens_processor

    out = os.path.join(work, "data/ml-20m/sasrec_format.csv")
    if os.path.exists(out):
        return out
    prep = os.path.join(work, "prep")
    os.makedirs(prep, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(prep)  # the processor writes under ./tmp
    try:
        np.random.seed(0)  # the processor's user shuffle (DataFrame.sample(frac=1))
        dp = movielens_processor(movielens)
        dp.preprocess_rating()
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(dp.output_format_csv(), "rb") as src, open(out, "wb") as dst:
            dst.write(src.read())
    finally:
        os.chdir(cwd)
    return out


def max_ids(csv_path: str) -> dict:
    """Largest movie id (over all sequences: history and candidates) and largest user id in the csv."""
    import pandas as pd
    frame = pd.read_csv(csv_path)
    max_movie = max(int(i) for s in frame["sequence_item_ids"] for i in str(s).split(","))
    return {"movie_id": max_movie, "user_id": int(frame["user_id"].max())}


def allow_torchrec_metric_compute() -> None:
    """Environment workaround (not upstream code): torchmetrics' Metric.compute wrapper passes the result through
    _squeeze_if_scalar -> lightning_utilities.apply_to_collection, which raises "A frozen dataclass was passed to
    `apply_to_collection`" on the list of frozen torchrec MetricComputationReport that every torchrec
    RecMetricComputation.compute returns (torchmetrics 1.0.3, as torchrec 1.9.2 pins, with lightning-utilities
    0.15.3). allow_frozen=True leaves each report as it is (its value tensor is not squeezed)."""
    import torchmetrics.metric
    from lightning_utilities.core.apply_func import apply_to_collection
    from torchmetrics.utilities.data import _squeeze_scalar_element_tensor

    torchmetrics.metric._squeeze_if_scalar = lambda data: apply_to_collection(
        data, torch.Tensor, _squeeze_scalar_element_tensor, allow_frozen=True)


def fix_movielens_uih_kjt() -> None:
    """Upstream bug fix (opt out with --upstream-uih-kjt): DLRMv3MovieLensDataset.load_item builds each sample's uih
    KJT with lengths [1 (user_id), L, L, L, L, 1] for keys [user_id, movie_id, movie_rating, action_timestamp,
    dummy_weights, dummy_watch_time] but values of 1 + 5*L + 1 entries (it appends the L dummy watch times AND the
    dummy query time). Alone the KJT reads right (the surplus trails), but collate_fn's kjt_batch_func concatenates
    the values of the samples assuming sum(lengths) == numel, so from the 2nd sample of a batch on every feature
    is read from the wrong place (user_id 0, movie ids read from ratings/timestamps...: fbgemm's bounds check
    then logs 'Out of bounds access ... Setting idx to zero'). The fix keeps the first sum(lengths) values of each
    sample, i.e. exactly what its own lengths say; nothing else changes."""
    from generative_recommenders.dlrm_v3.datasets.movie_lens import DLRMv3MovieLensDataset
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    load_item = DLRMv3MovieLensDataset.load_item

    def load_item_trimmed(self, data, max_num_candidates):
        uih, candidates = load_item(self, data, max_num_candidates)
        n = int(uih.lengths().sum())
        if uih.values().numel() != n:
            uih = KeyedJaggedTensor(keys=uih.keys(), lengths=uih.lengths(), values=uih.values()[:n])
        return uih, candidates

    DLRMv3MovieLensDataset.load_item = load_item_trimmed


class EvalRecorder:
    """Wraps model.forward during eval_loop: keeps each batch's mt_target_preds, mt_target_labels and the uih
    user_id feature values, in batch order."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.forward = model, model.forward
        self.preds, self.labels, self.weights, self.user_ids = [], [], [], []

    def __call__(self, uih_features, candidates_features):
        out = self.forward(uih_features, candidates_features)
        _, _, _, preds, labels, weights = out
        self.preds.append(preds.detach().float().cpu().clone())
        self.labels.append(labels.detach().float().cpu().clone())
        self.weights.append(weights.detach().float().cpu().clone())
        self.user_ids.append(uih_features["user_id"].values().detach().cpu().clone())
        return out

    def __enter__(self):
        self.model.forward = self
        return self

    def __exit__(self, *exc):
        del self.model.forward  # drops the instance attribute: the class's forward again


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-seq-len", type=int, default=2056)
    ap.add_argument("--num-batches", type=int, default=None, help="cap on train batches (smoke tests)")
    ap.add_argument("--eval-batches", type=int, default=None, help="cap on eval batches (smoke tests)")
    ap.add_argument("--repo", required=True, help="a generative-recommenders checkout")
    ap.add_argument("--movielens", required=True, help="a folder with ratings.csv(.gz) and movies.csv")
    ap.add_argument("--out", required=True, help="where data/, ckpt/, tb/, eval_dump.pt, summary.json go")
    ap.add_argument("--upstream-uih-kjt", action="store_true",
                    help="keep upstream's misaligned batched uih features (see fix_movielens_uih_kjt)")
    a = ap.parse_args()
    gr, work = os.path.abspath(a.repo), os.path.abspath(a.out)
    sys.path.insert(0, gr)
    import gin
    torch.set_num_threads(os.cpu_count() or 1)
    t_start = time.time()

    from generative_recommenders.common import HammerKernel
    from generative_recommenders.dlrm_v3.configs import get_embedding_table_config, get_hstu_configs
    from generative_recommenders.dlrm_v3.train import utils as tu
    from generative_recommenders.dlrm_v3.utils import MetricsLogger
    from generative_recommenders.modules.dlrm_hstu import DlrmHSTU

    allow_torchrec_metric_compute()
    if not a.upstream_uih_kjt:
        fix_movielens_uih_kjt()

    csv_path = prepare_data(work, os.path.abspath(a.movielens))
    ids = max_ids(csv_path)
    print(f"data: {csv_path}; largest ids: {ids}", flush=True)

    # --- process group (upstream setup() is NCCL/CUDA only) ---
    os.environ.setdefault("MASTER_ADDR", "localhost")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    device = torch.device("cpu")
    rank = 0

    # --- gin: upstream's movielens-20m config, then this machine's overrides ---
    gin.parse_config_file(os.path.join(gr, "generative_recommenders/dlrm_v3/train/gin/movielens_20m.gin"))
    gin.parse_config([
        f"make_train_test_dataloaders.new_path_prefix = '{work}'",
        "make_train_test_dataloaders.num_workers = 0",
        "make_train_test_dataloaders.prefetch_factor = None",
        f"train_loop.num_epochs = {a.epochs}",
        "train_loop.output_trace = False",
        f"train_loop.num_batches = {a.num_batches}",
        f"eval_loop.num_batches = {a.eval_batches}",
        f"MetricsLogger.tensorboard_log_path = '{a.out}/tb'",
        f"save_dmp_checkpoint.path = '{a.out}/ckpt'",
    ])

    # --- model: make_model("movielens-20m")'s body, tables sized to the data, max_seq_len as asked ---
    dataset = gin.query_parameter("%dataset")  # make_model.dataset = %dataset in the gin file
    assert dataset == "movielens-20m", dataset
    hstu_config = get_hstu_configs(dataset)
    hstu_config.max_seq_len = a.max_seq_len
    table_config = get_embedding_table_config(dataset)
    for name, table in table_config.items():
        # Only the row count changes: EmbeddingConfig.__post_init__ already bound init_fn to
        # uniform(+-sqrt(1/HASH_SIZE)) = +-3.16e-4, so the rows start as they would in the 10M-row table.
        table.num_embeddings = ids[name] + 1
    torch.manual_seed(0)
    model = DlrmHSTU(hstu_configs=hstu_config, embedding_tables=table_config, is_inference=False)
    model.recursive_setattr("_hammer_kernel", HammerKernel.PYTORCH)
    print({n: (t.num_embeddings, t.embedding_dim, str(t.data_type)) for n, t in table_config.items()}, flush=True)

    # --- shard + optimizers (upstream, unchanged) ---
    model, optimizer = tu.make_optimizer_and_shard(model=model, device=device)
    print(model.plan, flush=True)

    # --- data (upstream, unchanged; arguments from the gin file + overrides) ---
    train_dl, test_dl = tu.make_train_test_dataloaders(hstu_config=hstu_config, embedding_table_configs=table_config)
    print(f"train batches/epoch: {len(train_dl)}, test batches: {len(test_dl)}", flush=True)

    # --- train (upstream train_loop; ends in save_dmp_checkpoint) ---
    train_metrics = MetricsLogger(multitask_configs=hstu_config.multitask_configs,
                                  batch_size=train_dl.batch_size, window_size=1000, device=device, rank=rank)
    t0 = time.time()
    tu.train_loop(rank=rank, model=model, dataloader=train_dl, optimizer=optimizer,
                  metric_logger=train_metrics, device=device)
    t_train = time.time() - t0
    print(f"train_loop (incl. checkpoint save): {t_train:.1f}s", flush=True)
    train_final = {k: float(v) for k, v in train_metrics.compute().items()}
    print(f"train metrics (window 1000): {train_final}", flush=True)

    # --- eval (upstream eval_loop) with the forward recorder ---
    eval_metrics = MetricsLogger(multitask_configs=hstu_config.multitask_configs,
                                 batch_size=test_dl.batch_size, window_size=sys.maxsize, device=device, rank=rank)
    t0 = time.time()
    with EvalRecorder(model) as rec:
        tu.eval_loop(rank=rank, model=model, dataloader=test_dl, metric_logger=eval_metrics, device=device)
    t_eval = time.time() - t0
    computed = {k: float(v) for k, v in eval_metrics.compute().items()}
    print(f"eval_loop: {t_eval:.1f}s", flush=True)

    torch.save({"preds": rec.preds, "labels": rec.labels, "weights": rec.weights, "user_ids": rec.user_ids,
                "metrics": computed, "max_seq_len": a.max_seq_len, "epochs": a.epochs},
               os.path.join(a.out, "eval_dump.pt"))
    ckpts = sorted(os.listdir(os.path.join(a.out, "ckpt")))
    folder = os.path.join(a.out, "ckpt", ckpts[-1])
    files = sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)
    summary = {"epochs": a.epochs, "max_seq_len": a.max_seq_len, "tables": {n: t.num_embeddings for n, t in
               table_config.items()}, "train_batches_per_epoch": len(train_dl), "test_batches": len(test_dl),
               "train_s": round(t_train, 1), "eval_s": round(t_eval, 1), "total_s": round(time.time() - t_start, 1),
               "upstream_uih_kjt": a.upstream_uih_kjt, "eval_metrics": computed, "train_metrics": train_final,
               "checkpoint": folder, "checkpoint_files": files}
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
