"""``torchrec``: TorchRec's BERT4Rec example (``Bert4RecPreprocsser`` on a MovieLens ``ratings.csv`` or ML-1M's
``ratings.dat``): users with 5+ ratings; users and items numbered in the iteration order of a Python set of their
integer ids (item ids from 1), as its ``_densify_index`` numbers them; each user's ratings in the order NumPy's
quicksort of their timestamps puts them (pandas' ``sort_values``; ties are not in file order); and its evaluation
candidates stored (``negatives.npy``): per user, 100 items drawn by popularity (counts over every split) in
blocks of 200 without replacement, less those the user has had, from NumPy's legacy generator seeded with
``seed``, users in order: the example's own draws when its run was seeded with the same seed (it does not seed;
unseeded, the candidates differ and so do the metrics, by sampling noise). The same candidates serve validation
and test, and ``sampled`` is the dataset's default protocol.

Equal timestamps are ordered as this machine's NumPy quicksort orders them, which depends on the NumPy build and
the CPU's SIMD features (``meta.json``'s ``order_by`` records them): on another build, a user's tied ratings, and
so the pool's order and every draw, may differ from the example's run. Only the example's default filters are
reproduced (``--min_rating 0``, ``--min_item_count 0``; ``--min_user_count`` is ``--min-items``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from recompress.errors import UserError

from . import Layout, Plan, Read

if TYPE_CHECKING:
    import numpy as np

NEGATIVES = 100  # the example's test_set_sample_size


class TorchRecBERT4Rec(Layout):
    name = "torchrec"
    help = ("TorchRec's BERT4Rec example on a MovieLens ratings file: users with 5+ ratings, its id numbering and "
            "time order, and its 100 popularity-sampled negatives per user, drawn with --seed")
    min_items = 5
    order = "quicksort"
    formats = ("movielens", "movielens-dat")
    options = ("seed",)
    cuts = False
    first_seen_of_kept = True

    def parse(self, seed: int | None = None, **options: Any) -> dict[str, Any]:
        if seed is not None and not 0 <= seed < 2**32:
            raise UserError(f"--seed {seed} is not a seed of NumPy's legacy generator", "pass 0 to 4294967295")
        return {"seed": seed, **options}

    def plan(self, read: Read, *, min_items: int, seed: int | None = None, **options: Any) -> Plan:
        if not any(len(s) >= min_items for s in read.item_lists):
            raise UserError(f"no user of {read.source} has the {min_items} ratings the example keeps a user for",
                            "pass a smaller --min-items (the example's --min_user_count)")
        users, item_lists, order, first_seen = _torchrec_order(read.users, read.item_lists, read.first_seen,
                                                               min_items, str(read.source))
        times = [read.time_lists[i] for i in order] if read.time_lists is not None else None
        row = {it: i + 1 for i, it in enumerate(first_seen)}
        negatives = popularity_negatives(users, [[row[it] for it in s] for s in item_lists], NEGATIVES, seed or 0)
        meta = {"sampled_negatives": "stored", "negatives_seed": seed or 0, "protocol": "sampled",
                "order_by": sort_build()}
        return Plan(users, item_lists, times, meta=meta, item_order=first_seen, negatives=negatives)


def sort_build() -> str:
    """The NumPy build and CPU features its quicksort ran with: equal timestamps may come out in another order
    on another build or CPU (its SIMD sorts differ), so the time order, and the draws that follow it, are those
    of a machine like this one."""
    import numpy as np
    from numpy._core._multiarray_umath import __cpu_features__ as features
    simd = [f for f in ("AVX2", "AVX512F", "AVX512_SKX", "AVX512_ICL", "AVX512_SPR", "ASIMD", "SVE") if features.get(f)]
    return f"numpy {np.__version__} quicksort, {'/'.join(simd) or 'no SIMD'}"


def _torchrec_order(users: list[str], item_lists: list[list[str]], first_seen: list[str], min_items: int, where: str
                    ) -> tuple[list[str], list[list[str]], list[int], list[str]]:
    """TorchRec's example numbering: the users it keeps (``min_items`` ratings) in the iteration order of a set of
    their integer ids, and their items (``first_seen``: in order of first appearance in the kept users' rows) in
    the same order of the items', each set filled in file order as pandas' ``set(df[column])`` fills it (filling
    it again with an id it holds changes nothing, so the order of first appearance is the file's order)."""
    def canonical(x: str) -> int:
        value = int(x)  # ValueError for text
        if str(value) != x:  # '07' and '7' are one id to pandas' integer column, two here
            raise UserError(f"{where}: id {x!r} is not written as the integer pandas reads ({value}), so the example "
                            "would merge ids this reader keeps apart", "write the ids without leading zeros or signs, "
                            "or use --layout recompress")
        return value

    try:
        as_int = {u: canonical(u) for u in users}
        for s in item_lists:
            for it in s:
                canonical(it)
    except ValueError:
        raise UserError(f"{where}: ids are not all integers; TorchRec's example numbers them by the order of a set "
                        "of its ids, which for strings changes with every Python process",
                        "use --layout recompress") from None
    kept = [i for i, s in enumerate(item_lists) if len(s) >= min_items]
    position = {as_int[users[i]]: i for i in kept}
    order = [position[u] for u in set(as_int[users[i]] for i in kept)]  # noqa: C401 (a set's order is the point)
    items = [str(it) for it in set(int(it) for it in first_seen)]  # noqa: C401
    return [users[i] for i in order], [item_lists[i] for i in order], order, items


def popularity_negatives(users: list[str], item_lists: list[list[int]], count: int, seed: int) -> np.ndarray:
    """``[users, count]``: TorchRec's example's evaluation negatives (``_generate_negative_samples``) for users whose
    whole sequences (train, val, test, in order) are ``item_lists``: items weighted by how often they occur, drawn
    by NumPy's legacy generator in blocks of ``2 * count`` without replacement, less those the user has had, until
    there are ``count`` (a later block may repeat an item of an earlier one, as the example's do)."""
    import numpy as np

    from recompress.progress import progress

    freq: dict[int, int] = {}
    for s in item_lists:
        for it in s:
            freq[it] = freq.get(it, 0) + 1
    pool = list(freq)
    total = sum(freq.values())
    p = [float(freq[it]) / total for it in pool]
    if len(pool) < 2 * count:
        raise UserError(f"the file has {len(pool)} items: TorchRec's example draws {2 * count} at a time without "
                        "replacement, and fails on it too", "use --layout recompress")
    rng = np.random.RandomState(seed)
    out = np.zeros((len(item_lists), count), dtype=np.int32)
    with progress("drawing the example's evaluation negatives", len(item_lists)) as advance:
        for r, s in enumerate(item_lists):
            seen, drawn = set(s), []
            if len(seen) >= len(pool):
                raise UserError(f"user {users[r]} has had every one of the {len(pool)} items, so no negative can be "
                                "drawn (TorchRec's example loops forever on it)", "leave that user out of the file")
            while len(drawn) < count:
                drawn.extend(int(x) for x in rng.choice(pool, 2 * count, replace=False, p=p) if x not in seen)
            out[r] = drawn[:count]
            advance(1)
    return out


LAYOUT = TorchRecBERT4Rec()
