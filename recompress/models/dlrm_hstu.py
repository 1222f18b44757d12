"""The ``dlrm_hstu`` family: generative-recommenders' dlrm_v3 ranker (``DlrmHSTU``, ``dlrm_hstu_net``) on a sequence
dataset with timestamps and integer user ids (``recompress data sequences --format gr --layout gr`` of the
``sasrec_format.csv`` its MovieLens dataset reads).

Samples are ``DLRMv3MovieLensDataset``'s: a user's last ``num_candidates`` items are the candidates, the items before
them the history, cut to its first ``max_seq_len - num_candidates - C`` items (upstream's ``maybe_truncate_seq``
keeps the oldest); the query time is the latest history timestamp; the contextual feature is the user id. The label
of every candidate is upstream's ``item_dummy_watchtime``, 1: its MovieLens task regresses on a constant, so MSE and
MAE say how close the predictions are to 1, as its own ``eval_loop`` prints them, not how well ratings are
predicted.

Protocol ``dlrm_v3`` (``make_train_test_dataloaders``): the first ``round(0.75 n)`` users in file order train, the
others are the test split, read in the order of PyTorch's ``DistributedSampler`` (one replica, seed 0, epoch 0) in
batches of 16, the last partial batch dropped. Batches matter: the attention divides by the batch's longest
sequence. ``val`` (recompress's own, for fine-tunes' checks): the last tenth of the training users, which
recompress's training then leaves out.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from recompress.distributed import shard
from recompress.errors import UserError
from recompress.families import FAMILIES
from recompress.spec import ModelSpec
from recompress.tables import Table

from .dlrm_hstu_net import DlrmHSTU
from .family import Family, Inputs

TRAIN_SHARE, EVAL_BATCH, SAMPLER_SEED = 0.75, 16, 0
CONTEXTUAL_FEATURES = ("user_id",)  # what a sequence dataset holds per user


class DlrmHSTUFamily(Family):
    info = FAMILIES["dlrm_hstu"]
    metrics = ("mse", "mae")
    record = "predictions"
    protocols = ("dlrm_v3",)
    inputs = {"history": {0: "batch", 1: "history"}, "timestamps": {0: "batch", 1: "history"}, "lengths": {0: "batch"},
              "context": {0: "batch"}, "candidates": {0: "batch", 1: "candidates"}, "query_time": {0: "batch"}}
    output = "predictions"
    compressible = ("item", "sparse_feature")
    adam_betas = (0.95, 0.999)  # dlrm_v3's dense Adam (train/gin/movielens_*.gin)

    def hparams(self, given: dict[str, Any]) -> dict[str, Any]:
        out = super().hparams(given)
        for key in ("contextual", "tasks"):
            if isinstance(out[key], str):
                out[key] = [s for s in out[key].split(",") if s]
        bad = [t for t in out["tasks"] if len(t.split(":")) != 2 or t.split(":")[1] not in ("regression", "binary")]
        if bad:
            raise UserError(f"tasks {bad[0]!r} is not NAME:regression or NAME:binary", "e.g. --tasks rating:regression")
        return out

    # --- model ---------------------------------------------------------------------------------------
    def new_spec(self, data: Any, hparams: dict[str, Any]) -> ModelSpec:
        self.check_data(data)
        hparams = self.hparams(hparams)
        users = _user_ids(data)
        rows = {hparams["item_table"]: (data.num_items + 1, hparams["dim"], "item")}
        rows.update({name: (int(users.max()) + 1, hparams["dim"], "sparse_feature") for name in hparams["contextual"]})
        spec = ModelSpec(family=self.name, hparams=hparams, tables=self.spec_tables(rows))
        self.check(spec, data)
        return spec

    def build(self, spec: ModelSpec, tables: dict[str, Table]) -> nn.Module:
        return DlrmHSTU(spec.hparams, tables)

    def init_layers(self, model: nn.Module, gen: torch.Generator) -> None:
        """Upstream's rules: xavier-uniform MLP weights with zero biases (xavier-normal inside the transducer:
        content MLP, time combiner), STU weights xavier-uniform, contextual weights N(0, 2 / (d + width)),
        position and time rows U(+-1 / sqrt(rows))."""
        for seq, normal in ((model.content_mlp, True), (model.item_mlp, False), (model.head, False)):
            for layer in seq:
                if isinstance(layer, nn.Linear):
                    (nn.init.xavier_normal_ if normal else nn.init.xavier_uniform_)(layer.weight, generator=gen)
                    nn.init.zeros_(layer.bias)
        nn.init.xavier_normal_(model.time_combiner.weight, generator=gen)
        nn.init.zeros_(model.time_combiner.bias)
        for block in model.blocks:
            nn.init.xavier_uniform_(block.uvqk_weight, generator=gen)
            nn.init.xavier_uniform_(block.output_weight, generator=gen)
        d, w = model.contextual_weight.shape[1:]
        model.contextual_weight.normal_(0.0, (2.0 / (d + w)) ** 0.5, generator=gen)
        for p in (model.position_weight, model.time_weight):
            bound = (1.0 / (p.shape[0] - (p is model.time_weight))) ** 0.5
            p.uniform_(-bound, bound, generator=gen)

    def check(self, spec: ModelSpec, data: Any) -> None:
        self.check_data(data)
        hp = spec.hparams
        if not data.meta.get("has_times"):
            raise UserError(f"{data.path} has no timestamps, and a dlrm_hstu model reads each item's time",
                            "prepare the data from a file with timestamps (e.g. --format gr, movielens)")
        extra = [f for f in hp["contextual"] if f not in CONTEXTUAL_FEATURES]
        if extra:
            raise UserError(f"the model reads the contextual features {', '.join(extra)}, which a sequence dataset "
                            "does not hold (it has the user id only)",
                            "evaluate a config whose contextual feature is user_id (e.g. dlrm_v3's movielens-20m)")
        binary = [t for t in hp["tasks"] if t.endswith(":binary")]
        if binary:
            raise UserError(f"the model has binary tasks ({', '.join(binary)}) whose labels (action bitmasks) a "
                            "sequence dataset does not hold", "evaluate a config with regression tasks only")
        rows = {t.name: t.rows for t in spec.tables}
        if data.num_items + 1 > rows[hp["item_table"]]:
            raise UserError(f"{data.path} has item ids up to {data.num_items}, and table {hp['item_table']!r} has "
                            f"{rows[hp['item_table']]} rows", "use the dataset the model was trained on")
        users = _user_ids(data)
        for name in hp["contextual"]:
            if int(users.max()) >= rows[name]:
                raise UserError(f"{data.path} has user ids up to {int(users.max())}, and table {name!r} has "
                                f"{rows[name]} rows", "use the dataset the model was trained on")

    def table_counts(self, spec: ModelSpec, data: Any) -> dict[str, np.ndarray]:
        item = spec.hparams["item_table"]
        return {item: np.bincount(np.asarray(data.items), minlength=spec.table(item).rows)}

    # --- samples ---------------------------------------------------------------------------------------
    def split_users(self, data: Any, split: str) -> np.ndarray:
        """The users of ``split`` in upstream's order (``test``: DistributedSampler's permutation)."""
        n = data.num_users
        train = round(TRAIN_SHARE * n)
        if split == "test":
            order = torch.randperm(n - train, generator=torch.Generator().manual_seed(SAMPLER_SEED)).numpy()
            return train + order
        val = max(1, train // 10)
        return np.arange(train - val, train) if split == "val" else np.arange(0, train - val)

    def samples(self, hp: dict[str, Any], data: Any, users: np.ndarray) -> Inputs:
        """Model inputs for ``users`` (upstream's ``load_item``), the history padded to the longest one."""
        m, c = hp["num_candidates"], len(hp["contextual"])
        keep = hp["max_seq_len"] - m - c if c else 0
        starts, ends = data.offsets[users], data.offsets[np.asarray(users) + 1]
        short = np.flatnonzero(ends - starts <= m)
        if len(short):
            first = short[0]
            raise UserError(f"user {_user_ids(data)[users[first]]} of {data.path} has "
                            f"{int(ends[first] - starts[first])} items, and a sample needs more than its {m} candidates (upstream's loader fails on it)",
                            f"prepare the data with --min-items {m + 1}")
        lengths = np.minimum(ends - starts - m, keep)
        width = max(int(lengths.max()), 1)
        history = np.zeros((len(users), width), dtype=np.int64)
        times = np.zeros((len(users), width), dtype=np.int64)
        for r, (s, e, n) in enumerate(zip(starts, ends, lengths)):
            history[r, :n] = data.items[s:s + n]
            times[r, :n] = data.times[s:s + n]
        cands = np.stack([np.asarray(data.items[e - m:e], dtype=np.int64) for e in ends])
        data.check_items(cands)
        data.check_items(history, padding=True)
        user = _user_ids(data)[np.asarray(users)]
        query = np.where(lengths > 0, times.max(axis=1, initial=np.iinfo(np.int64).min), 0)
        return {"history": history, "timestamps": times, "lengths": lengths.astype(np.int64),
                "context": np.repeat(user[:, None], c, axis=1).astype(np.int64), "candidates": cands,
                "query_time": query.astype(np.int64)}

    # --- training --------------------------------------------------------------------------------------
    def steps_per_epoch(self, data: Any, batch_size: int) -> int:
        return max(1, len(self.split_users(data, "train")) // batch_size)

    def batches(self, model: nn.Module, data: Any, batch_size: int, seed: int,
                part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, Tensor]]:
        users = self.split_users(data, "train")
        order = users[np.random.default_rng(seed).permutation(len(users))]
        for s in range(0, len(order) - batch_size + 1, batch_size):
            rows = order[s:s + batch_size][shard(batch_size, part)]
            yield {k: torch.from_numpy(v) for k, v in self.samples(model.hparams, data, rows).items()}

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Upstream's multitask loss with its MovieLens labels (1): weighted MSE times causal_multitask_weights."""
        pred = model(**batch)
        return ((pred - 1.0) ** 2).mean() * model.hparams["multitask_weight"]

    # --- evaluation ------------------------------------------------------------------------------------
    def eval_rows(self, data: Any, split: str, protocol: str, users: int | None) -> int:
        n = len(self.split_users(data, split))
        if split == "test":
            n -= n % EVAL_BATCH
        return n if users is None else min(users, n)

    def eval_batches(self, hparams: dict[str, Any], data: Any, split: str, protocol: str, *,
                     batch_size: int | None = None, negatives: int = 0, seed: int = 0,
                     users: int | None = None) -> Iterator[tuple[Inputs, Any]]:
        who = self.split_users(data, split)
        size = batch_size or EVAL_BATCH
        if split == "test":  # drop_last, as upstream's loader
            who = who[:len(who) - len(who) % size]
        if users is not None:
            who = who[:users]
        for s in range(0, len(who), size):
            inputs = self.samples(hparams, data, who[s:s + size])
            yield inputs, np.ones(inputs["candidates"].shape, dtype=np.float32)

    def reduce(self, output: np.ndarray, truth: Any) -> tuple[np.ndarray, np.ndarray]:
        """Per candidate: the first task's prediction, and its label."""
        return np.asarray(output)[..., 0].reshape(-1), np.asarray(truth).reshape(-1)

    # --- serving and export ----------------------------------------------------------------------------
    def scorer(self, model: nn.Module, scoring: str | None = None) -> nn.Module:
        return model

    def profile(self, spec: ModelSpec, layout: str | None = None) -> dict[str, tuple[int, int, int]]:
        hp = spec.hparams
        longest = hp["max_seq_len"] - hp["num_candidates"] - len(hp["contextual"])
        return {"batch": (1, EVAL_BATCH, 256), "history": (1, min(200, longest), longest),
                "candidates": (1, hp["num_candidates"], hp["num_candidates"])}

    def example_inputs(self, model: nn.Module, n: int, data: Any | None, seed: int = 0) -> dict[str, Tensor]:
        if data is not None:
            inputs = self.samples(model.hparams, data, self.split_users(data, "test")[:n])
            return {k: torch.from_numpy(v) for k, v in inputs.items()}
        hp = model.hparams
        gen = torch.Generator().manual_seed(seed)
        items, m, c = model.tables[hp["item_table"]].rows, hp["num_candidates"], len(hp["contextual"])
        width = 12
        lengths = torch.randint(1, width + 1, (n,), generator=gen)
        lengths[0] = width
        times = torch.sort(1_000_000_000 + torch.randint(0, 10 ** 8, (n, width), generator=gen), dim=1).values
        times = times * (torch.arange(width) < lengths.unsqueeze(1))
        users = [model.tables[name].rows for name in hp["contextual"]]
        return {"history": torch.randint(1, items, (n, width), generator=gen), "timestamps": times,
                "lengths": lengths, "context": torch.stack([torch.randint(0, r, (n,), generator=gen) for r in users], 1)
                if c else torch.zeros(n, 0, dtype=torch.long),
                "candidates": torch.randint(1, items, (n, m), generator=gen), "query_time": times.max(1).values}

    def latency_inputs(self, hparams: dict[str, Any], data: Any, batch: int, count: int, seed: int = 0,
                       candidates: int | None = None) -> list[Inputs]:
        if candidates is not None and candidates != hparams["num_candidates"]:
            raise UserError(f"a dlrm_hstu sample has the last {hparams['num_candidates']} items as its candidates",
                            f"drop --candidates, or pass {hparams['num_candidates']}")
        users = self.split_users(data, "test")
        picks = np.resize(users, batch * count)
        return [self.samples(hparams, data, picks[i * batch:(i + 1) * batch]) for i in range(count)]


def _user_ids(data: Any) -> np.ndarray:
    """The dataset's user ids as integers (the contextual feature upstream looks up), or a clear refusal."""
    ids = getattr(data, "_dlrm_hstu_users", None)
    if ids is None:
        raw = np.load(data.path / "user_ids.npy")
        try:
            ids = np.asarray([int(u) for u in raw], dtype=np.int64)
        except ValueError:
            raise UserError(f"{data.path}: user ids are not integers, and a dlrm_hstu model looks each up as a row",
                            "prepare the data with --layout gr, which keeps the file's own ids") from None
        if len(ids) and ids.min() < 0:
            raise UserError(f"{data.path}: a user id is negative", "prepare the data again")
        data._dlrm_hstu_users = ids
    return ids


FAMILY = DlrmHSTUFamily()
