"""Criteo Kaggle data as facebookresearch/dlrm's own processing makes it (``--layout dlrm``), so that a model
dlrm trained sees the ids it was trained on and is scored on the rows it printed its test AUC on.

dlrm's rules (``data_utils.py`` ``getCriteoAdData`` and ``dlrm_data_pytorch.py`` ``CriteoDataset``, read at
facebookresearch/dlrm@090956e): the file's N lines are cut into 7 "days" of ``N // 7`` lines in file order,
the first ``N % 7`` days one line longer; train is days 0-5, and day 6 is halved: its first half (the
larger when odd) is the test split dlrm evaluates and prints, the second half validation. An empty field
is "0": a missing dense value is 0, a missing categorical value is the hash 0, an ordinary category.
Each categorical feature's ids number its distinct hashes (optionally ``% max_ind_range``) in order of
first appearance over all seven days, test rows included, so there is no out-of-vocabulary id; a table has
as many rows as the feature has distinct values. Dense values are clipped at 0 and read as
``log(x + 1)`` in float32. dlrm shuffles its training rows with its own seed; they are kept in file order
here (training here shuffles itself).

dlrm's processed file (``kaggleAdDisplayChallenge_processed.npz``: ``X_int``, ``X_cat``, ``y``,
``counts``) is read as well: its ids and counts are taken as they are, its rows split by the same rule.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recompress.errors import UserError
from recompress.outputs import check_output, output_dir
from recompress.progress import progress, say

from .criteo import NUM_CAT, NUM_DENSE, _open, iter_chunks
from .ctr import DatasetWriter
from .first_seen import FirstSeen
from .vocabularies import fingerprint

DAYS = 7
RULES = "facebookresearch/dlrm data_utils.getCriteoAdData + CriteoDataset (kaggle, no --memory-map)"


def split_sizes(n: int) -> dict[str, int]:
    """Rows per split for ``n`` lines: train = days 0-5, test = first half of day 6, val = the rest."""
    q, r = divmod(n, DAYS)
    days = [q + (d < r) for d in range(DAYS)]
    last = days[-1]
    return {"train": n - last, "val": last // 2, "test": last - last // 2}


def dense_values(raw: np.ndarray) -> np.ndarray:
    """dlrm's dense input: negatives clipped to 0, then ``log(x + 1)`` computed in float32."""
    x = np.maximum(raw, 0).astype(np.float32)
    return np.log(x + np.float32(1.0)).astype(np.float32)


def count_lines(path: Path) -> int:
    """Lines in a plain or gzip text file (a last line without newline counts)."""
    raw, fh = _open(path)
    n, last = 0, b"\n"
    with raw:
        with progress("criteo (dlrm layout): counting lines", path.stat().st_size) as advance:
            seen = 0
            while block := fh.read(1 << 22):
                n += block.count(b"\n")
                last = block[-1:]
                advance(raw.tell() - seen)
                seen = raw.tell()
    return n + (last != b"\n")


