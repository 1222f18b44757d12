"""Sequence datasets: one item sequence per user, split leave-one-out, memory-mapped.

Readers (``--format``, detected from the first lines when not given):
- ``lines``: one user per line, ``u i1 i2 ...`` in time order (the S3-Rec 5-core files);
- ``pairs``: ``u i`` per line, a user's lines in time order (SASRec's and BERT4Rec's files);
- ``recbole``: RecBole atomic ``.inter`` files (typed header, e.g. ``user_id:token item_id:token
  timestamp:float``); each user's rows sorted by timestamp (file order breaks ties);
- ``movielens``: MovieLens ``ratings.csv`` (``userId,movieId,rating,timestamp``), sorted the same way;
- ``movielens-dat``: MovieLens 1M/10M ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``, no header), the same;
- ``gr``: generative-recommenders' ``sasrec_format.csv`` (what its DataProcessor writes and its research
  trainer reads): a header, then one user per row, ``user_id`` and comma-joined ``sequence_item_ids`` and
  ``sequence_timestamps`` (quoted), already in time order (kept as the file has it).

Users with fewer than ``min_items`` (3) interactions are dropped (and counted): leave-one-out needs a
training item, a validation item (the second to last) and a test item (the last). Item ids are remapped
to 1..N in order of first appearance (0 is padding) and the original ids are stored.

Layouts (``--layout``: whose ids, users, order and evaluation rules, so that a model trained elsewhere sees the
ids and users it was trained on) are ``recompress.data.sequence_layouts``, one module each.

On disk: ``meta.json``, ``items.npy`` (int32, every user's items back to back), ``offsets.npy`` (int64, user
start offsets), ``times.npy`` (int64 seconds, when the source has timestamps), ``item_ids.npy`` and
``user_ids.npy`` (original ids), ``catalogue.npy`` (bool per row: ranked by full ranking; when the layout
names a catalogue), ``negatives.npy`` (int32 ``[users, k]``: the sampled protocol's negatives, when the layout
draws them). Splits are views of these arrays, never copies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from recompress.errors import UserError
from recompress.outputs import check_output, output_dir
from recompress.progress import progress, say

from .arrays import load_array
from .sequence_layouts import MAX_ID, Read, check_options, get_layout
from .textfiles import open_text, read_csv
from .vocabularies import fingerprint

META = "meta.json"
FORMATS = ("lines", "pairs", "recbole", "movielens", "movielens-dat", "gr")
SPLITS = ("train", "val", "test")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open_text(path) as f:
        try:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield number, line.rstrip("\r\n")
        except UnicodeDecodeError:
            raise UserError(f"{path} is not a text file of interactions (not UTF-8)",
                            f"pass a sequence file in one of the formats {', '.join(FORMATS)}") from None


def detect_format(path: Path) -> str:
    """The format of a sequence file from its first lines."""
    first = []
    for _, line in _lines(path):
        first.append(line)
        if len(first) == 200:
            break
    if not first:
        raise UserError(f"{path} is empty", "pass a file with one interaction (or one user) per line")
    head = first[0]
    if ":token" in head or ":float" in head:
        return "recbole"
    if head.replace(" ", "").lower().startswith("userid,movieid"):
        return "movielens"
    if "sequence_item_ids" in head.split(","):
        return "gr"
    if all(len(x.split("::")) == 4 for x in first):
        return "movielens-dat"
    widths = {len(x.split()) for x in first}
    if widths == {2}:
        return "pairs"
    if min(widths) >= 2:
        return "lines"
    raise UserError(f"{path}: cannot tell the format from the first lines (line 1: {head[:60]!r})",
                    f"name it with --format ({', '.join(FORMATS)})")


def _gr_events(path: Path) -> tuple[list[str], list[list[str]], list[list[float]] | None, list[str]]:
    """:func:`_events` of a generative-recommenders ``sasrec_format.csv``: each row's lists as the file orders
    them (its DataProcessor sorted them by time; its DatasetV2 reads them as they are)."""
    return read_csv(path, lambda rows: _gr_rows(rows, str(path)), "pass generative-recommenders' sasrec_format.csv")


def _gr_rows(rows: Any, where: str) -> tuple[list[str], list[list[str]], list[list[float]] | None, list[str]]:
    """The rows of a ``csv.reader`` over a ``sasrec_format.csv`` (see :func:`_gr_events`)."""
    header = next(rows, None)
    if header is None:
        raise UserError(f"{where} is empty", "pass generative-recommenders' sasrec_format.csv")
    want = ("user_id", "sequence_item_ids", "sequence_timestamps")
    missing = [w for w in want if w not in header]
    if missing:
        raise UserError(f"{where} line 1: header has no {', '.join(missing)} column",
                        "a generative-recommenders sequence file starts with a header naming " + ", ".join(want))
    at = [header.index(w) for w in want]
    users, items, times = [], [], []
    seen: set[str] = set()
    for row in rows:
        number = rows.line_num
        if not row:
            continue
        if len(row) < len(header):
            raise UserError(f"{where} line {number}: {len(row)} fields, the header has {len(header)}",
                            "every row needs a value for every header column")
        user, ids, ts = (row[i].strip() for i in at)
        its = [x.strip() for x in ids.split(",")]
        try:
            tss = [float(x) for x in ts.split(",")]
            if not all(0 <= t < 2**62 for t in tss):
                raise ValueError
        except ValueError:
            raise UserError(f"{where} line {number}: a timestamp of user {user} is not a number of seconds",
                            "timestamps are seconds since the epoch") from None
        if not user or not all(its):
            raise UserError(f"{where} line {number}: empty user or item id", "every row names a user and its items")
        if len(its) != len(tss):
            raise UserError(f"{where} line {number}: user {user} has {len(its)} items and {len(tss)} timestamps",
                            "sequence_item_ids and sequence_timestamps list one entry per interaction")
        if user in seen:
            raise UserError(f"{where} line {number}: user {user} has a second row", "one row per user")
        seen.add(user)
        users.append(user)
        items.append(its)
        times.append(tss)
    if not users:
        raise UserError(f"{where} has a header and no user", "pass the whole sasrec_format.csv")
    return users, items, times, list(dict.fromkeys(it for s in items for it in s))


def _events(path: Path, fmt: str, sort: str = "time", min_rows: int = 0
            ) -> tuple[list[str], list[list[str]], list[list[float]] | None, list[str]]:
    """(users in order of first appearance, their item lists, their timestamps or None, every item in order of
    first appearance in the file's rows of users with ``min_rows`` or more), each user's sorted by ``sort``: ``time``
    (ties in file order); ``recbole``: by the timestamp min-max scaled and stored in float32, as RecBole sorts
    (which ties some distinct seconds); ``quicksort``: as NumPy's quicksort of each user's timestamps in file
    order puts them (pandas' ``sort_values``)."""
    if fmt == "gr":
        return _gr_events(path)
    seqs: dict[str, list[tuple[float, int, str]]] = {}
    has_time = fmt in ("recbole", "movielens", "movielens-dat")
    where = str(path)
    lines = _lines(path)
    cols: dict[str, int] = {}
    if fmt in ("recbole", "movielens"):
        try:
            number, header = next(lines)
        except StopIteration:
            raise UserError(f"{path} is empty", "pass an interaction file") from None
        sep = "\t" if fmt == "recbole" else ","
        names = [c.split(":")[0].strip() for c in header.split(sep)]
        want = ("user_id", "item_id", "timestamp") if fmt == "recbole" else ("userId", "movieId", "timestamp")
        missing = [w for w in want[:2] if w not in names]
        if missing:
            raise UserError(f"{where} line {number}: header {header[:80]!r} has no {', '.join(missing)} column",
                            f"a {fmt} file starts with a header naming {', '.join(want)}")
        cols = {k: names.index(w) for k, w in zip(("user", "item", "time"), want) if w in names}
        has_time = "time" in cols
    elif fmt == "movielens-dat":  # no header
        names, cols = ["UserID", "MovieID", "Rating", "Timestamp"], {"user": 0, "item": 1, "time": 3}
    order = 0
    for number, line in lines:
        if fmt == "lines":
            tok = line.split()
            if len(tok) < 2:
                raise UserError(f"{where} line {number}: {len(tok)} field(s), expected a user and at least one item",
                                "each line is 'user item1 item2 ...'")
            seqs.setdefault(tok[0], []).extend((order + k, 0, it) for k, it in enumerate(tok[1:]))
            order += len(tok)
            continue
        if fmt == "pairs":
            tok = line.split()
            if len(tok) != 2:
                raise UserError(f"{where} line {number}: {len(tok)} fields, expected 'user item'",
                                "each line is one interaction: 'user item'")
            user, item, t = tok[0], tok[1], float(order)
        else:
            tok = line.split({"recbole": "\t", "movielens-dat": "::"}.get(fmt, ","))
            if len(tok) < len(names):
                raise UserError(f"{where} line {number}: {len(tok)} fields, the header has {len(names)}"
                                if fmt != "movielens-dat" else f"{where} line {number}: {len(tok)} fields, expected "
                                "UserID::MovieID::Rating::Timestamp", "every row needs a value for every column")
            user, item = tok[cols["user"]].strip(), tok[cols["item"]].strip()
            try:
                t = float(tok[cols["time"]]) if has_time else float(order)
            except ValueError:
                raise UserError(f"{where} line {number}: timestamp {tok[cols['time']]!r} is not a number",
                                "timestamps are seconds since the epoch") from None
        if not user or not item:
            raise UserError(f"{where} line {number}: empty user or item id", "every interaction names a user and an item")
        seqs.setdefault(user, []).append((t, order, item))
        order += 1
    users = list(seqs)
    key = (lambda e: e[:2]) if sort != "recbole" else _recbole_key([e[0] for ev in seqs.values() for e in ev])
    items, times = [], []
    for u in users:
        ev = _quicksorted(seqs[u]) if sort == "quicksort" and has_time else sorted(seqs[u], key=key) if has_time \
            else seqs[u]
        items.append([e[2] for e in ev])
        times.append([e[0] for e in ev])
    rows = sorted((e for ev in seqs.values() if len(ev) >= min_rows for e in ev), key=lambda e: e[1])
    first_seen = list(dict.fromkeys(e[2] for e in rows))
    return users, items, times if has_time else None, first_seen


def _quicksorted(events: list[tuple[float, int, str]]) -> list[tuple[float, int, str]]:
    """``events`` (file order) by NumPy's quicksort of their timestamps (as integers where they all are)."""
    times = np.asarray([e[0] for e in events])
    if np.all(times == np.round(times)) and np.abs(times).max(initial=0) < 2**62:
        times = times.astype(np.int64)
    return [events[i] for i in np.argsort(times, kind="quicksort")]


def _recbole_key(times: list[float]) -> Any:
    """Sort key of an event (t, order, item): RecBole's float32 of (t - min) / (max - min), then file order."""
    lo, hi = min(times), max(times)
    span = hi - lo if hi > lo else 1.0
    return lambda e: (float(np.float32((e[0] - lo) / span)), e[1])


def prepare_sequences(source: str | Path, out: str | Path, *, fmt: str | None = None, max_len: int | None = None,
                      min_items: int | None = None, layout: str = "recompress", **options: Any) -> Path:
    """Read a sequence file into a prepared, leave-one-out sequence dataset folder ``out`` (``layout``: whose
    ids, users and evaluation rules, see ``recompress.data.sequence_layouts``; ``options``: the layout's own,
    e.g. ``items`` for ``gr``, ``seed`` for ``torchrec``; ``overwrite``)."""
    overwrite = bool(options.pop("overwrite", False))
    lay = get_layout(layout)
    check_options(lay, options)
    if max_len is not None and not lay.cuts:
        raise UserError(f"--max-len cuts each user's sequence, which --layout {lay.name} does not (its candidates "
                        "would differ)", f"leave --max-len out with --layout {lay.name}")
    min_items = min_items if min_items is not None else lay.min_items
    if min_items < 3:
        raise UserError(f"--min-items {min_items} leaves users without a training, validation and test item",
                        "pass --min-items 3 or more")
    source = Path(source)
    if not source.is_file():
        raise UserError(f"{source} does not exist or is not a file", "pass a sequence file (see --format)")
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"unknown sequence format {fmt!r}", f"choose from {', '.join(FORMATS)}")
    if max_len is not None and max_len < 1:
        raise UserError(f"--max-len {max_len} is impossible", "keep at least 1 interaction per user (3 for a split)")
    if max_len is not None and max_len < min_items:
        raise UserError(f"--max-len {max_len} leaves no user with the {min_items} items leave-one-out needs",
                        f"pass --max-len {min_items} or more")
    parsed = lay.parse(**options)
    check_output(out, overwrite=overwrite, inputs=[source, *lay.inputs(parsed)])
    fmt = fmt or detect_format(source)
    if lay.formats is not None and fmt not in lay.formats:
        raise UserError(f"{source} is a {fmt} file and --layout {lay.name} reads {' or '.join(lay.formats)} files",
                        "pass such a file, or use another --layout")
    say(f"reading {source} as {fmt}")
    read = Read(source, fmt, *_events(source, fmt, sort=lay.order, min_rows=min_items if lay.first_seen_of_kept else 0))
    plan = lay.plan(read, min_items=min_items, **parsed)
    meta = {"source": str(source.resolve()), "format": fmt, "synthetic": False, "layout": lay.name, **plan.meta}
    write_sequences(out, plan.users, plan.item_lists, plan.time_lists, overwrite=overwrite, inputs=[source], meta=meta,
                    max_len=max_len, min_items=min_items, keep_ids=plan.keep_ids, where=str(source),
                    item_order=plan.item_order, catalogue=plan.catalogue, negatives=plan.negatives)
    return Path(out)


def write_sequences(out: str | Path, users: list[Any], item_lists: list[list[Any]], time_lists: list[list[float]] | None,
                    *, meta: dict[str, Any], max_len: int | None = None, min_items: int = 3, overwrite: bool = False,
                    inputs: tuple = (), keep_ids: bool = False, where: str = "the source",
                    item_order: list[Any] | None = None, catalogue: list[int] | None = None,
                    negatives: np.ndarray | None = None) -> Path:
    """Remap ids (by first appearance in the kept users' sequences, or in ``item_order``; or, ``keep_ids``,
    use the source's positive integer ids as rows, up to the largest of the file and ``catalogue``), drop short
    users, and write the dataset folder (used by the readers and the generator); ``catalogue``: the ids full
    ranking ranks (``keep_ids`` only); ``negatives``: the sampled protocol's negatives of each user (its rows:
    the users, none of whom may be dropped)."""
    if keep_ids:
        try:
            item_lists = [[int(it) for it in s] for s in item_lists]
        except ValueError:
            raise UserError(f"{where}: item ids are not all integers, so they cannot be kept as rows",
                            "use --layout recompress, which numbers items itself") from None
        if min(min(s) for s in item_lists) < 1:
            raise UserError(f"{where}: an item id is below 1 (0 is padding in SASRec.pytorch)",
                            "use --layout recompress, which numbers items itself")
        top = max(max(max(s) for s in item_lists), max(catalogue, default=0) if catalogue is not None else 0)
        distinct = len({it for s in item_lists for it in s})
        if top > MAX_ID or (top > 10_000_000 and top > 100 * distinct):
            raise UserError(f"{where}: item ids reach {top:,} for {distinct:,} distinct items, so kept as rows the "
                            "table would be almost all empty rows", "use --layout recompress, which numbers items itself")
    if max_len is not None:
        item_lists = [s[-max_len:] for s in item_lists]
        time_lists = [t[-max_len:] for t in time_lists] if time_lists is not None else None
    keep = [i for i, s in enumerate(item_lists) if len(s) >= min_items]
    dropped = len(item_lists) - len(keep)
    if not keep:
        raise UserError(f"no user has the {min_items} interactions leave-one-out needs ({dropped} users dropped)",
                        "pass a longer history per user")
    item_index: dict[Any, int] = {}
    if item_order is not None:  # the order of rows (recbole: every item of the file, the dropped users' too)
        item_index = {it: i + 1 for i, it in enumerate(item_order)}
        flat = [item_index[it] for i in keep for it in item_lists[i]]
    elif keep_ids:  # row = id; every id up to the largest in the whole file (and the catalogue) has a row
        item_index = {i: i for i in range(1, top + 1)}
        flat = [it for i in keep for it in item_lists[i]]
    else:
        with progress("remapping ids", len(keep)) as advance:
            flat = []
            for i in keep:
                for it in item_lists[i]:
                    flat.append(item_index.setdefault(it, len(item_index) + 1))
                advance(1)
    lengths = np.array([len(item_lists[i]) for i in keep], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = np.asarray(flat, dtype=np.int32)
    body = {**meta, "kind": "sequences", "num_users": len(keep), "num_items": len(item_index),
            "interactions": int(len(items)), "dropped_users": dropped, "min_items": min_items, "max_len": max_len,
            "has_times": time_lists is not None, "split": "leave-one-out (test: last item, val: second to last)",
            "vocabularies": {"item": fingerprint(np.asarray([str(k) for k in item_index]))}}
    ranked = None
    if catalogue is not None:
        ranked = np.zeros(len(item_index) + 1, dtype=bool)
        ranked[np.asarray(catalogue, dtype=np.int64)] = True
    h = hashlib.sha256(json.dumps(body, sort_keys=True).encode())
    h.update(items.tobytes())
    h.update(offsets.tobytes())
    if ranked is not None:
        h.update(ranked.tobytes())
    if negatives is not None:
        assert len(negatives) == len(keep) == len(item_lists), "negatives are drawn for the kept users only"
        h.update(negatives.tobytes())
    body["fingerprint"] = h.hexdigest()[:16]
    with output_dir(out, kind="dataset", overwrite=overwrite, inputs=inputs) as tmp:
        np.save(tmp / "items.npy", items)
        np.save(tmp / "offsets.npy", offsets)
        if time_lists is not None:
            np.save(tmp / "times.npy", np.asarray([t for i in keep for t in time_lists[i]], dtype=np.int64))
        np.save(tmp / "item_ids.npy", np.asarray([""] + [str(k) for k in item_index]))
        np.save(tmp / "user_ids.npy", np.asarray([str(users[i]) for i in keep]))
        if ranked is not None:
            np.save(tmp / "catalogue.npy", ranked)
        if negatives is not None:
            np.save(tmp / "negatives.npy", negatives)
        (tmp / META).write_text(json.dumps(body, indent=2) + "\n")
    say(f"{len(keep):,} users, {len(item_index):,} items, {len(items):,} interactions"
        + (f"; dropped {dropped:,} users with fewer than {min_items} interactions" if dropped else "") + f" -> {out}")
    return Path(out)


class SequenceDataset:
    """Read-only view of a prepared sequence dataset folder (leave-one-out splits)."""

    kind = "sequences"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.meta: dict[str, Any] = json.loads((path / META).read_text())
        self.num_items: int = int(self.meta["num_items"])
        self.num_users: int = int(self.meta["num_users"])
        self.items = load_array(path / "items.npy")
        self.offsets = load_array(path / "offsets.npy", mmap=False)
        self.times = load_array(path / "times.npy") if self.meta.get("has_times") else None
        ranked = path / "catalogue.npy"
        self.catalogue: np.ndarray | None = load_array(ranked, mmap=False) if ranked.exists() else None  # full ranking
        drawn = path / "negatives.npy"
        self.negatives: np.ndarray | None = load_array(drawn) if drawn.exists() else None  # the sampled protocol's
        if self.negatives is not None and (self.negatives.ndim != 2 or self.negatives.shape[0] != self.num_users
                                           or self.negatives.shape[1] < 1 or self.negatives.dtype.kind not in "iu"):
            raise UserError(f"{drawn} holds {self.negatives.dtype} {list(self.negatives.shape)}, not the negatives of "
                            f"{self.num_users} users (integer ids, one row each)", "the dataset was damaged or edited "
                            "after it was prepared: prepare it again")

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def size(self, split: str) -> int:
        return self.num_users

    def history_end(self, split: str) -> np.ndarray:
        """Per user, where the history of ``split`` ends (exclusive): its target is the item there.

        ``train``: the history is everything before the validation item (training targets are its own
        items from the second on); ``val``: the same history, target the second to last item; ``test``:
        everything but the last item, target the last.
        """
        ends = self.offsets[1:]
        return {"train": ends - 2, "val": ends - 2, "test": ends - 1}[split]

    def windows(self, users: np.ndarray, ends: np.ndarray, length: int, source: np.ndarray | None = None) -> np.ndarray:
        """``[len(users), length]``: each user's last ``length`` entries before ``ends``, left-padded with 0."""
        src = self.items if source is None else source
        starts = np.maximum(self.offsets[users], ends - length)
        out = np.zeros((len(users), length), dtype=np.int64)
        for r, (s, e) in enumerate(zip(starts, ends)):
            if e > s:
                out[r, length - (e - s):] = src[s:e]
        if source is None:
            self.check_items(out, padding=True)
        return out

    def check_items(self, ids: np.ndarray, padding: bool = False) -> None:
        """Refuse item ids outside 1..num_items (0 too, unless ``ids`` are padded windows): a dataset damaged or
        edited after it was prepared."""
        bad = (ids < (0 if padding else 1)) | (ids > self.num_items)
        if bad.any():
            raise UserError(f"{self.path / 'items.npy'}: item {int(ids[bad][0])} is outside the catalogue's "
                            f"{self.num_items} items", "the dataset was damaged or edited after it was prepared: "
                            "prepare it again")

    def id_counts(self, split: str = "train") -> np.ndarray:
        """How often each item id (0..N) occurs in the training part of every sequence."""
        train = np.ones(len(self.items), dtype=bool)
        train[self.offsets[1:] - 1] = False
        train[self.offsets[1:] - 2] = False
        items = np.asarray(self.items)[train]
        self.check_items(items)
        return np.bincount(items, minlength=self.num_items + 1)
