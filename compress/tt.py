"""``tt``: tensor-train tables (TT-Rec). Post-training by streaming TT-SVD, optional fine-tune, or from scratch.

TT-SVD (Oseledets 2011) from Gram matrices accumulated over column chunks gathered straight from the table,
so a 10M-row table is never copied or permuted whole. With 3 cores (the default) the second unfolding's Gram
is accumulated the same way, from the first core's projection of each chunk, in a second pass, and the
second core written in a third: nothing of the remainder's size is held. What still grows is rows^(2/3): the
two Gram matrices ((n_1 d_1)^2 and (n_3 d_3)^2 float64 values) and the chunks, which hold at least n_1 n_3
rows (244 MB each for a 1B x 64 table).
With more cores the remainder after the first core is held and its unfoldings truncated in memory.
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


def _factor(gram: torch.Tensor, fixed: int | None, budget_sq: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the float64 Gram ``M^T M`` of a matrix's columns: (top right singular vectors ``V_r``, ``1/s``
    (0 for a zero singular value), ``s``) at the rank :func:`_pick_rank` picks, so ``M ~= (M V_r / s) (s V_r^T)``."""
    basis, vals = linalg.principal_basis(gram, gram.shape[0])
    r = _pick_rank(vals.clamp(min=0), fixed, budget_sq)
    sv = vals[:r].clamp(min=0).sqrt()
    live = sv > sv[0] * 1e-12 if r and sv[0] > 0 else torch.zeros(r, dtype=torch.bool)
    scale = torch.where(live, 1 / torch.where(live, sv, 1), 0)  # a zero singular value: its column stays zero
    return basis[:, :r], scale, sv * live


