"""``hash``, ``qr``, ``freqhash``: hashing-family tables, from a trained table or from scratch.

Post-training, the shared rows are fitted to the trained table by least squares weighted by training
frequency (each id's row counts as often as it is looked up): for the hashing trick and QR-concat that
is the bucket mean; QR mult/add and the double-hashed tail are solved by alternating least squares.
The published methods all train these tables from scratch (QR is a fixed index code, so a trained table
cannot be mapped onto it exactly); the fit error is reported, and ``--finetune`` recovers what it can.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

from recompress.errors import UserError
from recompress.lazy import lazy

from .posttrain import finish, id_weights, relative_error, segment_fit, segment_mean, val_metrics
from .registry import FINETUNE, RATIO, Context, Method, NoSaving, Param, register

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from recompress.blockfile import Rows
    from recompress.checkpoint import Checkpoint
    from recompress.tables import Table
    from recompress.tables.hashed import FreqHashTable, HashedTable, QRTable

torch = lazy("torch")
np = lazy("numpy")
hashed = lazy("recompress.tables.hashed")

QR_OPS = ("mult", "add", "concat")

ALS_ITERS = 10


def hash_constants(seed: int, table: str, count: int) -> list[list[int]]:
    """``count`` (a, b) pairs for universal hashing, fixed by the seed and the table's name."""
    rng = np.random.default_rng([seed, zlib.crc32(table.encode())])
    return [[int(rng.integers(1, hashed.PRIME)), int(rng.integers(0, hashed.PRIME))] for _ in range(count)]


def _budget_rows(rows: int, params: dict[str, Any], key: str, method: str) -> int:
    """Shared rows from ``--<key>`` or from ``--ratio``; validated against the table's own rows."""
    n, ratio = params.get(key), params.get("ratio")
    if (n is None) == (ratio is None):
        raise UserError(f"{method} needs exactly one of --{key} or --ratio", "e.g. --ratio 16")
    if ratio is not None:
        if ratio <= 1:
            raise UserError(f"--ratio {ratio} does not compress", "pass a ratio above 1, e.g. --ratio 16")
        n = max(1, int(rows / ratio))
    if n < 1:
        raise UserError(f"--{key} {n} is impossible", f"--{key} must be at least 1")
    return n


def make_hash(rows: int, dim: int, params: dict[str, Any], name: str, seed: int) -> HashedTable:
    buckets = _budget_rows(rows, params, "buckets", "hash")
    if buckets >= rows and params.get("ratio") is not None:
        raise NoSaving(f"{rows} rows are too few for --ratio {params['ratio']}")
    if buckets >= rows:
        raise UserError(f"--buckets {buckets} is not below the table's {rows} rows", "hashing only helps with fewer buckets")
    (a, b), = hash_constants(seed, name, 1)
    return hashed.HashedTable(rows, dim, buckets, a, b)


