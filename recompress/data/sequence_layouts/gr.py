"""``gr``: generative-recommenders' research DatasetV2 and eval: the file's own ids (item N is row N; a file with
id 0, amzn-books' 0-based codes, is shifted by one, as its ``shift_id_by=1``), users in file order, and full
ranking as its ``eval_metrics_v2_from_tensors`` ranks: every item of the catalogue (``items``: e.g. its
processed ``movies.csv``, rated or not, or a count N for ids 1..N as it ranks amzn-books; default every item of
the file) except the ids in the model's history window (the last ``max_len`` items), which it filters from its
top k."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recompress.errors import UserError

from ..textfiles import read_csv
from . import MAX_ID, Layout, Plan, Read

CATALOGUE_COLUMNS = ("movie_id", "movieId", "item_id")


class GenerativeRecommenders(Layout):
    name = "gr"
    help = ("generative-recommenders' research trainer: the file's own ids, full ranking over the catalogue less "
            "the history window's items")
    options = ("items",)

    def parse(self, items: str | Path | None = None, **options: Any) -> dict[str, Any]:
        counted = items is not None and str(items).isdigit()  # --items N: ids 1..N, not a file
        return {"items": items, "counted": counted,
                "catalogue": _catalogue(str(items)) if items is not None else None}

    def inputs(self, options: dict[str, Any]) -> list[Path]:
        return [Path(options["items"])] if options["items"] is not None and not options["counted"] else []

    def plan(self, read: Read, *, min_items: int, items: Any = None, counted: bool = False,
             catalogue: list[int] | None = None, **options: Any) -> Plan:
        item_lists = read.item_lists
        meta: dict[str, Any] = {"full_ranking_excludes": "window",
                                "catalogue": ("the items of the file" if items is None else f"ids 1..{items}"
                                              if counted else str(Path(items).resolve()))}
        if any(it == "0" for s in item_lists for it in s):  # 0-based ids: amzn-books' DatasetV2(shift_id_by=1)
            item_lists = [[str(int(it) + 1) if it.isdigit() else it for it in s] for s in item_lists]
            if catalogue is not None and not counted:  # a list is in the file's numbering; a count is not
                catalogue = [i + 1 for i in catalogue]
            meta["id_shift"] = 1
        elif catalogue and catalogue[0] == 0:
            raise UserError(f"--items {items} lists item id 0, which the file does not use",
                            "pass the catalogue in the file's numbering")
        if catalogue is None:
            catalogue = sorted({int(it) for s in item_lists for it in s if it.isdigit()})
        return Plan(read.users, item_lists, read.time_lists, meta=meta, keep_ids=True, catalogue=catalogue)


def _catalogue(items: str) -> list[int]:
    """The item ids of ``--items``: a count N (ids 1..N, as generative-recommenders ranks amzn-books), or a
    catalogue CSV's ``movie_id``, ``movieId`` or ``item_id`` column (e.g. the ``movies.csv`` that its
    DataProcessor writes, or GroupLens's own), in the sequence file's numbering."""
    if items.isdigit():
        if not 1 <= int(items) <= MAX_ID:
            raise UserError(f"--items {items} is not a number of items", f"pass 1 to {MAX_ID:,}, or a catalogue CSV")
        return list(range(1, int(items) + 1))
    path = Path(items)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file",
                        "pass the catalogue CSV (e.g. movies.csv), or the number of items, to --items")
    ids = read_csv(path, lambda rows: _catalogue_ids(rows, path), "pass the catalogue CSV (e.g. movies.csv)")
    bad = next((x for x in ids if not x.isdigit() or int(x) > MAX_ID), None)
    if bad is not None or not ids:
        raise UserError(f"{path}: item id {bad!r} is not an integer from 0 to {MAX_ID:,}" if ids else f"{path} lists no item",
                        "the catalogue lists the integer ids that the sequence file uses")
    return sorted({int(x) for x in ids})


def _catalogue_ids(rows: Any, path: Path) -> list[str]:
    """The id column of a catalogue CSV's rows (a ``csv.reader``)."""
    header = next(rows, [])
    column = next((header.index(c) for c in CATALOGUE_COLUMNS if c in header), None)
    if column is None:
        raise UserError(f"{path} line 1: header has none of the columns {', '.join(CATALOGUE_COLUMNS)}",
                        "pass a CSV whose header names the item id column (e.g. movies.csv)")
    ids = []
    for row in rows:
        if row and len(row) <= column:
            raise UserError(f"{path} line {rows.line_num}: {len(row)} fields, no item id",
                            "every row needs a value for every header column")
        if row:
            ids.append(row[column].strip())
    return ids


LAYOUT = GenerativeRecommenders()
