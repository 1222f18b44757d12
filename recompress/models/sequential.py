"""What the sequential families share: batches, negatives, losses and leave-one-out ranking evaluation.

Layout, as in SASRec.pytorch: a history is the user's last ``max_len`` items, left-padded with 0; in
training, position i's target is the item after position i. Losses: ``bce`` (SASRec: each position's
target against its own negatives, drawn uniformly and redrawn while they hit an item of the user's
window) or ``sampled-softmax`` (HSTU: softmax over the target and ``negatives`` items at a temperature;
the negatives are drawn uniformly once per batch and shared by every position, which keeps 128 of them
affordable on a CPU, and a negative that is the position's own target is masked out).

Evaluation (RecBole's two protocols): ``full`` ranks the target among all items, skipping items the user
already has; ``sampled`` ranks it among ``negatives`` (100) items the user never had (on a dataset in
SASRec.pytorch's layout, items not among the user's training items, as its ``evaluate`` draws them),
drawn once per split with a fixed seed, so every model sees the same candidates (SASRec.pytorch's
protocol). Ties are broken uniformly at random, seeded (``recompress.metrics.ranks``).

A sequential model is an ``nn.Module`` with ``tables`` (``item``, ``position``), ``hparams`` and
``forward(history, candidates, timestamps=None) -> scores [B, M]`` (candidates ``[B, M]``, or ``[1, M]``
shared by the batch), plus ``train_logits(history, targets, negatives, timestamps) -> (pos [B, L],
neg [B, L, K])`` with negatives ``[B, L, K]`` or ``[K]`` (shared).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from recompress.distributed import shard
from recompress.errors import UserError
from recompress.metrics import ranks
from recompress.spec import ModelSpec

from .family import Family, Inputs

PARITY_USERS = 256


def item_embed(model: nn.Module, ids: Tensor) -> Tensor:
    """Item rows for ``ids`` with padding (0) forced to zero, whatever the table's kind."""
    return model.tables["item"].lookup(ids.clamp(min=0)) * (ids > 0).unsqueeze(-1).to(torch.float32)


def dot_negatives(h: Tensor, neg: Tensor, shared: bool) -> Tensor:
    """``[B, L, K]`` dot products of states ``h`` [B, L, d] with negative rows ``neg`` ([K, d] shared, or [B, L, K, d])."""
    return h @ neg.T if shared else (h.unsqueeze(2) * neg).sum(-1)


def dot_candidates(h: Tensor, cand: Tensor) -> Tensor:
    """``[B, M]`` scores of user states ``h`` [B, d] against candidate rows ``cand`` ([B, M, d], or [1, M, d]
    shared by the batch): one batched MatMul that broadcasts, so one graph serves both shapes (written
    [B, 1, d] @ [., d, M]: the other order made torch copy the shared rows per user, 15x slower)."""
    return (h.unsqueeze(1) @ cand.transpose(1, 2)).squeeze(1)


class Dropout(nn.Module):
    """``nn.Dropout`` (inverted: kept values scaled by 1 / (1 - p)) with its mask drawn by ``torch.rand``,
    which on CPU is about 2x faster than the ``bernoulli_`` that ``nn.Dropout`` uses (dropout was 30% of
    a SASRec training step)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout {p} is not in [0, 1)")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * (torch.rand_like(x) >= self.p) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def positions(history: Tensor, from_first: bool = False) -> Tensor:
    """SASRec.pytorch's positions: slot index 1..L for real items, 0 for padding; ``from_first``: 1..n from
    the first real item (RecBole's position ids 0..n-1 of its right-padded sequences, plus one)."""
    real = history > 0
    slots = torch.arange(1, history.shape[1] + 1, device=history.device).expand_as(history)
    if from_first:
        slots = slots - (history.shape[1] - real.sum(1, keepdim=True))
    return slots * real


def per_candidate(t: Tensor, m: int) -> Tensor:
    """``[B, L]`` -> ``[B * m, L]``: each row repeated once for each of its ``m`` candidates (row-major)."""
    b, length = t.shape
    return t.unsqueeze(1).expand(b, m, length).reshape(b * m, length)


def causal_mask(history: Tensor, with_padding: bool = False) -> Tensor:
    """``[B, L, L]`` True where query i may attend key j: j <= i and j real (a padded query sees only itself),
    or, ``with_padding``, every j <= i (SASRec.pytorch's mask)."""
    length = history.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=history.device).tril()
    if with_padding:
        return causal.expand(history.shape[0], length, length)
    real = (history > 0).unsqueeze(1)
    return causal & (real | torch.eye(length, dtype=torch.bool, device=history.device))


