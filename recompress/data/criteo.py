"""Criteo Kaggle/Terabyte TSV reader -> prepared dataset, streaming in bounded memory.

Each line: label, I1..I13 (integers, may be empty), C1..C26 (8-hex-digit hashes, may be empty).
Dense features become log(1 + max(x, 0)); categorical vocabularies are built from the train split
only, keeping values seen at least ``min_count`` times (most frequent first, ties by value); everything
else maps to row 0, the one out-of-vocabulary row per table. The split is a hash of the row index, so it is
deterministic and needs no second look at the data.

The text is parsed once: blocks are parsed by pyarrow's CSV reader (on its threads, while the previous chunk
is encoded); each hash is kept as its 8 bytes read as one integer (no hex parsing per row) and numbered in
order of first appearance per table (:class:`~recompress.data.first_seen.FirstSeen`: a hash table per chunk),
counting train rows. The parsed rows wait in a spill file in the output's staging folder (157 bytes per row:
the size of the output) while the vocabularies are cut; a second pass over that file maps first-seen ids to
rows. The digits of every distinct hash are checked once, in the chunk that first has it. Memory grows with the distinct values of all
splits (32 bytes each, twice that while a chunk's new values are inserted), never with the rows. Where
pyarrow refuses a block, or a hash is not hexadecimal, the file is re-read line by line up to it by
:func:`_check_lines`, which names the offending line and column.
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
from .first_seen import FirstSeen
from .vocabularies import fingerprint

NUM_DENSE, NUM_CAT = 13, 26
NUM_FIELDS = 1 + NUM_DENSE + NUM_CAT
CHUNK_ROWS = 200_000  # lines per block when locating an error line by line
BLOCK_BYTES = 1 << 22  # bytes per block, parsed on pyarrow's threads (4 MB: fastest of 1, 4, 16 MB on 2 cores)
BATCH_ROWS = 1 << 18  # rows per chunk handed on (vocabulary merges cost O(vocabulary) per chunk)
NAMES = ["label", *(f"I{j + 1}" for j in range(NUM_DENSE)), *(f"C{j + 1}" for j in range(NUM_CAT))]
MISSING = -1
_ONES = np.uint64(0x0101010101010101)
_BIT6 = np.uint64(0x4040404040404040)  # shifted onto bit 5: 'A'-'F' -> 'a'-'f'; digits and controls unchanged


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


def _check_lines(lines: list[bytes], first_line: int, where: str) -> None:
    """Raise for the first line that is not a Criteo training line, naming its line and column (the slow
    path that locates what the block reader refused)."""
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
        np.where(arr[:, 1:1 + NUM_DENSE] == b"", b"0", arr[:, 1:1 + NUM_DENSE]).astype(np.int64)
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
    keys = _lower(np.frombuffer(cats.astype("S8").tobytes(), "<u8").reshape(len(lines), NUM_CAT))
    bad_hex = hex_values(np.where(lengths == 8, keys, np.uint64(0)))[1]
    if bad_hex.any():
        r, c = np.argwhere(bad_hex)[0]
        raise UserError(f"{where} line {first_line + r}: C{c + 1} value {cats[r, c].decode(errors='replace')!r} is not "
                        "hexadecimal", "Criteo C1-C26 are 8 hex digits or empty")


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
        _check_lines(lines, row + 1, str(path))
    return UserError(f"{path} could not be read as a Criteo TSV: {problem}", "Criteo lines are label, I1-I13, C1-C26, "
                     "tab-separated")


def _keys(col: Any, name: str, first_line: int, where: str) -> np.ndarray:
    """An Arrow binary column of 8-hex-digit hashes (or empty) -> uint64 keys: the 8 bytes read as one
    little-endian integer, letters lower-cased, 0 for empty. Keys are not decoded (:func:`hex_values` does,
    and checks the digits): comparing and counting them needs no parsing."""
    offsets = np.frombuffer(col.buffers()[1], np.int32)[col.offset:col.offset + len(col) + 1]
    data = np.frombuffer(col.buffers()[2], np.uint8) if col.buffers()[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    present = lengths == 8
    bad = np.flatnonzero(~present & (lengths != 0))
    if len(bad):
        i = int(bad[0])
        text = bytes(data[offsets[i]:offsets[i + 1]]).decode(errors="replace")
        raise UserError(f"{where} line {first_line + i}: {name} value {text!r} is not an 8-hex-digit hash",
                        "Criteo C1-C26 are 8 hex digits or empty")
    keys = np.zeros(len(col), np.uint64)  # every value is 8 bytes or empty: the present ones lie back to back
    v = data[offsets[0]:offsets[-1]].view("<u8")
    keys[present] = _lower(v)
    if not keys[present].all():  # eight NUL bytes would read as empty
        i = int(np.flatnonzero(present & (keys == 0))[0])
        raise UserError(f"{where} line {first_line + i}: {name} value is eight NUL bytes, not an 8-hex-digit hash",
                        "Criteo C1-C26 are 8 hex digits or empty")
    return keys


def _lower(words: np.ndarray) -> np.ndarray:
    """8-byte words with their letters 'A'-'F' lower-cased (bit 6 copied onto bit 5; digits unchanged)."""
    return words | ((words & _BIT6) >> np.uint64(1))


def hex_values(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint64 keys (:func:`_keys`) -> (int64 hash values, -1 for empty; bool mask of keys that are not 8 hex
    digits). Bytewise arithmetic on whole words (each byte below 0x80, so no carry crosses bytes)."""
    x = keys.byteswap()  # the first character in the top byte
    low = (x & _ONES * 0x80) == 0
    ge = lambda v, lo: (v + _ONES * (0x80 - lo)) & (_ONES * 0x80)  # bytes >= lo (bytes < 0x80)
    digit = ge(x, 0x30) & ~ge(x, 0x3A)
    letter = ge(x, 0x61) & ~ge(x, 0x67)  # already lower-case
    missing = keys == 0
    bad = ~missing & ~(low & ((digit | letter) == _ONES * 0x80))
    nib = (x & (_ONES * 0x0F)) + np.uint64(9) * ((x >> np.uint64(6)) & _ONES)  # '0'-'9' -> 0-9, 'a'-'f' -> 10-15
    nib = (nib | (nib >> np.uint64(4))) & np.uint64(0x00FF00FF00FF00FF)
    nib = (nib | (nib >> np.uint64(8))) & np.uint64(0x0000FFFF0000FFFF)
    values = ((nib | (nib >> np.uint64(16))) & np.uint64(0xFFFFFFFF)).astype(np.int64)
    values[missing] = MISSING
    return values, bad


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
                                                             use_threads=True),
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


