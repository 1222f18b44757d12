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

from .posttrain import CHUNK, ErrorSum, finish, id_weights, relative_error, segment_fit, segment_mean, val_metrics
from .registry import FINETUNE, RATIO, Context, Method, NoSaving, Param, register

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

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
HASH_STEP = 1 << 14  # rows a block of the hashing fit (4 MB at d = 64): 65,536 held ~50 MB more, no faster


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


def make_qr(rows: int, dim: int, params: dict[str, Any], q_device: str | None = None) -> QRTable:
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
    return hashed.QRTable(rows, dim, c, op, q_device)


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
    """Each bucket's weighted mean, summed straight into the table in float32 (about ``ratio`` rows a bucket;
    the weights' sums stay float64)."""
    segment_fit(t.rows, t.buckets, lambda s, e: (w[s:e].float(), t.bucket(torch.arange(s, e)), None,
                                                 _part(weights, s, e)), HASH_STEP, out=t.weight.data)


def _qr_step(c: int) -> int:
    """Rows per block of the QR passes: whole quotient segments (``c`` consecutive ids each)."""
    return max(1, CHUNK // c) * c


def _quotient(t: QRTable, rows: torch.Tensor, ids: torch.Tensor, r: torch.Tensor,
              weights: torch.Tensor | None) -> torch.Tensor:
    """The quotient rows whose segments ``ids`` (consecutive, starting a segment) cover, fitted to ``rows``
    given the remainder rows ``r``: they depend on these rows alone, so q is never needed whole."""
    c, h = t.collisions, t.dim // 2
    seg = ids // c - int(ids[0]) // c
    if t.op == "concat":
        values, other = rows[:, :h], None
    elif t.op == "add":
        values, other = rows - r[ids % c], None
    else:
        values, other = rows, r[ids % c]
    return segment_fit(len(ids), int(seg[-1]) + 1, lambda a, b: (
        values[a:b], seg[a:b], None if other is None else other[a:b], _part(weights, a, b)))


def _qr_remainder(t: QRTable, w: Rows, weights: torch.Tensor | None) -> torch.Tensor:
    """The remainder rows r (float64): concat's second-half means, or ALS_ITERS alternating least-squares
    steps for add and mult (q from ones / zeros, then r | q, q | r, ...). Each step is one pass over the rows,
    in blocks of whole quotient segments, each block's q recomputed from the previous r."""
    c, h, step = t.collisions, t.dim // 2, _qr_step(t.collisions)
    if t.op == "concat":
        return segment_fit(t.rows, c, lambda s, e: (w[s:e].double()[:, h:], torch.arange(s, e) % c, None,
                                                    _part(weights, s, e)), step)
    r = None
    for _ in range(ALS_ITERS):
        def block(s: int, e: int, r: torch.Tensor | None = r) -> tuple[Any, Any, Any, Any]:
            ids, rows = torch.arange(s, e), w[s:e].double()
            if r is None:
                q = (torch.zeros_like if t.op == "add" else torch.ones_like)(rows)
            else:
                q = _quotient(t, rows, ids, r, _part(weights, s, e))[ids // c - s // c]
            return (rows - q, ids % c, None, _part(weights, s, e)) if t.op == "add" else \
                (rows, ids % c, q, _part(weights, s, e))
        r = segment_fit(t.rows, c, block, step)
    return r


def _qr_blocks(t: QRTable, w: Rows, weights: torch.Tensor | None, r: torch.Tensor,
               errors: tuple[ErrorSum, ErrorSum | None]) -> Iterator[tuple[int, torch.Tensor]]:
    """(first quotient row, quotient rows float32) given r, block by block; each block's fit, as the stored
    float32 rows give it, is added to ``errors`` (unweighted, and weighted when there are weights)."""
    c, step, r32 = t.collisions, _qr_step(t.collisions), r.float()
    for s in range(0, t.rows, step):
        e = min(s + step, t.rows)
        ids, rows = torch.arange(s, e), w[s:e].double()
        q = _quotient(t, rows, ids, r, _part(weights, s, e)).float()
        qi, ri = q[ids // c - s // c], r32[ids % c]
        approx = qi * ri if t.op == "mult" else qi + ri if t.op == "add" else torch.cat([qi, ri], 1)
        errors[0].add(rows, approx)
        if errors[1] is not None:
            errors[1].add(rows, approx, _part(weights, s, e))
        yield s // c, q


def _fit_qr(t: QRTable, w: Rows, weights: torch.Tensor | None,
            record: dict[str, Any]) -> Callable[[], Iterator[tuple[str, int, torch.Tensor]]] | None:
    """r by :func:`_qr_remainder`; then q block by block, into ``t`` or (q on the meta device) by the returned
    generator, which fills ``record``'s errors when it ends."""
    r = _qr_remainder(t, w, weights)
    t.r.data.copy_(r.float())
    errors = (ErrorSum(), ErrorSum() if weights is not None else None)

    def done() -> None:
        record["rel_error"] = round(errors[0].value(), 6)
        record["rel_error_freq_weighted"] = round(errors[1].value(), 6) if errors[1] is not None else None

    def blocks() -> Iterator[tuple[str, int, torch.Tensor]]:
        for start, q in _qr_blocks(t, w, weights, r, errors):
            yield "q", start, q
        done()

    if t.q.is_meta:
        return blocks
    for _, start, q in blocks():
        t.q.data[start:start + len(q)] = q
    return None


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
           sources: dict[str, Rows] | None = None) -> tuple[Checkpoint, dict[str, Any]]:
    """Fit every selected table; one in ``sources`` is read from its file in chunks. hash tables are small
    and made in memory; a qr table's quotient rows (rows / c of them) are written in blocks by the returned
    generator, its remainder rows fitted first."""
    entry: dict[str, Any] = {"method": kind, "params": {k: v for k, v in params.items() if v is not None}, "tables": {}}
    before = val_metrics(ckpt, ctx)
    weights = id_weights(ckpt, ctx)
    blocks = {}
    for name in ctx.select.pick(ckpt):
        t = ckpt.model.tables[name]
        streamed = bool(sources) and name in sources
        w = sources[name] if streamed else t.dense_weight()
        tw = weights.get(name) if weights is not None else None
        new: Table
        record: dict[str, Any] = {"rel_error": None, "rel_error_freq_weighted": None}  # filled once fitted
        try:
            if kind == "hash":
                new = make_hash(t.rows, t.dim, params, name, ctx.train.seed)
            elif kind == "qr":
                new = make_qr(t.rows, t.dim, params, "meta" if streamed else None)
            else:
                new, hot_ids = make_freqhash(t.rows, t.dim, params, name, ctx.train.seed, tw)
        except NoSaving as e:
            entry["tables"][name] = {"skipped": str(e)}
            continue
        if new.stored_bytes() >= t.stored_bytes():
            entry["tables"][name] = {"skipped": f"{kind} saves nothing on {t.rows} rows"}
            continue
        if kind == "hash":
            _fit_hash(new, w, tw)
        elif kind == "qr":
            gen = _fit_qr(new, w, tw, record)
            if gen is not None:
                blocks[name] = gen
        else:
            _fit_freqhash(new, w, tw, hot_ids)
        if kind != "qr":
            record["rel_error"] = round(relative_error(w, new), 6)
            record["rel_error_freq_weighted"] = round(relative_error(w, new, tw), 6) if tw is not None else None
        entry["tables"][name] = record
        record.update({"bytes_before": t.stored_bytes(), "bytes_after": new.stored_bytes(), **new.config()})
        record.pop("hashes", None)
        ckpt.model.tables[name] = new
    return finish(ckpt, params, ctx, entry, before), blocks


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
                    apply=lambda ckpt, params, ctx, _k=_kind: _apply(_k, ckpt, params, ctx)[0],
                    fresh=_fresh(_kind),
                    stream=None if _needs else (lambda ckpt, params, ctx, sources, _k=_kind:
                                                _apply(_k, ckpt, params, ctx, sources))))
