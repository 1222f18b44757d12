"""Criteo Kaggle/Terabyte TSV reader -> prepared dataset, streaming in bounded memory.

Each line: label, I1..I13 (integers, may be empty), C1..C26 (8-hex-digit hashes, may be empty).
Dense features become log(1 + max(x, 0)); categorical vocabularies are built from the train split
only, keeping values seen at least ``min_count`` times (most frequent first); everything else maps
to row 0, the one out-of-vocabulary row per table. The split is a hash of the row index, so it is
deterministic and needs no second look at the data. Memory grows with the vocabulary, never with
the number of rows: the file is read twice, block by block (count, then encode).

Blocks are parsed by pyarrow's CSV reader on a background thread (several times faster than splitting
lines in Python; docs/benchmarks.md); where pyarrow refuses a block, the file is re-read line by line up to it by
:func:`parse_chunk`, which names the offending line and column.
"""

from __future__ import annotations

import gzip
import io
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from recompress.errors import UserError
from recompress.outputs import check_output, output_dir
from recompress.progress import progress, say

from .ctr import SPLITS, DatasetWriter, split_of

NUM_DENSE, NUM_CAT = 13, 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_CAT
CHUNK_ROWS = 200_000  # lines per block when locating an error line by line
BLOCK_BYTES = 1 << 20  # bytes per block parsed by pyarrow (fastest on 2 cores: the blocks stay in cache)
BATCH_ROWS = 1 << 18  # rows per chunk handed on (vocabulary merges cost O(vocabulary) per chunk)
NAMES = ["label", *(f"I{j + 1}" for j in range(NUM_DENSE)), *(f"C{j + 1}" for j in range(NUM_CAT))]
MISSING = -1
_HEX = np.full(256, 255, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def _open(path: Path) -> tuple[io.BufferedReader, io.BufferedReader | gzip.GzipFile]:
    raw = open(path, "rb")
    if raw.read(2) == b"\x1f\x8b":
        raw.seek(0)
        return raw, gzip.GzipFile(fileobj=raw)
    raw.seek(0)
    return raw, raw


def _first_non_integer(rows: list[list[bytes]], first_line: int, where: str) -> None:
    """Raise for the first label or I-column value that is not an integer, naming its line and column."""
    for i, fields in enumerate(rows):
        for c, v in enumerate(fields[:1 + NUM_DENSE]):
            try:
                int(v or b"0")
            except ValueError:
                col = "the label" if c == 0 else f"I{c}"
                raise UserError(f"{where} line {first_line + i}: {col} {v.decode(errors='replace')!r} is not an "
                                "integer", "Criteo's label is 0 or 1 and I1-I13 are integers or empty") from None


def parse_chunk(lines: list[bytes], first_line: int, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lines -> (label uint8 [n], dense int64 [n, 13] with 0 = missing, categorical int64 [n, 26] with
    -1 = missing)."""
    rows = []
    for i, line in enumerate(lines):
        f = line.rstrip(b"\r\n").split(b"\t")
        if len(f) != NUM_FIELDS:
            raise UserError(f"{where} line {first_line + i}: {len(f)} tab-separated fields, expected {NUM_FIELDS} "
                            "(label, I1-I13, C1-C26)", "is this a Criteo train file? Criteo's test.txt has no labels")
        rows.append(f)
    arr = np.array(rows, dtype=np.bytes_)
    try:
        label = arr[:, 0].astype(np.int64)
        dense = np.where(arr[:, 1:1 + NUM_DENSE] == b"", b"0", arr[:, 1:1 + NUM_DENSE]).astype(np.int64)
    except ValueError:
        _first_non_integer(rows, first_line, where)
    if ((label != 0) & (label != 1)).any():
        bad = first_line + int(np.argmax((label != 0) & (label != 1)))
        raise UserError(f"{where} line {bad}: label is not 0 or 1", "the first column must be the click label")
    cats = arr[:, 1 + NUM_DENSE:]
    lengths = np.char.str_len(cats)
    if ((lengths != 0) & (lengths != 8)).any():
        r, c = np.argwhere((lengths != 0) & (lengths != 8))[0]
        raise UserError(f"{where} line {first_line + r}: C{c + 1} value {cats[r, c].decode(errors='replace')!r} is not "
                        "an 8-hex-digit hash", "Criteo C1-C26 are 8 hex digits or empty")
    digits = _HEX[np.frombuffer(cats.astype("S8").tobytes(), np.uint8).reshape(len(lines), NUM_CAT, 8)]
    present = lengths == 8
    if (digits[present] == 255).any():
        r, c = np.argwhere(present & (digits == 255).any(-1))[0]
        raise UserError(f"{where} line {first_line + r}: C{c + 1} value {cats[r, c].decode(errors='replace')!r} is not "
                        "hexadecimal", "Criteo C1-C26 are 8 hex digits or empty")
    values = (digits.astype(np.int64) << (4 * np.arange(7, -1, -1))).sum(-1)
    values[~present] = MISSING
    return label.astype(np.uint8), dense, values


def _lines(path: Path, limit: int | None) -> Iterator[tuple[int, list[bytes]]]:
    """(first row index, lines) in blocks of CHUNK_ROWS lines, read in Python."""
    raw, fh = _open(path)
    row = 0
    with raw:
        while limit is None or row < limit:
            want = CHUNK_ROWS if limit is None else min(CHUNK_ROWS, limit - row)
            lines = [ln for ln in (fh.readline() for _ in range(want)) if ln]
            if not lines:
                return
            yield row, lines
            row += len(lines)


def _locate(path: Path, problem: str) -> UserError:
    """The error for the first bad line of ``path`` (read line by line), or pyarrow's ``problem``."""
    for row, lines in _lines(path, None):
        parse_chunk(lines, row + 1, str(path))
    return UserError(f"{path} could not be read as a Criteo TSV: {problem}", "Criteo lines are label, I1-I13, C1-C26, "
                     "tab-separated")


def _hashes(col: Any, name: str, first_line: int, where: str) -> np.ndarray:
    """An Arrow binary column of 8-hex-digit hashes (or empty) -> int64 values, -1 for empty."""
    offsets = np.frombuffer(col.buffers()[1], np.int32)[col.offset:col.offset + len(col) + 1]
    data = np.frombuffer(col.buffers()[2], np.uint8) if col.buffers()[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    present = lengths == 8
    bad = np.flatnonzero(~present & (lengths != 0))
    if len(bad) == 0:  # every value is 8 bytes or empty: the data buffer is the present values, back to back
        digits = _HEX[data[offsets[0]:offsets[-1]]].reshape(-1, 8)
        if digits.max(initial=0) < 16:
            values = np.full(len(col), MISSING, np.int64)
            values[present] = ((digits[:, 0::2] << 4) | digits[:, 1::2]).view(">u4")[:, 0]
            return values
        bad = np.flatnonzero(present)[(digits == 255).any(-1)]
    i = int(bad[0])
    text = bytes(data[offsets[i]:offsets[i + 1]]).decode(errors="replace")
    what = "an 8-hex-digit hash" if lengths[i] != 8 else "hexadecimal"
    raise UserError(f"{where} line {first_line + i}: {name} value {text!r} is not {what}",
                    "Criteo C1-C26 are 8 hex digits or empty")


def _batches(reader: Any, limit: int | None) -> Iterator[Any]:
    """The reader's small blocks joined into record batches of about BATCH_ROWS rows (cut at ``limit``)."""
    import pyarrow as pa

    pending: list[Any] = []
    rows = total = 0
    for batch in reader:
        if limit is not None and total + rows + batch.num_rows > limit:
            batch = batch.slice(0, limit - total - rows)
        pending.append(batch)
        rows += batch.num_rows
        if rows >= BATCH_ROWS or (limit is not None and total + rows >= limit):
            yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]
            total, rows, pending = total + rows, 0, []
            if limit is not None and total >= limit:
                return
    if rows:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def _parsed(path: Path, limit: int | None) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, int]]:
    """(first row index, label, dense, categorical, file bytes read so far) per chunk, parsed by pyarrow."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    types = {n: pa.int64() if i <= NUM_DENSE else pa.binary() for i, n in enumerate(NAMES)}
    with pa.OSFile(str(path), "rb") as raw:
        gz = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        reader = pcsv.open_csv(pa.CompressedInputStream(raw, "gzip") if gz else raw,
                               read_options=pcsv.ReadOptions(column_names=NAMES, block_size=BLOCK_BYTES,
                                                             use_threads=False),
                               parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False,
                                                               ignore_empty_lines=False),
                               convert_options=pcsv.ConvertOptions(column_types=types, null_values=[""], strings_can_be_null=False,
                                                                   quoted_strings_can_be_null=False))
        row = 0
        for batch in _batches(reader, limit):
            yield (row, *_columns(batch, row + 1, str(path)), raw.tell())
            row += batch.num_rows


def _ahead(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """``items``, produced by a background thread up to ``depth`` ahead (pyarrow and numpy release the GIL,
    so parsing the next chunk overlaps with the caller's work on this one); its exceptions are re-raised."""
    q: queue.Queue[Any] = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def work() -> None:
        try:
            for x in items:
                while not stop.is_set():
                    try:
                        q.put((x, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((end, None))
        except BaseException as e:  # noqa: BLE001 (handed to the caller, who re-raises it)
            q.put((None, e))

    threading.Thread(target=work, daemon=True).start()
    try:
        while True:
            x, err = q.get()
            if err is not None:
                raise err
            if x is end:
                return
            yield x
    finally:
        stop.set()


def iter_chunks(path: Path, desc: str, limit: int | None) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(first row index, label, dense, categorical) per chunk as the file has them (see :func:`_columns`),
    with a progress bar over the file's bytes."""
    import pyarrow as pa

    rows = 0
    with progress(desc, path.stat().st_size) as advance:
        seen = 0
        try:
            for row, label, dense, cats, read in _ahead(_parsed(path, limit)):
                yield row, label, dense, cats
                rows = row + len(label)
                advance(read - seen)
                seen = read
        except pa.ArrowInvalid as e:
            raise _locate(path, str(e).splitlines()[0]) from None
        except OSError as e:  # e.g. a truncated gzip stream
            raise UserError(f"{path} could not be read: {e}", "the file is truncated or corrupt; fetch it again") from None
    if rows == 0:
        raise UserError(f"{path} has no data rows", "pass a Criteo TSV file")


def _columns(batch: Any, first_line: int, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A parsed block -> (label uint8 [n], dense int64 [n, 13] with 0 = missing, categorical int64 [n, 26]
    with -1 = missing)."""
    if batch.column(0).null_count:
        bad = first_line + int(np.argmax(batch.column(0).is_null().to_numpy(zero_copy_only=False)))
        raise UserError(f"{where} line {bad}: no label (an empty line?)", "every line starts with the 0/1 click label")
    label = batch.column(0).to_numpy()
    if ((label != 0) & (label != 1)).any():
        bad = first_line + int(np.argmax((label != 0) & (label != 1)))
        raise UserError(f"{where} line {bad}: label is not 0 or 1", "the first column must be the click label")
    dense = np.stack([batch.column(1 + j).fill_null(0).to_numpy() for j in range(NUM_DENSE)], 1)
    cats = np.empty((batch.num_rows, NUM_CAT), np.int64)
    for j in range(NUM_CAT):
        cats[:, j] = _hashes(batch.column(1 + NUM_DENSE + j), f"C{j + 1}", first_line, where)
    return label.astype(np.uint8), dense, cats


def _merge_counts(keys: np.ndarray, counts: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, c = np.unique(new, return_counts=True)
    allk, inv = np.unique(np.concatenate([keys, u]), return_inverse=True)
    return allk, np.bincount(inv, weights=np.concatenate([counts, c]), minlength=len(allk)).astype(np.int64)


def prepare_criteo(path: str | Path, out: str | Path, *, min_count: int = 2, max_rows: int | None = None,
                   val: float = 0.1, test: float = 0.1, seed: int = 0, limit: int | None = None,
                   overwrite: bool = False) -> Path:
    """Read a Criteo TSV (plain or gzip) into a prepared dataset folder ``out``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file", "pass the Criteo train.txt (or .gz)")
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise UserError(f"split fractions val={val}, test={test} are impossible", "each in [0, 1), sum below 1")
    if min_count < 1 or (max_rows is not None and max_rows < 2):
        raise UserError("min_count must be >= 1 and max_rows >= 2", "fix the option")
    check_output(out, overwrite=overwrite, inputs=[path])
    keys = [np.empty(0, np.int64) for _ in range(NUM_CAT)]
    counts = [np.empty(0, np.int64) for _ in range(NUM_CAT)]
    sizes = dict.fromkeys(SPLITS, 0)
    for row, _, _, cats in iter_chunks(path, "criteo: counting", limit):
        split = split_of(np.arange(row, row + len(cats)), seed, val, test)
        for s, name in enumerate(SPLITS):
            sizes[name] += int((split == s).sum())
        train = cats[split == 0]
        for j in range(NUM_CAT):
            keys[j], counts[j] = _merge_counts(keys[j], counts[j], train[:, j])
    lookup = []
    for j in range(NUM_CAT):
        keep = counts[j] >= min_count
        k, c = keys[j][keep], counts[j][keep]
        order = np.lexsort((k, -c))[: (max_rows - 1) if max_rows else None]
        vocab = k[order]  # row r + 1 holds vocab[r]
        srt = np.argsort(vocab)
        lookup.append((vocab[srt], (srt + 1).astype(np.int32), vocab))
    with output_dir(out, kind="dataset", overwrite=overwrite, inputs=[path]) as tmp:
        writer = DatasetWriter(tmp, sizes, NUM_DENSE, NUM_CAT)
        for row, label, dense, cats in iter_chunks(path, "criteo: encoding", limit):
            split = split_of(np.arange(row, row + len(cats)), seed, val, test)
            ids = np.zeros(cats.shape, np.int32)
            for j, (sk, sidx, _) in enumerate(lookup):
                if len(sk):
                    pos = np.minimum(np.searchsorted(sk, cats[:, j]), len(sk) - 1)
                    ids[:, j] = np.where(sk[pos] == cats[:, j], sidx[pos], 0)
            dense = np.log1p(np.maximum(dense, 0)).astype(np.float32)
            for s, name in enumerate(SPLITS):
                m = split == s
                if m.any():
                    writer.append(name, dense[m], ids[m], label[m])
        np.savez(tmp / "vocab.npz", **{f"C{j + 1}": lk[2] for j, lk in enumerate(lookup)})
        st = path.stat()
        writer.finish({"source": "criteo_tsv", "source_path": str(path.resolve()), "source_size": st.st_size,
                       "source_mtime": int(st.st_mtime), "synthetic": False, "num_dense": NUM_DENSE,
                       "dense_transform": "log1p(max(x, 0))", "min_count": min_count, "max_rows": max_rows,
                       "split": {"method": "hash of row index", "seed": seed, "val": val, "test": test},
                       "row_limit": limit, "oov_row": 0,
                       "tables": [{"name": f"C{j + 1}", "rows": len(lk[2]) + 1} for j, lk in enumerate(lookup)]})
    say(f"prepared {sum(sizes.values())} rows ({sizes['train']} train / {sizes['val']} val / {sizes['test']} test) "
        f"-> {out}")
    return Path(out)