def _chunks(path: Path, desc: str, limit: int | None) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(first row index, label, dense, keys) per chunk as :func:`_columns` makes them, parsed ahead on a
    background thread, with a progress bar over the file's bytes."""
    import pyarrow as pa

    rows = 0
    with progress(desc, path.stat().st_size) as advance:
        seen = 0
        try:
            for row, label, dense, keys, read in _ahead(_parsed(path, limit)):
                yield row, label, dense, keys
                rows = row + len(label)
                advance(read - seen)
                seen = read
        except pa.ArrowInvalid as e:
            raise _locate(path, str(e).splitlines()[0]) from None
        except OSError as e:  # e.g. a truncated gzip stream
            raise UserError(f"{path} could not be read: {e}", "the file is truncated or corrupt; fetch it again") from None
    if rows == 0:
        raise UserError(f"{path} has no data rows", "pass a Criteo TSV file")


def iter_chunks(path: Path, desc: str, limit: int | None) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(first row index, label uint8 [n], dense int64 [n, 13] with 0 = missing, categorical hash values int64
    [n, 26] with -1 = missing) per chunk."""
    for row, label, dense, keys in _chunks(path, desc, limit):
        values, bad = hex_values(keys)
        if bad.any():
            raise _locate(path, f"C{int(np.argmax(bad.any(1))) + 1} has a value that is not hexadecimal")
        yield row, label, dense, values.T


def _columns(batch: Any, first_line: int, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A parsed block -> (label uint8 [n], dense int64 [n, 13] with 0 = missing, categorical keys uint64
    [26, n] (:func:`_keys`), one table per row)."""
    if batch.column(0).null_count:
        bad = first_line + int(np.argmax(batch.column(0).is_null().to_numpy(zero_copy_only=False)))
        raise UserError(f"{where} line {bad}: no label (an empty line?)", "every line starts with the 0/1 click label")
    label = batch.column(0).to_numpy()
    if ((label != 0) & (label != 1)).any():
        bad = first_line + int(np.argmax((label != 0) & (label != 1)))
        raise UserError(f"{where} line {bad}: label is not 0 or 1", "the first column must be the click label")
    dense = np.stack([batch.column(1 + j).fill_null(0).to_numpy() for j in range(NUM_DENSE)], 1)
    keys = np.empty((NUM_CAT, batch.num_rows), np.uint64)
    for j in range(NUM_CAT):
        keys[j] = _keys(batch.column(1 + NUM_DENSE + j), f"C{j + 1}", first_line, where)
    return label.astype(np.uint8), dense, keys