def key_mask(history: Tensor) -> Tensor:
    """``[B, L, L]`` True where query i may attend key j in both directions: every real j (and a padded query
    itself, so that every query has a key)."""
    length = history.shape[1]
    return (history > 0).unsqueeze(1) | torch.eye(length, dtype=torch.bool, device=history.device)


class SequentialFamily(Family):
    metrics = ("ndcg@10", "hr@10", "ndcg@20", "hr@20", "mrr", "mrr@10", "uauc")
    record = "ranks"
    protocols = ("full", "sampled")
    # The history axis is max_len, fixed: positions count from the left of the left-padded window and HSTU
    # normalizes by its length, so a shorter unpadded window would score differently from the same items
    # padded (by up to 0.27 in SASRec's scores): serve windows as trained, left-padded with 0.
    inputs = {"history": {0: "batch"}, "candidates": {0: "batch", 1: "candidates"}}
    output = "scores"
    scorings = ("amortized", "naive")
    # shared: candidates [1, M], the same for every history (the full catalogue); per-row: [batch, M]. One
    # graph cannot take both: tracing broadcasts the two batch axes, which makes them one symbol.
    layouts = ("shared", "per-row")
    compressible = ("item",)
    adam_betas = (0.9, 0.98)  # SASRec.pytorch's Adam
    extra_positions = 0  # position rows beyond 1..max_len (the ranker's candidate slot)
    extra_items = 0  # item rows beyond padding and 1..num_items (BERT4Rec's mask token)
    positional = True  # whether the model has a position table
    eval_batch = {"full": 512, "sampled": 2048}  # users per evaluation batch
    # hyper-parameter -> (what its value must be, the test), checked where the family declares it
    CHECKS = {"dim": (">= 1", lambda hp: hp["dim"] >= 1), "blocks": (">= 1", lambda hp: hp["blocks"] >= 1),
              "heads": (">= 1 and divides dim", lambda hp: hp["heads"] >= 1 and hp["dim"] % hp["heads"] == 0),
              "max_len": (">= 1", lambda hp: hp["max_len"] >= 1),
              "dropout": ("in [0, 1)", lambda hp: 0 <= hp["dropout"] < 1),
              "negatives": (">= 1", lambda hp: hp["negatives"] >= 1),
              "temperature": ("> 0", lambda hp: hp["temperature"] > 0),
              "hidden": (">= 1", lambda hp: hp["hidden"] >= 1), "layers": (">= 1", lambda hp: hp["layers"] >= 1),
              "mask_ratio": ("in [0, 1)", lambda hp: 0 <= hp["mask_ratio"] < 1),
              "ffn_dim": (">= 1 (or left out: dim)", lambda hp: hp["ffn_dim"] is None or hp["ffn_dim"] >= 1),
              "ln_eps": ("> 0", lambda hp: hp["ln_eps"] > 0)}

    # --- model -----------------------------------------------------------------------------------------
    def table_rows(self, hparams: dict[str, Any]) -> dict[str, int]:
        """Rows of each table of a model with ``hparams``: the item table's padding row 0, items 1..num_items
        (and ``extra_items``); the position table's padding row 0, slots 1..max_len (and ``extra_positions``)."""
        rows = {"item": hparams["num_items"] + 1 + self.extra_items}
        if self.positional:
            rows["position"] = hparams["max_len"] + 1 + self.extra_positions
        return rows

    def new_spec(self, data: Any, hparams: dict[str, Any]) -> ModelSpec:
        self.check_data(data)
        hp = self.hparams(hparams)
        for name, (rule, ok) in self.CHECKS.items():
            if name in hp and not ok(hp):
                flag = f"--{name.replace('_', '-')}"
                raise UserError(f"{flag} {hp[name]} is impossible for {self.name}", f"{flag} must be {rule}")
        hp = {**hp, "num_items": data.num_items, "has_times": bool(data.meta.get("has_times")), "tied_output": True}
        tables = self.spec_tables({n: (r, hp["dim"], n) for n, r in self.table_rows(hp).items()})
        return ModelSpec(family=self.name, hparams=hp, tables=tables,
                         vocab={"dataset": str(data.path), "fingerprint": data.fingerprint, "num_items": data.num_items,
                                "synthetic": bool(data.meta.get("synthetic")),
                                "vocabularies": data.meta.get("vocabularies") or {}})

    def init_layers(self, model: nn.Module, gen: torch.Generator) -> None:
        """SASRec.pytorch's rule: xavier-normal for every matrix; the biases it leaves to PyTorch's default
        U(+-1/sqrt(fan_in)) are drawn from ``gen`` too (attention biases stay zero, as
        ``nn.MultiheadAttention`` sets them), so the seed alone decides the start."""
        for name, p in model.named_parameters():
            if p.dim() > 1 and not name.startswith("tables."):
                fan_in, fan_out = p.shape[1], p.shape[0]
                p.normal_(0.0, (2.0 / (fan_in + fan_out)) ** 0.5, generator=gen)
        attention = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None and id(m) not in attention:
                bound = 1.0 / m.weight.shape[1] ** 0.5
                m.bias.uniform_(-bound, bound, generator=gen)

    def check(self, spec: ModelSpec, data: Any) -> None:
        self.check_data(data)
        rows = next(t.rows for t in spec.tables if t.name == "item")
        if self.table_rows({**spec.hparams, "num_items": data.num_items})["item"] != rows:
            items = rows - 1 - self.extra_items
            parts = "items, padding and the mask token" if self.extra_items else "items and padding"
            raise UserError(f"the model's item table has {rows:,} rows ({items:,} {parts}) but the dataset "
                            f"has {data.num_items:,} items: the model was trained on other ids, and its scores here "
                            "would mean nothing", "use the dataset the model was trained on, prepared the way its "
                            "trainer prepared it (e.g. 'recompress data sequences --layout sasrec')")
        if self.uses_times(spec.hparams) and not data.meta.get("has_times"):
            raise UserError(f"this {self.name} model was trained with timestamps and {data.path} has none",
                            "use the dataset the model was trained on")
        self.check_vocabularies(spec, data)

    def query_time(self, hparams: dict[str, Any]) -> bool:
        """Whether the timestamps carry one more column: the time of the item asked for, after the history's."""
        return False

    def uses_times(self, hparams: dict[str, Any]) -> bool:
        return False

    def table_counts(self, spec: ModelSpec, data: Any) -> dict[str, np.ndarray]:
        return {"item": data.id_counts("train")}

    # --- training ---------------------------------------------------------------------------------------
    def steps_per_epoch(self, data: Any, batch_size: int) -> int:
        return -(-data.num_users // batch_size)

    def batches(self, model: nn.Module, data: Any, batch_size: int, seed: int,
                part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, Tensor]]:
        """Each rank builds the whole global batch and keeps its rows: the negatives are drawn for the whole
        batch (so any number of ranks draws the same ones), and B x max_len windows are small to read."""
        hp = model.hparams
        length, k = hp["max_len"], hp["negatives"]
        rng = np.random.default_rng(seed)
        ends = data.history_end("train")
        for users in np.array_split(rng.permutation(data.num_users), self.steps_per_epoch(data, batch_size)):
            history = data.windows(users, ends[users] - 1, length)
            targets = data.windows(users, ends[users], length)
            if hp["loss"] == "sampled-softmax":  # shared by every row
                negatives = rng.integers(1, data.num_items + 1, k)
            else:
                window = np.concatenate([history, targets[:, -1:]], axis=1)
                negatives = sample_negatives(rng, data.num_items, (len(users), length, k), window)[
                    shard(len(users), part)]
            mine = shard(len(users), part)
            batch = {"history": torch.from_numpy(history[mine]), "targets": torch.from_numpy(targets[mine]),
                     "negatives": torch.from_numpy(negatives)}
            if self.uses_times(hp):
                q = self.query_time(hp)
                batch["timestamps"] = torch.from_numpy(data.windows(users[mine], ends[users[mine]] - 1 + q, length + q,
                                                                    data.times))
            yield batch

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        hp = model.hparams
        pos, neg = model.train_logits(batch["history"], batch["targets"], batch["negatives"], batch.get("timestamps"))
        valid = (batch["targets"] > 0) & (batch["history"] > 0)
        if hp["loss"] == "bce":
            bce = nn.functional.binary_cross_entropy_with_logits
            return bce(pos[valid], torch.ones_like(pos[valid])) + bce(neg[valid], torch.zeros_like(neg[valid]))
        neg = neg.masked_fill(batch["negatives"] == batch["targets"].unsqueeze(-1), float("-inf"))  # accidental hits
        logits = torch.cat([pos.unsqueeze(-1), neg], dim=-1)[valid] / hp["temperature"]
        return nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))

    def loss_units(self, batch: dict[str, Tensor]) -> int:
        return int(((batch["targets"] > 0) & (batch["history"] > 0)).sum())

    # --- evaluation -------------------------------------------------------------------------------------
    def eval_rows(self, data: Any, split: str, protocol: str, users: int | None) -> int:
        return data.num_users if users is None else min(users, data.num_users)

    def eval_users(self, data: Any, users: int | None, seed: int) -> np.ndarray:
        if users is None or users >= data.num_users:
            return np.arange(data.num_users)
        return np.sort(np.random.default_rng([seed, 7]).choice(data.num_users, users, replace=False))

    def eval_batches(self, hparams: dict[str, Any], data: Any, split: str, protocol: str, *, batch_size: int | None = None,
                     negatives: int = 100, seed: int = 0, users: int | None = None,
                     stored: bool = True) -> Iterator[tuple[Inputs, Any]]:
        """``stored``: score the negatives a dataset stores, where it has them (accuracy); False draws them (timing
        requests of any size)."""
        length = hparams["max_len"]
        who = self.eval_users(data, users, seed)
        ends = data.history_end(split)
        targets = np.asarray(data.items)[ends[who]].astype(np.int64)
        data.check_items(targets)
        batch_size = batch_size or self.eval_batch[protocol]
        rng = np.random.default_rng([seed, {"val": 1, "test": 2}.get(split, 3)])  # same candidates for every model
        for s in range(0, len(who), batch_size):
            u = who[s:s + batch_size]
            seen = self.seen(data, u, ends[u] + 1)  # history and target
            inputs = {"history": data.windows(u, ends[u], length)}
            if self.uses_times(hparams):
                q = self.query_time(hparams)
                inputs["timestamps"] = data.windows(u, ends[u] + q, length + q, data.times)
            if protocol == "full":
                inputs["candidates"] = np.arange(data.num_items + 1, dtype=np.int64)[None]
                yield inputs, (targets[s:s + len(u)], self.excluded(data, seen, inputs["history"], targets[s:s + len(u)]))
            elif stored and data.negatives is not None:  # drawn when the dataset was prepared (--layout torchrec)
                neg = stored_negatives(data, u, negatives)
                inputs["candidates"] = np.concatenate([targets[s:s + len(u), None], neg], axis=1)
                yield inputs, (np.zeros(len(u), dtype=np.int64), None)
            else:  # SASRec.pytorch's evaluate excludes only the training items (--layout sasrec)
                train_only = data.meta.get("sampled_negatives") == "not in train"
                neg = sample_negatives(rng, data.num_items, (len(u), negatives),
                                       seen=self.seen(data, u, data.history_end("val")[u]) if train_only else seen,
                                       pool=None if data.catalogue is None else np.flatnonzero(data.catalogue))
                inputs["candidates"] = np.concatenate([targets[s:s + len(u), None], neg], axis=1)
                yield inputs, (np.zeros(len(u), dtype=np.int64), None)

    @staticmethod
    def excluded(data: Any, seen: np.ndarray, history: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """``[B, N + 1]`` True for items full ranking skips, by the dataset's rule (``full_ranking_excludes``):
        ``history`` (the default) the user's earlier items but not the target; ``padding`` nothing else (RecBole's
        layout); ``window`` the items of the model's history window, the target too when it is one of them, so
        that it ranks after every candidate (generative-recommenders' eval filters the window's ids from its top
        k); and the items outside the dataset's catalogue, where it has one."""
        rule = data.meta.get("full_ranking_excludes", "history")
        if rule == "window":
            exclude = np.zeros_like(seen)
            exclude[np.arange(len(history))[:, None], history] = True
        elif rule == "padding":
            exclude = np.zeros_like(seen)
        else:
            exclude = seen.copy()
            exclude[np.arange(len(targets)), targets] = False
        exclude[:, 0] = True
        if data.catalogue is not None:
            exclude |= ~data.catalogue
        return exclude

    @staticmethod
    def seen(data: Any, users: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """``[len(users), N + 1]`` True for every item in each user's sequence before ``ends``."""
        out = np.zeros((len(users), data.num_items + 1), dtype=bool)
        starts = data.offsets[users]
        lengths = ends - starts
        rows = np.repeat(np.arange(len(users)), lengths)
        cols = np.concatenate([np.asarray(data.items[s:e]) for s, e in zip(starts, ends)]) if len(users) else []
        data.check_items(np.asarray(cols))
        out[rows, cols] = True
        return out

    def reduce(self, output: np.ndarray, truth: Any) -> tuple[np.ndarray, np.ndarray]:
        target, exclude = truth
        scores = np.asarray(output)
        if scores.shape[0] != len(target):  # candidates shared by the batch
            scores = np.broadcast_to(scores, (len(target), scores.shape[1]))
        if exclude is None:
            return ranks(scores, target), np.full(len(target), scores.shape[1])
        missed = exclude[np.arange(len(target)), target]  # a target the rule skips counts as ranked last
        return ranks(scores, target, exclude), (~exclude).sum(1) + missed

    # --- serving ----------------------------------------------------------------------------------------
    def scorer(self, model: nn.Module, scoring: str | None = None) -> nn.Module:
        if scoring not in (None, *self.scorings):
            raise UserError(f"unknown scoring {scoring!r}", f"choose from {', '.join(self.scorings)}")
        return PerCandidate(model) if scoring == "naive" else model

    def input_axes(self, hparams: dict[str, Any], layout: str | None = None) -> dict[str, dict[int, str]]:
        layout = layout or self.layouts[0]
        if layout not in self.layouts:
            raise UserError(f"unknown candidates layout {layout!r}", f"choose from {', '.join(self.layouts)}")
        axes = {**self.inputs, "candidates": {1: "candidates"} if layout == "shared" else self.inputs["candidates"]}
        return {**axes, "timestamps": {0: "batch"}} if self.uses_times(hparams) else axes

    def profile(self, spec: ModelSpec, layout: str | None = None) -> dict[str, tuple[int, int, int]]:
        """Histories per call up to 1,024; candidates: the whole catalogue when shared by the batch (full
        ranking), else up to 2,048 per history (the most generative-recommenders' configs score per pass)."""
        items = next(t.rows for t in spec.tables if t.name == "item")
        shared = (layout or self.layouts[0]) == "shared"
        return {"batch": (1, 64, 1024), "candidates": (1, min(items, 1000), items) if shared else (1, 128, 2048)}

    def example_inputs(self, model: nn.Module, n: int, data: Any | None, seed: int = 0) -> dict[str, Tensor]:
        hp = model.hparams
        gen = torch.Generator().manual_seed(seed)
        if data is not None:
            users = np.random.default_rng(seed).choice(data.num_users, min(n, data.num_users), replace=False)
            history = torch.from_numpy(data.windows(users, data.history_end("test")[users], hp["max_len"]))
        else:
            history = torch.randint(1, hp["num_items"] + 1, (n, hp["max_len"]), generator=gen)
            history[:, : hp["max_len"] // 3] = 0  # some padding
        out = {"history": history, "candidates": torch.randint(1, hp["num_items"] + 1, (len(history), 101), generator=gen)}
        if self.uses_times(hp):
            shape = (len(history), hp["max_len"] + self.query_time(hp))
            out["timestamps"] = torch.cumsum(torch.randint(0, 86_400, shape, generator=gen), dim=1)
        return out

    def parity_batches(self, model: nn.Module, n: int, data: Any | None) -> dict[str, dict[str, Tensor]]:
        """Histories with their own 101 candidates; candidates shared by the batch ([1, M], the full-ranking
        form); histories with at most 2 real items (the rest padding), 20 candidates each. At most 256
        histories: the naive graph scores each candidate with its own pass."""
        own = self.example_inputs(model, min(n, PARITY_USERS), data)
        short = {k: v[: len(v) // 2].clone() if k != "candidates" else v[: len(v) // 2, :20] for k, v in own.items()}
        short["history"][:, :-2] = 0
        shared = {**{k: v[: len(v) // 4] for k, v in own.items()}, "candidates": own["candidates"][:1, :64]}
        return {"own candidates": own, "shared candidates": shared, "mostly padding": short}

    def latency_inputs(self, hparams: dict[str, Any], data: Any, batch: int, count: int, seed: int = 0,
                       candidates: int | None = None) -> list[Inputs]:
        """``count`` batches of exactly ``batch`` test users (cycling through the users when there are fewer
        than ``count * batch``), with the candidates of the family's default protocol, or with
        ``candidates`` per user (the target and sampled items: a request of one history and M candidates)."""
        if candidates is not None and candidates < 1:
            raise UserError(f"--candidates {candidates} is impossible", "score at least one candidate per request")
        protocol = self.protocols[0] if candidates is None else "sampled"
        shared = {"candidates"} if protocol == "full" else set()  # [1, N + 1]: every item, for every row
        parts: list[Inputs] = []
        rows = 0
        while rows < count * batch:
            for inputs, _ in self.eval_batches(hparams, data, "test", protocol, batch_size=batch, seed=seed,
                                               negatives=(candidates or 101) - 1, stored=False):
                parts.append(inputs)
                rows += len(inputs["history"])
                if rows >= count * batch:
                    break
            seed += 1
        joined = {k: v if k in shared else np.concatenate([p[k] for p in parts]) for k, v in parts[0].items()}
        return [{k: v if k in shared else v[i * batch:(i + 1) * batch] for k, v in joined.items()} for i in range(count)]


class PerCandidate(nn.Module):
    """The naive serving graph, for comparison with the amortized one (the model itself): each of a
    history's M candidates is scored by its own pass over the history, as B * M histories of one candidate
    each (for the ranker, the candidate appended to the history and the whole sequence rerun)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, history: Tensor, candidates: Tensor, timestamps: Tensor | None = None) -> Tensor:
        cands = candidates.expand(history.shape[0], -1)
        b, m = cands.shape
        scores = self.model(per_candidate(history, m), cands.reshape(b * m, 1),
                            None if timestamps is None else per_candidate(timestamps, m))
        return scores.reshape(b, m)


def stored_negatives(data: Any, users: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` negatives the dataset stores for ``users`` (its layout's own draws), checked."""
    have = data.negatives.shape[1]
    if count > have:
        raise UserError(f"{data.path} stores {have} negatives per user (its layout's draws) and {count} were asked for",
                        f"pass --negatives {have} or fewer (--candidates {have + 1} or fewer)")
    neg = np.asarray(data.negatives[users, :count], dtype=np.int64)
    bad = (neg < 1) | (neg > data.num_items)
    if bad.any():
        raise UserError(f"{data.path / 'negatives.npy'}: item {int(neg[bad][0])} is outside the catalogue's "
                        f"{data.num_items} items",
                        "the dataset was damaged or edited after it was prepared: prepare it again")
    return neg


def sample_negatives(rng: np.random.Generator, num_items: int, shape: tuple[int, ...], window: np.ndarray | None = None,
                     seen: np.ndarray | None = None, pool: np.ndarray | None = None) -> np.ndarray:
    """Uniform item ids in 1..num_items (or among ``pool``'s ids) of ``shape`` [B, ...], redrawn while one hits
    the row's ``window`` items (or ``seen`` [B, N+1] mask); after 20 redraws a hit is kept (only when a user
    has almost every item)."""
    draw = (lambda: rng.integers(1, num_items + 1, shape)) if pool is None else \
        (lambda: pool[rng.integers(0, len(pool), shape)])
    neg = draw()
    rows = np.arange(shape[0]).reshape(-1, *([1] * (len(shape) - 1)))
    for _ in range(20):
        if seen is not None:
            hit = seen[rows, neg]
        else:
            hit = (neg[..., None] == window.reshape(shape[0], *([1] * (len(shape) - 1)), -1)).any(-1)
        if not hit.any():
            break
        neg = np.where(hit, draw(), neg)
    return neg
