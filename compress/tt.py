"""``tt``: tensor-train tables (TT-Rec). Post-training by streaming TT-SVD, optional fine-tune, or from scratch.

TT-SVD (Oseledets 2011) with the first, largest unfolding done in a streaming way: its Gram matrix
(``n_1 d_1`` square) is accumulated over column chunks gathered straight from the table, so a 10M-row
table is never copied or permuted whole; the remaining unfoldings are small and go through exact SVDs.
Ranks come from ``--tt-rank``, from ``--ratio`` (largest uniform rank that is that many times smaller),
or from ``--tol`` (relative Frobenius error budget, split evenly over the K-1 truncations).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from recompress.errors import UserError
from recompress.lazy import lazy

from .posttrain import finish, relative_error, val_metrics
from .registry import FINETUNE, RATIO, Context, Method, NoSaving, Param, register

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from recompress.blockfile import Rows
    from recompress.checkpoint import Checkpoint
    from recompress.tables import Table
    from recompress.tables.tt import TTTable

torch = lazy("torch")
linalg = lazy("recompress.linalg")
tt_table = lazy("recompress.tables.tt")
progress = lazy("recompress.progress")

GATHER_BYTES = 1 << 25  # bytes of table rows gathered per streaming chunk


def balanced_factors(n: int, k: int) -> list[int]:
    """``k`` factors with product >= n, as equal as possible (the padding is small)."""
    out: list[int] = []
    left = n
    for i in range(k):
        f = max(1, math.ceil(left ** (1.0 / (k - i)) - 1e-9))
        out.append(f)
        left = math.ceil(left / f)
    return out


def dim_factors(d: int, k: int) -> list[int]:
    """``k`` factors with product exactly d, as equal as possible (primes go to the smallest factor)."""
    primes, x, p = [], d, 2
    while x > 1:
        while x % p == 0:
            primes.append(p)
            x //= p
        p += 1
    out = [1] * k
    for q in sorted(primes, reverse=True):
        out[out.index(min(out))] *= q
    return sorted(out)


def max_ranks(row_shape: list[int], dim_shape: list[int]) -> list[int]:
    """Largest useful rank at each of the K-1 inner bonds (the smaller side of each unfolding)."""
    sizes = [n * d for n, d in zip(row_shape, dim_shape)]
    return [min(math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, len(sizes))]


def tt_bytes(row_shape: list[int], dim_shape: list[int], ranks: list[int]) -> int:
    return 4 * sum(n * ranks[k] * d * ranks[k + 1] for k, (n, d) in enumerate(zip(row_shape, dim_shape)))


def uniform_ranks(row_shape: list[int], dim_shape: list[int], r: int) -> list[int]:
    return [1, *[min(r, m) for m in max_ranks(row_shape, dim_shape)], 1]


def plan(rows: int, dim: int, params: dict[str, Any]) -> tuple[list[int], list[int], list[int] | None, float | None]:
    """TT shapes for a ``rows x dim`` table and the ranks (None when ``--tol`` decides them during TT-SVD)."""
    cores, rank, ratio, tol = params.get("cores") or 3, params.get("tt_rank"), params.get("ratio"), params.get("tol")
    if cores < 2:
        raise UserError(f"--cores {cores} is below 2", "a tensor train needs at least 2 cores (3 is TT-Rec's choice)")
    if sum(x is not None for x in (rank, ratio, tol)) != 1:
        raise UserError("tt needs exactly one of --tt-rank, --ratio or --tol", "e.g. --tt-rank 16")
    row_shape, dim_shape = balanced_factors(rows, cores), dim_factors(dim, cores)
    if rank is not None:
        if rank < 1:
            raise UserError(f"--tt-rank {rank} is impossible", "TT ranks start at 1; e.g. --tt-rank 16")
        return row_shape, dim_shape, uniform_ranks(row_shape, dim_shape, rank), None
    if tol is not None:
        if not 0 < tol < 1:
            raise UserError(f"--tol {tol} is not a relative error in (0, 1)", "e.g. --tol 0.3")
        return row_shape, dim_shape, None, tol
    if ratio <= 1:
        raise UserError(f"--ratio {ratio} does not compress", "pass a ratio above 1, e.g. --ratio 16")
    budget = rows * dim * 4 / ratio
    for r in range(max(max_ranks(row_shape, dim_shape)), 0, -1):
        ranks = uniform_ranks(row_shape, dim_shape, r)
        if tt_bytes(row_shape, dim_shape, ranks) <= budget:
            return row_shape, dim_shape, ranks, None
    raise NoSaving(f"no TT rank makes a {rows} x {dim} table {ratio}x smaller")


def _pick_rank(vals: torch.Tensor, fixed: int | None, budget_sq: float) -> int:
    """Rank from a descending spectrum: ``fixed`` (capped), or the smallest whose tail fits ``budget_sq``."""
    if fixed is not None:
        return max(1, min(fixed, len(vals)))
    tail = vals.flip(0).cumsum(0).flip(0)  # tail[r] = sum(vals[r:])
    ok = (tail <= budget_sq).nonzero()
    return max(1, int(ok[0]) if len(ok) else len(vals))


def _truncate(mat: torch.Tensor, fixed: int | None, budget_sq: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-truncated ``mat ~= U @ R`` (``U`` orthonormal columns, ``R = S Vh``), as an SVD would give, from
    the float64 Gram matrix of ``mat``'s smaller side accumulated in blocks: no copy of ``mat`` is made."""
    m, n = mat.shape
    side = min(m, n)
    step = max(1, GATHER_BYTES // (8 * max(m, n)))
    g = torch.zeros(side, side, dtype=torch.float64)
    if n <= m:
        for s in range(0, m, step):
            blk = mat[s:s + step].double()
            g += blk.T @ blk
    else:
        for s in range(0, n, step):
            blk = mat[:, s:s + step].double()
            g += blk @ blk.T
    basis, vals = linalg.principal_basis(g, side)
    r = _pick_rank(vals, fixed, budget_sq)
    basis = basis[:, :r]
    if n > m:  # basis spans mat's columns: U = basis, R = U^T mat
        return basis, torch.cat([basis.T @ mat[:, s:s + step].double() for s in range(0, n, step)], 1)
    sv = vals[:r].sqrt()
    live = sv > sv[0] * 1e-12 if r and sv[0] > 0 else torch.zeros(r, dtype=torch.bool)
    scale = torch.where(live, 1 / torch.where(live, sv, 1), 0)  # a zero singular value: its column stays zero
    u = torch.cat([(mat[s:s + step].double() @ basis) * scale for s in range(0, m, step)])
    return u, (sv * live)[:, None] * basis.T


def _first_unfolding(weight: Rows, n1: int, d1: int, m_total: int) -> Any:
    """Column chunks ``[n1*d1, c*(d/d1)]`` of the first TT unfolding of the (unpadded) table: each chunk is
    ``n1`` contiguous row ranges ``i * m_total + [m0, m0 + c)``, zero past the last row."""
    n, d = weight.shape
    chunk = max(1, GATHER_BYTES // (n1 * d * 4))
    for m0 in range(0, m_total, chunk):
        c = min(chunk, m_total - m0)
        rows = torch.zeros(n1, c, d)
        for i in range(min(n1, -(-(n - m0) // m_total))):
            s = i * m_total + m0
            block = weight[s:min(s + c, n)]
            rows[i, :len(block)] = block
        yield m0, rows.view(n1, c, d1, d // d1).permute(0, 2, 1, 3).reshape(n1 * d1, -1)


def tt_svd(weight: Rows, row_shape: list[int], dim_shape: list[int], ranks: list[int] | None,
           tol: float | None, desc: str = "TT-SVD") -> TTTable:
    """TT-SVD of ``weight`` [rows, dim] (a tensor, or rows read from a file by slices) with fixed ``ranks``
    or a relative-error ``tol``."""
    n, d = weight.shape
    K, n1, d1 = len(row_shape), row_shape[0], dim_shape[0]
    m_total, d_rest = math.prod(row_shape[1:]), d // d1
    step = max(1, GATHER_BYTES // (4 * d))
    norm_sq = float(sum(weight[s:s + step].double().pow(2).sum() for s in range(0, n, step)))
    budget_sq = (tol ** 2) * norm_sq / (K - 1) if tol is not None else 0.0
    fixed = (lambda k: ranks[k]) if ranks is not None else (lambda k: None)
    chunks = -(-m_total // max(1, GATHER_BYTES // (n1 * d * 4)))
    with progress.progress(desc, 2 * chunks) as advance:
        gram = torch.zeros(n1 * d1, n1 * d1, dtype=torch.float64)
        for _, x in _first_unfolding(weight, n1, d1, m_total):
            gram += (x @ x.T).double()
            advance(1)
        basis, vals = linalg.principal_basis(gram, n1 * d1)
        r = _pick_rank(vals.clamp(min=0), fixed(1), budget_sq)
        u = basis[:, :r].float()
        rest = torch.empty(r, m_total, d_rest)
        for m0, x in _first_unfolding(weight, n1, d1, m_total):
            rest[:, m0:m0 + x.shape[1] // d_rest] = (u.T @ x).view(r, -1, d_rest)
            advance(1)
    cores = [u.reshape(n1, d1 * r)]
    out_ranks = [1, r]
    # rest: [r, (i_2..i_K), (j_2..j_K)] -> [r, n_2, d_2, ..., n_K, d_K]
    perm = [0] + [p for k in range(1, K) for p in (k, K - 1 + k)]
    cur = rest.view(r, *row_shape[1:], *dim_shape[1:]).permute(*perm)
    del rest
    for k in range(1, K - 1):
        mat = cur.reshape(out_ranks[-1] * row_shape[k] * dim_shape[k], -1)  # the one copy of the remainder
        del cur
        U, cur = _truncate(mat, fixed(k + 1), budget_sq)
        del mat
        rk = U.shape[1]
        cores.append(U.reshape(out_ranks[-1], row_shape[k], dim_shape[k], rk)
                     .permute(1, 0, 2, 3).reshape(row_shape[k], -1).float())
        out_ranks.append(rk)
    last = cur.reshape(out_ranks[-1], row_shape[-1], dim_shape[-1]).permute(1, 0, 2).reshape(row_shape[-1], -1)
    cores.append(last.float())
    out_ranks.append(1)
    table = tt_table.TTTable(n, d, row_shape, dim_shape, out_ranks)
    for k, c in enumerate(cores):
        getattr(table, f"core{k}").data.copy_(c)
    return table


def apply(ckpt: Checkpoint, params: dict[str, Any], ctx: Context,
          rows: Callable[[str, Table], Rows] = lambda name, t: t.dense_weight()) -> Checkpoint:
    """TT-SVD of every selected table; ``rows(name, table)`` gives the trained rows (a file's, when streaming)."""
    entry: dict[str, Any] = {"method": "tt", "params": {k: v for k, v in params.items() if v is not None}, "tables": {}}
    before = val_metrics(ckpt, ctx)
    for name in ctx.select.pick(ckpt):
        t = ckpt.model.tables[name]
        try:
            row_shape, dim_shape, ranks, tol = plan(t.rows, t.dim, params)
        except NoSaving as e:
            entry["tables"][name] = {"skipped": str(e)}
            continue
        if ranks is not None and tt_bytes(row_shape, dim_shape, ranks) >= t.stored_bytes():
            entry["tables"][name] = {"skipped": f"TT with ranks {ranks} saves nothing on {t.rows} rows"}
            continue
        w = rows(name, t)
        new = tt_svd(w, row_shape, dim_shape, ranks, tol, desc=f"TT-SVD {name}")
        if new.stored_bytes() >= t.stored_bytes():
            entry["tables"][name] = {"skipped": f"TT with ranks {new.ranks} saves nothing on {t.rows} rows"}
            continue
        entry["tables"][name] = {"row_shape": row_shape, "dim_shape": dim_shape, "ranks": new.ranks,
                                 "rel_error": round(relative_error(w, new), 6),
                                 "bytes_before": t.stored_bytes(), "bytes_after": new.stored_bytes()}
        ckpt.model.tables[name] = new
    return finish(ckpt, params, ctx, entry, before)


def stream(ckpt: Checkpoint, params: dict[str, Any], ctx: Context, sources: dict[str, Rows]) -> tuple[Checkpoint, dict]:
    """:func:`apply` reading each dense table from its file (two passes); the TT tables it makes are small."""
    return apply(ckpt, params, ctx, rows=lambda name, t: sources[name] if name in sources else t.dense_weight()), {}


def fresh(name: str, rows: int, dim: int, params: dict[str, Any], seed: int, counts: Any) -> TTTable:
    row_shape, dim_shape, ranks, _ = plan(rows, dim, params)
    if ranks is None:
        raise UserError("--tol needs a trained table to measure error against", "train from scratch with --tt-rank or --ratio")
    return tt_table.TTTable(rows, dim, row_shape, dim_shape, ranks)


register(Method(
    name="tt",
    help="tensor-train table (TT-Rec): TT-SVD of the trained table; lookups compute only the rows asked for",
    params=(Param("tt_rank", int, "TT bond rank (tt)"), RATIO,
            Param("tol", float, "tt: relative reconstruction error budget that picks the ranks"),
            Param("cores", int, "tt: number of TT cores", 3), FINETUNE),
    accepts=frozenset({"dense"}),
    needs_data=lambda p: bool(p.get("finetune")),
    apply=apply,
    fresh=fresh,
    stream=stream,
))
