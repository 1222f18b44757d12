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

import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from recompress.distributed import shard
from recompress.errors import UserError
from recompress.families import FAMILIES
from recompress.linalg import principal_basis
from recompress.spec import ModelSpec
from recompress.tables import DenseTable, Table

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
    # One forward of 16 users with histories of ~2,000 items takes seconds on a CPU, and every layer holds
    # [batch, heads, N, N] scores: time single requests unless asked (--batch-sizes).
    latency_batch_sizes = (1,)

    def hparams(self, given: dict[str, Any]) -> dict[str, Any]:
        out = super().hparams(given)
        for key in ("contextual", "tasks"):
            if isinstance(out[key], str):
                out[key] = [s for s in out[key].split(",") if s]
        bad = [t for t in out["tasks"] if len(t.split(":")) != 2 or t.split(":")[1] not in ("regression", "binary")]
        if bad or not out["tasks"]:
            raise UserError(f"tasks {bad[0] if bad else ''!r} is not NAME:regression or NAME:binary",
                            "e.g. --tasks rating:regression")
        kinds = [t.split(":")[1] for t in out["tasks"]]
        if kinds != sorted(kinds):  # upstream's DefaultMultitaskModule asserts it
            raise UserError(f"tasks {','.join(out['tasks'])}: binary tasks come before regression ones upstream",
                            "list the binary tasks first")
        if not out["contextual"]:
            raise UserError("no contextual feature: upstream's MovieLens dataset then keeps no history item at all "
                            "(max_uih_len 0)", "name at least one, e.g. --contextual user_id")
        for key in ("heads", "blocks", "num_candidates", "dim", "width", "linear_dim", "qk_dim"):
            if out[key] < 1:
                raise UserError(f"{key} = {out[key]} is impossible", f"pass {key} >= 1")
        room = out["max_seq_len"] - out["num_candidates"] - len(out["contextual"])
        if room < 1:
            raise UserError(f"max_seq_len {out['max_seq_len']} leaves no history item after {out['num_candidates']} "
                            f"candidates and {len(out['contextual'])} contextual tokens",
                            f"pass max_seq_len > {out['num_candidates'] + len(out['contextual'])}")
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
        if spec.provenance.get("source_format") == "dlrm_v3" and (data.meta.get("layout") != "gr"
                                                                  or data.meta.get("id_shift")):
            raise UserError(f"{data.path} was not prepared with the file's own ids (--layout gr, ids from 1), and a "
                            "dlrm_v3 checkpoint's rows are those ids: its scores here would mean nothing",
                            "prepare its sasrec_format.csv with 'recompress data sequences FILE --format gr "
                            "--layout gr'")
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
        """How often the training users' samples look each row up: items in histories and candidates, each user
        once per feature (the test users' ids stay out of frequency-aware methods and MLET's basis)."""
        item = spec.hparams["item_table"]
        train = self.split_users(data, "train")
        items = np.concatenate([np.asarray(data.items[data.offsets[u]:data.offsets[u + 1]]) for u in train])
        out = {item: np.bincount(items, minlength=spec.table(item).rows)}
        users = _user_ids(data)[train]
        out.update({name: np.bincount(users, minlength=spec.table(name).rows) for name in spec.hparams["contextual"]})
        return out

    def reduce_width(self, ckpt: Any, d: int, ctx: Any, make_table: Any = None) -> dict[str, Any]:
        """Post-training MLET's width cut. Every table feeds linear maps only (the content and item MLPs' first
        layers, its contextual slot's weight), so each table gets its own basis Q [D, d]: the top-d principal
        directions of its rows, weighted by how often the data looks them up. The table becomes
        ``make_table(W, Q)`` (selected) or W Q, and each layer that reads it takes Q in (its weight times Q, or
        Q^T times it): exact for tables whose rows lie in the span of Q."""
        model = ckpt.model
        hp = model.hparams
        counts = self.table_counts(ckpt.spec, ctx.data)
        selected = set(ctx.select.pick(ckpt))
        bases, kept, tables = {}, {}, {}
        for name, t in model.tables.items():
            w = t.dense_weight()
            weights = torch.from_numpy(counts[name][:t.rows]).double().unsqueeze(1)
            basis, vals = principal_basis((w.double() * weights).T @ w.double(), d)
            bases[name] = q = basis.float()
            kept[name] = round(float(vals[:d].sum() / vals.sum()), 6) if float(vals.sum()) > 0 else 1.0
            tables[name] = make_table(w, q) if make_table is not None and name in selected else DenseTable(t.rows, d, w @ q)
        new = DlrmHSTU({**hp, "dim": d}, tables)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("tables.")}
        item = bases[hp["item_table"]]
        for key in ("content_mlp.0.weight", "item_mlp.0.weight"):
            state[key] = state[key] @ item
        state["contextual_weight"] = torch.stack([bases[name].T @ state["contextual_weight"][i]
                                                  for i, name in enumerate(hp["contextual"])])
        missing, unexpected = new.load_state_dict(state, strict=False)
        assert not unexpected and all(k.startswith("tables.") for k in missing), (missing, unexpected)
        ckpt.model = new.train(model.training)
        ckpt.spec.hparams = new.hparams
        return {"energy_kept": kept, "two_layer_tables": sorted(selected)}

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
        real = np.arange(width)[None, :] < lengths[:, None]
        query = np.where(real, times, np.iinfo(np.int64).min).max(axis=1)
        return {"history": history, "timestamps": times, "lengths": lengths.astype(np.int64),
                "context": np.repeat(user[:, None], c, axis=1).astype(np.int64), "candidates": cands,
                "query_time": query.astype(np.int64)}

    # --- training --------------------------------------------------------------------------------------
    def steps_per_epoch(self, data: Any, batch_size: int) -> int:
        return max(1, len(self.split_users(data, "train")) // batch_size)

    def batches(self, model: nn.Module, data: Any, batch_size: int, seed: int,
                part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, Tensor]]:
        users = self.split_users(data, "train")
        if len(users) < batch_size:
            raise UserError(f"{data.path} has {len(users)} training users, fewer than one batch of {batch_size}",
                            f"pass --batch-size {max(1, len(users))} or less")
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
            if len(who) < size:
                raise UserError(f"{data.path} has {len(who)} test users, fewer than one batch of {size} (upstream's "
                                "loader drops the last partial batch, so it would score none)",
                                "evaluate a dataset with more users")
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
        """``n`` random rows of valid inputs, or with ``data`` the first test batch (at most ``n`` users: a batch
        of long histories holds ``[batch, heads, N, N]`` attention scores per layer)."""
        if data is not None:
            inputs = self.samples(model.hparams, data, self.split_users(data, "test")[:min(n, EVAL_BATCH)])
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

    def parity_batches(self, model: nn.Module, n: int, data: Any | None) -> dict[str, dict[str, Tensor]]:
        """Random rows (short histories, some of them below min_uih), and with ``data`` the protocol's first test
        batches (up to ``n`` users, 16 per batch, as evaluated)."""
        out = {"random rows": self.example_inputs(model, min(n, 256), None)}
        if data is not None:
            users = self.split_users(data, "test")[:n]
            for s in range(0, min(len(users), 4 * EVAL_BATCH), EVAL_BATCH):
                inputs = self.samples(model.hparams, data, users[s:s + EVAL_BATCH])
                out[f"test batch {s // EVAL_BATCH + 1}"] = {k: torch.from_numpy(v) for k, v in inputs.items()}
        return out

    def check_latency(self, hparams: dict[str, Any], data: Any, batch: int) -> None:
        """Refuse a batch whose attention scores would not fit: the longest test history sets N for some batch."""
        users = self.split_users(data, "test")
        if not len(users):
            return  # nothing to time: the evaluation refuses the dataset
        longest = int((data.offsets[users + 1] - data.offsets[users]).max()) - hparams["num_candidates"]
        n = len(hparams["contextual"]) + min(longest, hparams["max_seq_len"] - hparams["num_candidates"]
                                             - len(hparams["contextual"])) + hparams["num_candidates"]
        need = (8 * hparams["heads"] + 1) * batch * n * n  # per layer: float32 scores twice, a bool mask
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need > have // 2:
            raise UserError(f"latency at batch {batch}: test histories reach {n} tokens, and every STU layer holds "
                            f"[batch, heads, {n}, {n}] attention scores: about {need / 2 ** 30:.1f} GiB, more than "
                            f"half of this machine's {have / 2 ** 30:.1f} GiB",
                            "pass smaller --batch-sizes (e.g. 1,16), or --no-latency")

    def latency_inputs(self, hparams: dict[str, Any], data: Any, batch: int, count: int, seed: int = 0,
                       candidates: int | None = None) -> list[Inputs]:
        if candidates is not None and candidates != hparams["num_candidates"]:
            raise UserError(f"a dlrm_hstu sample has the last {hparams['num_candidates']} items as its candidates",
                            f"drop --candidates, or pass {hparams['num_candidates']}")
        self.check_latency(hparams, data, batch)
        picks = np.resize(self.split_users(data, "test"), batch * count)
        return [self.samples(hparams, data, picks[i * batch:(i + 1) * batch]) for i in range(count)]


def _user_ids(data: Any) -> np.ndarray:
    """The dataset's user ids as integers (the contextual feature upstream looks up), or a clear refusal."""
    return _read_user_ids(data.path, data.fingerprint)


@lru_cache(maxsize=4)
def _read_user_ids(path: Path, fingerprint: str) -> np.ndarray:
    try:
        ids = np.asarray([int(u) for u in np.load(path / "user_ids.npy")], dtype=np.int64)
    except ValueError:
        raise UserError(f"{path}: user ids are not integers, and a dlrm_hstu model looks each up as a row",
                        "prepare the data with --layout gr, which keeps the file's own ids") from None
    if len(ids) and ids.min() < 0:
        raise UserError(f"{path}: a user id is negative", "prepare the data again")
    ids.flags.writeable = False
    return ids


FAMILY = DlrmHSTUFamily()