def prepare_criteo_dlrm(path: str | Path, out: str | Path, *, max_ind_range: int | None = None,
                        limit: int | None = None, overwrite: bool = False) -> Path:
    """Criteo Kaggle ``train.txt`` (plain or gzip) or dlrm's processed ``.npz`` -> a prepared dataset in
    dlrm's ids and splits (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file", "pass the Criteo train.txt (or .gz), or dlrm's "
                        "kaggleAdDisplayChallenge_processed.npz")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit} reads no rows", "pass a positive number of rows, or leave it out")
    if max_ind_range is not None and max_ind_range < 1:
        raise UserError(f"--max-ind-range {max_ind_range} is impossible", "pass dlrm's --max-ind-range value (> 0), "
                        "or leave it out")
    check_output(out, overwrite=overwrite, inputs=[path])
    if path.suffix == ".npz":
        return _from_processed(path, out, max_ind_range, overwrite)
    n = count_lines(path) if limit is None else min(limit, count_lines(path))
    sizes = split_sizes(n)
    bounds = {"train": (0, sizes["train"]), "test": (sizes["train"], sizes["train"] + sizes["test"]),
              "val": (sizes["train"] + sizes["test"], n)}
    vocab = [FirstSeen() for _ in range(NUM_CAT)]
    with output_dir(out, kind="dataset", overwrite=overwrite, inputs=[path]) as tmp:
        writer = DatasetWriter(tmp, sizes, NUM_DENSE, NUM_CAT)
        for row, label, raw_dense, cats in iter_chunks(path, "criteo (dlrm layout): encoding", n):
            cats = np.where(cats < 0, 0, cats)  # an empty field is the hash "0"
            if max_ind_range:
                cats = cats % max_ind_range
            ids = np.stack([v.encode(cats[:, j]) for j, v in enumerate(vocab)], 1).astype(np.int32)
            dense = dense_values(raw_dense)
            rows = np.arange(row, row + len(label))
            for split, (a, b) in bounds.items():
                m = (rows >= a) & (rows < b)
                if m.any():
                    writer.append(split, dense[m], ids[m], label[m])
        np.savez(tmp / "vocab.npz", **{f"C{j + 1}": v.values() for j, v in enumerate(vocab)})
        _finish(writer, path, [len(v) for v in vocab], max_ind_range, "criteo_tsv", limit,
                {f"C{j + 1}": fingerprint(v.values()) for j, v in enumerate(vocab)})
    _said(sizes, vocab_sizes=[len(v) for v in vocab], out=out)
    return Path(out)


def _from_processed(path: Path, out: str | Path, max_ind_range: int | None, overwrite: bool) -> Path:
    try:
        with np.load(path, allow_pickle=False) as z:
            x_int, x_cat, y, counts = (np.asarray(z[k]) for k in ("X_int", "X_cat", "y", "counts"))
    except KeyError as e:
        raise UserError(f"{path} has no array {e}", "pass dlrm's kaggleAdDisplayChallenge_processed.npz "
                        "(X_int, X_cat, y, counts)") from None
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable .npz ({e})", "the file is truncated or corrupt") from None
    n = len(y)
    if x_int.shape != (n, NUM_DENSE) or x_cat.shape != (n, NUM_CAT) or counts.shape != (NUM_CAT,):
        raise UserError(f"{path}: shapes X_int {list(x_int.shape)}, X_cat {list(x_cat.shape)}, counts "
                        f"{list(counts.shape)} are not dlrm's for {n} rows", "pass dlrm's Kaggle processed file")
    ids = x_cat.astype(np.int64)
    rows = counts.astype(np.int64)
    if max_ind_range:  # dlrm applies it again when it reads the rows, and sizes its tables by it
        ids, rows = ids % max_ind_range, np.minimum(rows, max_ind_range)
    if (ids < 0).any() or (ids >= rows).any():
        bad = int(np.argmax(((ids < 0) | (ids >= rows)).any(1)))
        raise UserError(f"{path}: row {bad} has an id outside its feature's counts", "the processed file is damaged")
    sizes = split_sizes(n)
    cut = {"train": slice(0, sizes["train"]), "test": slice(sizes["train"], sizes["train"] + sizes["test"]),
           "val": slice(sizes["train"] + sizes["test"], n)}
    with output_dir(out, kind="dataset", overwrite=overwrite, inputs=[path]) as tmp:
        writer = DatasetWriter(tmp, sizes, NUM_DENSE, NUM_CAT)
        for split, s in cut.items():
            if sizes[split]:
                writer.append(split, dense_values(x_int[s]), ids[s].astype(np.int32),
                              (y[s] > 0).astype(np.uint8))
        _finish(writer, path, rows.tolist(), max_ind_range, "dlrm_processed_npz", None)
    _said(sizes, vocab_sizes=rows.tolist(), out=out)
    return Path(out)


def _finish(writer: DatasetWriter, path: Path, rows: list[int], max_ind_range: int | None, source: str,
            limit: int | None, vocabularies: dict[str, str] | None = None) -> None:
    st = path.stat()
    writer.finish({"source": source, "source_path": str(path.resolve()), "source_size": st.st_size,
                   "source_mtime": int(st.st_mtime), "synthetic": False, "num_dense": NUM_DENSE, "layout": "dlrm",
                   "rules": RULES, "dense_transform": "log(max(x, 0) + 1) in float32",
                   "max_ind_range": max_ind_range, "row_limit": limit, "oov_row": None,
                   "split": {"method": "dlrm days: train = days 0-5, test = first half of day 6, val = second half"},
                   "tables": [{"name": f"C{j + 1}", "rows": int(r)} for j, r in enumerate(rows)],
                   **({"vocabularies": vocabularies} if vocabularies else {})})


def _said(sizes: dict[str, int], vocab_sizes: list[int], out: str | Path) -> None:
    say(f"prepared {sum(sizes.values())} rows in dlrm's layout ({sizes['train']} train / {sizes['test']} test / "
        f"{sizes['val']} val); vocabularies {', '.join(map(str, vocab_sizes))} -> {out}")