class _Spill:
    """The parsed rows, kept in raw files inside the output's staging folder between the reading and the
    encoding pass, so that the text is parsed once: label, dense (float32) and first-seen ids (int32, one
    table after another per chunk): 157 bytes per row, removed before the folder is renamed."""

    def __init__(self, root: Path) -> None:
        self.paths = [root / f".criteo-{k}.bin" for k in ("label", "dense", "ids")]
        self.files = [open(p, "wb") for p in self.paths]
        self.rows: list[int] = []

    def write(self, label: np.ndarray, dense: np.ndarray, ids: np.ndarray) -> None:
        for f, a in zip(self.files, (label, dense, ids)):
            np.ascontiguousarray(a).tofile(f)
        self.rows.append(len(label))

    def read(self) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """(first row index, label, dense, ids [26, n]) per chunk, in the order written, each chunk memory-mapped
        on its own (so that the pages read are let go with it)."""
        for f in self.files:
            f.close()
        try:
            row = 0
            for n in self.rows:
                label, dense, ids = (np.memmap(p, dtype, "r", offset=row * width * np.dtype(dtype).itemsize,
                                               shape=(n * width,))
                                     for p, dtype, width in zip(self.paths, (np.uint8, np.float32, np.int32),
                                                                (1, NUM_DENSE, NUM_CAT)))
                yield row, label, dense.reshape(n, NUM_DENSE), ids.reshape(NUM_CAT, n)
                del label, dense, ids
                row += n
        finally:
            for p in self.paths:
                p.unlink()


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
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit} reads no rows", "pass a positive number of rows, or leave it out")
    check_output(out, overwrite=overwrite, inputs=[path])
    seen = [FirstSeen(np.uint64) for _ in range(NUM_CAT)]
    sizes = dict.fromkeys(SPLITS, 0)
    with output_dir(out, kind="dataset", overwrite=overwrite, inputs=[path]) as tmp:
        spill = _Spill(tmp)
        for row, label, dense, keys in _chunks(path, "criteo: reading", limit):
            split = split_of(np.arange(row, row + len(label)), seed, val, test)
            for s, name in enumerate(SPLITS):
                sizes[name] += int((split == s).sum())
            train = split == 0
            ids = np.empty(keys.shape, np.int32)
            for j in range(NUM_CAT):
                known = len(seen[j])
                ids[j] = seen[j].encode(keys[j], counted=train)
                if len(seen[j]) > known and hex_values(seen[j].order[-1])[1].any():  # this chunk's new values
                    raise _locate(path, f"C{j + 1} has a value that is not hexadecimal")
            spill.write(label, np.log1p(np.maximum(dense, 0)).astype(np.float32), ids)
        remap, vocab_values = [], []
        for j in range(NUM_CAT):  # vocabulary: train values seen >= min_count times, most frequent first
            sj = seen.pop(0)  # each table's distinct values freed once cut (remap: 4 bytes per value)
            v = np.concatenate([hex_values(part)[0] for part in sj.order]) if sj.order else np.empty(0, np.int64)
            keep = np.flatnonzero(sj.counts >= min_count)
            order = keep[np.lexsort((v[keep], -sj.counts[keep]))][: (max_rows - 1) if max_rows else None]
            r = np.zeros(len(sj), np.int32)  # first-seen id -> row (0: out of the vocabulary)
            r[order] = np.arange(1, len(order) + 1)
            remap.append(r)
            vocab_values.append(v[order])
        writer = DatasetWriter(tmp, sizes, NUM_DENSE, NUM_CAT)
        with progress("criteo: encoding", sum(sizes.values())) as advance:
            for row, label, dense, first in spill.read():
                split = split_of(np.arange(row, row + len(label)), seed, val, test)
                ids = np.empty((len(label), NUM_CAT), np.int32)
                for j in range(NUM_CAT):
                    ids[:, j] = remap[j][first[j]]
                for s, name in enumerate(SPLITS):
                    m = split == s
                    if m.any():
                        writer.append(name, dense[m], ids[m], label[m])
                advance(len(label))
        np.savez(tmp / "vocab.npz", **{f"C{j + 1}": v for j, v in enumerate(vocab_values)})
        st = path.stat()
        writer.finish({"source": "criteo_tsv", "source_path": str(path.resolve()), "source_size": st.st_size,
                       "source_mtime": int(st.st_mtime), "synthetic": False, "num_dense": NUM_DENSE,
                       "dense_transform": "log1p(max(x, 0))", "min_count": min_count, "max_rows": max_rows,
                       "split": {"method": "hash of row index", "seed": seed, "val": val, "test": test},
                       "row_limit": limit, "oov_row": 0,
                       "tables": [{"name": f"C{j + 1}", "rows": len(v) + 1} for j, v in enumerate(vocab_values)],
                       "vocabularies": {f"C{j + 1}": fingerprint(v) for j, v in enumerate(vocab_values)}})
    say(f"prepared {sum(sizes.values())} rows ({sizes['train']} train / {sizes['val']} val / {sizes['test']} test) "
        f"-> {out}")
    return Path(out)