def make_qr(rows: int, dim: int, params: dict[str, Any]) -> QRTable:
    op = params.get("op") or "mult"
    if op not in QR_OPS:
        raise UserError(f"unknown QR operation {op!r}", f"choose from {', '.join(QR_OPS)}")
    if op == "concat" and dim % 2:
        raise UserError(f"QR concat needs an even width, the table has {dim}", "use --op mult or add")
    c = params.get("collisions")
    if c is None and params.get("ratio") is not None:
        c = max(2, round(params["ratio"]))
        if (-(-rows // c) + c) >= rows:
            raise NoSaving(f"{rows} rows are too few for --ratio {params['ratio']}")
    if c is None:
        raise UserError("qr needs --collisions or --ratio", "e.g. --collisions 4 (dlrm's default)")
    if c < 2 or c > rows:
        raise UserError(f"--collisions {c} is impossible for a table of {rows} rows",
                        f"pick a number of collisions from 2 to {rows}")
    return hashed.QRTable(rows, dim, c, op)


def make_freqhash(rows: int, dim: int, params: dict[str, Any], name: str, seed: int,
                  counts: torch.Tensor) -> tuple[FreqHashTable, torch.Tensor]:
    """The table (hot ids = most frequent in training) and the hot ids in slot order."""
    if counts is None:
        raise UserError(f"freqhash needs training frequencies of table {name}, and the model's family has none "
                        "for it", "apply freqhash to the tables whose ids the training data holds (e.g. the item table)")
    budget = _budget_rows(rows, params, "buckets", "freqhash") if params.get("ratio") is not None else None
    hot = params.get("hot")
    if budget is not None:
        slot_rows = 4 / (dim * 4)  # the int32 slot map costs this many rows' worth per id
        budget = int(budget - rows * slot_rows)
        if budget < 2:
            raise NoSaving(f"--ratio {params['ratio']} leaves no rows once the {rows}-entry slot map is paid for")
        hot = budget // 2 if hot is None else hot
        buckets = budget - hot
    else:
        buckets = params.get("buckets")
        if buckets is None or hot is None:
            raise UserError("freqhash needs --hot and --buckets, or --ratio", "e.g. --ratio 8")
    if hot < 0 or buckets < 1 or hot + buckets >= rows:
        raise UserError(f"--hot {hot} plus --buckets {buckets} must be below the table's {rows} rows (and buckets >= 1)",
                        "lower --hot/--buckets")
    order = torch.argsort(counts, descending=True, stable=True)[:hot]
    share = float(counts[order].sum() / counts.sum()) if counts.sum() > 0 else 0.0
    table = hashed.FreqHashTable(rows, dim, hot, buckets, hash_constants(seed, name, 2), round(share, 6))
    table.slot[order] = torch.arange(hot, dtype=torch.int32)
    return table, order


def _fit_hash(t: HashedTable, w: Rows, weights: torch.Tensor | None) -> None:
    t.weight.data.copy_(segment_fit(t.rows, t.buckets, lambda s, e: (
        w[s:e].double(), t.bucket(torch.arange(s, e)), None, _part(weights, s, e))).float())


def _fit_qr(t: QRTable, w: Rows, weights: torch.Tensor | None) -> None:
    """Bucket means for concat; alternating least squares for add and mult. Every half-step is one pass
    over the table's rows in chunks (``w`` may be a file's rows)."""
    c, nq = t.collisions, t.q.shape[0]

    def fit(segments: int, own: Callable[[torch.Tensor], torch.Tensor],
            values: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        def block(s: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
            ids = torch.arange(s, e)
            vals, other = values(w[s:e].double(), ids)
            return vals, own(ids), other, _part(weights, s, e)
        return segment_fit(t.rows, segments, block)
    quotient, remainder = (lambda ids: ids // c), (lambda ids: ids % c)
    if t.op == "concat":
        h = t.dim // 2
        q = fit(nq, quotient, lambda rows, ids: (rows[:, :h], None))
        r = fit(c, remainder, lambda rows, ids: (rows[:, h:], None))
    elif t.op == "add":
        q = torch.zeros(nq, t.dim, dtype=torch.float64)
        for _ in range(ALS_ITERS):
            r = fit(c, remainder, lambda rows, ids: (rows - q[ids // c], None))
            q = fit(nq, quotient, lambda rows, ids: (rows - r[ids % c], None))
    else:  # mult: per column, q = sum w W r / sum w r^2 and the same for r
        q = torch.ones(nq, t.dim, dtype=torch.float64)
        for _ in range(ALS_ITERS):
            r = fit(c, remainder, lambda rows, ids: (rows, q[ids // c]))
            q = fit(nq, quotient, lambda rows, ids: (rows, r[ids % c]))
    t.q.data.copy_(q.float())
    t.r.data.copy_(r.float())


def _part(weights: torch.Tensor | None, s: int, e: int) -> torch.Tensor | None:
    return None if weights is None else weights[s:e]


def _fit_freqhash(t: FreqHashTable, w: torch.Tensor, weights: torch.Tensor | None, hot_ids: torch.Tensor) -> None:
    t.hot.data[:len(hot_ids)] = w[hot_ids]
    tail = (t.slot < 0).nonzero().squeeze(1)
    h1, h2 = t.tail_buckets(tail)
    wt = w[tail].double()
    ww = torch.ones(len(tail), dtype=torch.float64) if weights is None else weights[tail]
    e = torch.zeros(t.buckets, t.dim, dtype=torch.float64)
    both = torch.cat([h1, h2])
    for _ in range(ALS_ITERS):  # damped Jacobi on the weighted least-squares normal equations
        target = torch.cat([wt - e[h2], wt - e[h1]])
        e = 0.5 * e + 0.5 * segment_mean(target, both, t.buckets, torch.cat([ww, ww]))
    t.tail.data.copy_(e.float())


def _apply(kind: str, ckpt: Checkpoint, params: dict[str, Any], ctx: Context,
           sources: dict[str, Rows] | None = None) -> Checkpoint:
    """Fit every selected table; one in ``sources`` is read from its file in chunks (hash and qr; the
    tables they make are small)."""
    entry: dict[str, Any] = {"method": kind, "params": {k: v for k, v in params.items() if v is not None}, "tables": {}}
    before = val_metrics(ckpt, ctx)
    weights = id_weights(ckpt, ctx)
    for name in ctx.select.pick(ckpt):
        t = ckpt.model.tables[name]
        w = sources[name] if sources and name in sources else t.dense_weight()
        tw = weights.get(name) if weights is not None else None
        new: Table
        try:
            if kind == "hash":
                new = make_hash(t.rows, t.dim, params, name, ctx.train.seed)
                _fit_hash(new, w, tw)
            elif kind == "qr":
                new = make_qr(t.rows, t.dim, params)
                _fit_qr(new, w, tw)
            else:
                new, hot_ids = make_freqhash(t.rows, t.dim, params, name, ctx.train.seed, tw)
                _fit_freqhash(new, w, tw, hot_ids)
        except NoSaving as e:
            entry["tables"][name] = {"skipped": str(e)}
            continue
        if new.stored_bytes() >= t.stored_bytes():
            entry["tables"][name] = {"skipped": f"{kind} saves nothing on {t.rows} rows"}
            continue
        entry["tables"][name] = {"rel_error": round(relative_error(w, new), 6),
                                 "rel_error_freq_weighted": round(relative_error(w, new, tw), 6) if tw is not None else None,
                                 "bytes_before": t.stored_bytes(), "bytes_after": new.stored_bytes(),
                                 **new.config()}
        entry["tables"][name].pop("hashes", None)
        ckpt.model.tables[name] = new
    return finish(ckpt, params, ctx, entry, before)


def _fresh(kind: str) -> Any:
    def fresh(name: str, rows: int, dim: int, params: dict[str, Any], seed: int, counts: Any) -> Table:
        if kind == "hash":
            return make_hash(rows, dim, params, name, seed)
        if kind == "qr":
            return make_qr(rows, dim, params)
        weights = None if counts is None else torch.as_tensor(counts, dtype=torch.float64)
        return make_freqhash(rows, dim, params, name, seed, weights)[0]
    return fresh


COMMON = (RATIO, FINETUNE)
BUCKETS = Param("buckets", int, "hash/freqhash: shared rows")
for _kind, _help, _params, _needs in (
    ("hash", "hashing trick: ids share --buckets rows through a seeded universal hash", (BUCKETS,), False),
    ("qr", "quotient-remainder compositional table: q[id // c] (op) r[id % c]",
     (Param("collisions", int, "qr: ids per remainder row c (dlrm's --qr-collisions)"),
      Param("op", str, "qr: how q and r rows combine", "mult", QR_OPS)), False),
    ("freqhash", "frequency-aware double hashing: the --hot most frequent ids keep rows, the tail is double-hashed",
     (BUCKETS, Param("hot", int, "freqhash: ids that keep their own row (most frequent in training)")), True),
):
    register(Method(name=_kind, help=_help, params=(*_params, *COMMON), accepts=frozenset({"dense"}),
                    needs_data=(lambda p: True) if _needs else (lambda p: bool(p.get("finetune"))),
                    apply=lambda ckpt, params, ctx, _k=_kind: _apply(_k, ckpt, params, ctx),
                    fresh=_fresh(_kind),
                    stream=None if _needs else (lambda ckpt, params, ctx, sources, _k=_kind:
                                                (_apply(_k, ckpt, params, ctx, sources), {}))))