def _truncate(mat: torch.Tensor, fixed: int | None, budget_sq: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-truncated ``mat ~= U @ R`` (``U`` orthonormal columns, ``R = S Vh``), as an SVD would give, from
    the float64 Gram matrix of ``mat``'s smaller side accumulated in blocks: no copy of ``mat`` is made."""
    m, n = mat.shape
    step = max(1, GATHER_BYTES // (8 * max(m, n)))
    if n > m:  # basis spans mat's columns: U = basis, R = U^T mat
        g = torch.zeros(m, m, dtype=torch.float64)
        for s in range(0, n, step):
            blk = mat[:, s:s + step].double()
            g += blk @ blk.T
        basis, vals = linalg.principal_basis(g, m)
        basis = basis[:, :_pick_rank(vals, fixed, budget_sq)]
        return basis, torch.cat([basis.T @ mat[:, s:s + step].double() for s in range(0, n, step)], 1)
    g = torch.zeros(n, n, dtype=torch.float64)
    for s in range(0, m, step):
        blk = mat[s:s + step].double()
        g += blk.T @ blk
    basis, scale, sv = _factor(g, fixed, budget_sq)
    u = torch.cat([(mat[s:s + step].double() @ basis) * scale for s in range(0, m, step)])
    return u, sv[:, None] * basis.T


def _chunk(n1: int, d: int, align: int) -> int:
    """Rows per chunk of :func:`_first_unfolding`: about GATHER_BYTES, a multiple of ``align``."""
    return max(1, GATHER_BYTES // (n1 * d * 4) // align) * align


def _first_unfolding(weight: Rows, n1: int, d1: int, m_total: int, align: int = 1) -> Any:
    """Column chunks ``[n1*d1, c*(d/d1)]`` of the first TT unfolding of the (unpadded) table: each chunk is
    ``n1`` contiguous row ranges ``i * m_total + [m0, m0 + c)`` (``m0`` and ``c`` multiples of ``align``), zero
    past the last row."""
    n, d = weight.shape
    chunk = _chunk(n1, d, align)
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
    or a relative-error ``tol``. With 3 cores every pass streams the table (memory grows as rows^(2/3), see
    the module docstring); with more, the remainder after the first core (``r_1 * rows / n_1 * dim / d_1``
    values) is held."""
    n, d = weight.shape
    K, n1, d1 = len(row_shape), row_shape[0], dim_shape[0]
    m_total, d_rest = math.prod(row_shape[1:]), d // d1
    step = max(1, GATHER_BYTES // (4 * d))
    norm_sq = float(sum(weight[s:s + step].double().pow(2).sum() for s in range(0, n, step)))
    budget_sq = (tol ** 2) * norm_sq / (K - 1) if tol is not None else 0.0
    fixed = (lambda k: ranks[k]) if ranks is not None else (lambda k: None)
    align = row_shape[-1] if K == 3 else 1
    chunks = -(-m_total // _chunk(n1, d, align))
    table = lambda rank: tt_table.TTTable(n, d, row_shape, dim_shape, rank)
    with progress.progress(desc, (3 if K == 3 else 2) * chunks) as advance:
        gram = torch.zeros(n1 * d1, n1 * d1, dtype=torch.float64)
        for _, x in _first_unfolding(weight, n1, d1, m_total, align):
            gram += (x @ x.T).double()
            advance(1)
        basis, vals = linalg.principal_basis(gram, n1 * d1)
        r = _pick_rank(vals.clamp(min=0), fixed(1), budget_sq)
        u = basis[:, :r].float()
        first = u.reshape(n1, d1 * r)
        if K == 3:
            return _last_two(weight, u, table, first, row_shape, dim_shape, fixed(2), budget_sq, advance)
        rest = torch.empty(r, m_total, d_rest)
        for m0, x in _first_unfolding(weight, n1, d1, m_total):
            rest[:, m0:m0 + x.shape[1] // d_rest] = (u.T @ x).view(r, -1, d_rest)
            advance(1)
    cores = [first]
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
    cores.append(_last_core(cur, row_shape[-1], dim_shape[-1]))
    return _filled(table([*out_ranks, 1]), cores)


def _last_core(mat: torch.Tensor, nk: int, dk: int) -> torch.Tensor:
    """The last TT core ``[n_K, r * d_K]`` from the remainder ``[r, n_K * d_K]``."""
    return mat.reshape(-1, nk, dk).permute(1, 0, 2).reshape(nk, -1).float()


def _filled(table: TTTable, cores: list[torch.Tensor]) -> TTTable:
    for k, c in enumerate(cores):
        getattr(table, f"core{k}").data.copy_(c)
    return table


def _last_two(weight: Rows, u: torch.Tensor, table: Callable[[list[int]], TTTable], first: torch.Tensor,
              row_shape: list[int], dim_shape: list[int], fixed: int | None, budget_sq: float,
              advance: Callable[[int], None]) -> TTTable:
    """The second and third cores of a 3-core TT-SVD in two more passes over the table, holding the
    ``(n_3 d_3)``-square Gram matrix, the cores and one chunk. The remainder ``R = U_1^T A_1`` is recomputed chunk by
    chunk; each chunk covers whole ``i_2`` slices, so its rows of the second unfolding ``[r_1 n_2 d_2, n_3 d_3]``
    are complete: the Gram of the columns adds up over chunks, and the second core's rows are written per chunk."""
    (n1, n2, n3), (d1, d2, d3) = row_shape, dim_shape
    r1 = u.shape[1]

    def rows_of_second_unfolding() -> Any:  # (i_2 range, [r_1, len, d_2, n_3 d_3] float64) per chunk
        for m0, x in _first_unfolding(weight, n1, d1, n2 * n3, align=n3):
            y = (u.T @ x).view(r1, -1, n3, d2, d3).permute(0, 1, 3, 2, 4).double()
            yield slice(m0 // n3, m0 // n3 + y.shape[1]), y.reshape(r1, y.shape[1], d2, n3 * d3)
            advance(1)

    gram = torch.zeros(n3 * d3, n3 * d3, dtype=torch.float64)
    for _, y in rows_of_second_unfolding():
        flat = y.reshape(-1, n3 * d3)
        gram += flat.T @ flat
    basis, scale, sv = _factor(gram, fixed, budget_sq)
    second = torch.empty(r1, n2, d2, basis.shape[1], dtype=torch.float64)
    for i2, y in rows_of_second_unfolding():
        second[:, i2] = (y @ basis) * scale
    last = _last_core(sv[:, None] * basis.T, n3, d3)
    r2 = basis.shape[1]
    return _filled(table([1, r1, r2, 1]), [first, second.permute(1, 0, 2, 3).reshape(n2, -1).float(), last])


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
