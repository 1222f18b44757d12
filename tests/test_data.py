import gzip

import numpy as np
import pytest

from recompress.data import open_dataset
from recompress.data.criteo import prepare_criteo
from recompress.data.synthetic import make_synthetic
from recompress.errors import UserError

from .conftest import shared_path


def criteo_line(rng, label=None):
    dense = [str(rng.integers(-2, 100)) if rng.random() > 0.2 else "" for _ in range(13)]
    cats = [f"{int(rng.integers(0, 5 + 3 * j)):08x}" if rng.random() > 0.1 else "" for j in range(26)]
    return "\t".join([str(label if label is not None else rng.integers(0, 2)), *dense, *cats])


def write_criteo(path, n, seed=0):
    rng = np.random.default_rng(seed)
    with gzip.open(path, "wt") as f:
        for _ in range(n):
            f.write(criteo_line(rng) + "\n")


def test_criteo_reader_vocab_from_train_only(tmp_path):
    src = tmp_path / "train.txt.gz"
    write_criteo(src, 3000)
    a = open_dataset(prepare_criteo(src, tmp_path / "a", min_count=3, seed=1))
    b = open_dataset(prepare_criteo(src, tmp_path / "b", min_count=3, seed=1))
    assert sum(a.meta["splits"].values()) == 3000
    for split in ("train", "val", "test"):
        for x, y in zip(a.arrays(split), b.arrays(split)):
            assert np.array_equal(x, y)  # deterministic
    _, sparse, _ = a.arrays("train")
    for j, rows in enumerate(a.table_rows):
        assert sparse[:, j].max() < rows  # ids in range, row 0 = OOV
    vocab = np.load(tmp_path / "a" / "vocab.npz")
    # every kept value was seen >= min_count times in train rows (re-count from the raw file)
    lines = [ln.rstrip("\n").split("\t") for ln in gzip.open(src, "rt")]
    from recompress.data.ctr import split_of
    split = split_of(np.arange(len(lines)), 1, 0.1, 0.1)
    train_c1 = [ln[14] for ln, s in zip(lines, split) if s == 0]
    for key in vocab["C1"]:
        token = "" if key == -1 else f"{key:08x}"
        assert train_c1.count(token) >= 3
    dense, _, _ = a.arrays("train")
    assert dense.min() >= 0 and np.isfinite(dense).all()


def test_criteo_wrong_columns_names_line(tmp_path):
    src = tmp_path / "bad.txt"
    rng = np.random.default_rng(0)
    src.write_text(criteo_line(rng) + "\n" + "1\t2\t3\n")
    with pytest.raises(UserError, match="line 2: 3 tab-separated fields, expected 40"):
        prepare_criteo(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_criteo_bad_hash(tmp_path):
    src = tmp_path / "bad.txt"
    fields = criteo_line(np.random.default_rng(0), label=1).split("\t")
    fields[20] = "zzzzzzzz"
    src.write_text("\t".join(fields) + "\n")
    with pytest.raises(UserError, match="not hexadecimal"):
        prepare_criteo(src, tmp_path / "out")


@pytest.mark.shared_data
def test_real_criteo_head10k(tmp_path):
    src = shared_path("data/criteo_kaggle_head10k/criteo_train_head10k.txt.gz")
    d = open_dataset(prepare_criteo(src, tmp_path / "c"))
    assert sum(d.meta["splits"].values()) == 10_000
    assert len(d.table_rows) == 26 and d.num_dense == 13
    labels = np.concatenate([d.arrays(s)[2] for s in ("train", "val", "test")])
    assert labels.mean() == pytest.approx(0.218, abs=0.01)  # 21.8% positives per PROVENANCE


def test_synthetic_rates_and_large_tables(tmp_path):
    d = open_dataset(make_synthetic(tmp_path / "s", samples=20_000, table_rows=[12_000_000, 1000, 5], ctr=0.3, seed=1))
    assert d.meta["synthetic"] is True and d.table_rows == [12_000_000, 1000, 5]
    _, sparse, label = d.arrays("train")
    assert abs(label.mean() - 0.3) < 0.03
    assert sparse[:, 0].max() < 12_000_000 and sparse.min() >= 1
    counts = np.bincount(sparse[:, 1])
    assert counts.max() > 20 * np.median(counts[counts > 0])  # Zipf: a few hot ids


def test_synthetic_data_with_one_table_has_both_labels(tmp_path):
    # One table has no pairs to interact: the pairwise term divided 0 by 0, every logit was NaN and every
    # label 0 (AUC undefined), with no error.
    d = open_dataset(make_synthetic(tmp_path / "one", samples=5000, table_rows=[1000], ctr=0.25, seed=1))
    labels = np.concatenate([d.arrays(s)[2] for s in ("train", "val", "test")])
    assert abs(labels.mean() - 0.25) < 0.03


def test_synthetic_deterministic(tmp_path):
    a = open_dataset(make_synthetic(tmp_path / "a", samples=500, seed=4))
    b = open_dataset(make_synthetic(tmp_path / "b", samples=500, seed=4))
    assert all(np.array_equal(x, y) for x, y in zip(a.arrays("train"), b.arrays("train")))


def _reference_parse(text):
    """Criteo lines parsed field by field in plain Python: the independent reference for the block reader."""
    label, dense, cats = [], [], []
    for line in text.splitlines():
        f = line.split("\t")
        label.append(int(f[0]))
        dense.append([int(x or 0) for x in f[1:14]])
        cats.append([int(x, 16) if x else -1 for x in f[14:]])
    return np.array(label), np.array(dense), np.array(cats)


@pytest.mark.parametrize("compressed", [False, True])
def test_criteo_blocks_match_a_line_by_line_parse(tmp_path, monkeypatch, compressed):
    from recompress.data import criteo
    rng = np.random.default_rng(3)
    lines = [criteo_line(rng) for _ in range(3000)]
    lines[5] = lines[5].replace("a", "A")  # upper-case hex
    text = "\r\n".join(lines[:10]) + "\r\n" + "\n".join(lines[10:])  # no newline after the last line
    src = tmp_path / ("t.txt.gz" if compressed else "t.txt")
    (gzip.open(src, "wt", newline="") if compressed else open(src, "w", newline="")).__enter__().write(text)
    monkeypatch.setattr(criteo, "BLOCK_BYTES", 1 << 14)  # dozens of blocks, joined a few at a time
    monkeypatch.setattr(criteo, "BATCH_ROWS", 250)
    got = list(criteo.iter_chunks(src, "t", None))
    assert len(got) > 10 and [r for r, *_ in got] == list(np.cumsum([0] + [len(g[1]) for g in got[:-1]]))
    ref = _reference_parse(text)
    for k in range(3):
        assert np.array_equal(np.concatenate([g[1 + k] for g in got]), ref[k].astype(np.concatenate([g[1 + k] for g in got]).dtype))
    limited = list(criteo.iter_chunks(src, "t", 1234))
    assert sum(len(g[1]) for g in limited) == 1234


@pytest.mark.parametrize(("line", "col", "value", "match"), [
    (2500, 3, "1.5", "line 2501: I3 '1.5' is not an integer"),
    (2200, 3, "NaN", "line 2201: I3 'NaN' is not an integer"),  # not read as missing
    (2300, 0, "NA", "line 2301: the label 'NA' is not an integer"),
    (1700, 20, "abc", "line 1701: C7 value 'abc' is not an 8-hex-digit hash"),
    (2900, 30, "0000zz00", "line 2901: C17 value '0000zz00' is not hexadecimal"),
])
def test_criteo_errors_deep_in_the_file_name_their_line(tmp_path, monkeypatch, line, col, value, match):
    from recompress.data import criteo
    rng = np.random.default_rng(4)
    lines = [criteo_line(rng) for _ in range(3000)]
    fields = lines[line].split("\t")
    fields[col] = value
    lines[line] = "\t".join(fields)
    src = tmp_path / "t.txt"
    src.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(criteo, "BLOCK_BYTES", 1 << 14)
    monkeypatch.setattr(criteo, "BATCH_ROWS", 250)
    with pytest.raises(UserError, match=match):
        prepare_criteo(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_criteo_empty_line_is_refused_by_number(tmp_path):
    rng = np.random.default_rng(5)
    lines = [criteo_line(rng) for _ in range(20)]
    lines[7] = ""
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="line 8: no label"):
        prepare_criteo(tmp_path / "t.txt", tmp_path / "out")


def test_criteo_truncated_gzip_is_a_clear_error(tmp_path):
    src = tmp_path / "t.txt.gz"
    write_criteo(src, 3000)
    data = src.read_bytes()
    src.write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match="could not be read.*truncated or corrupt"):
        prepare_criteo(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def dlrm_reference(lines, max_ind_range=None):
    """facebookresearch/dlrm's Kaggle processing written out in plain Python from its rules: 7 days of
    N // 7 lines (the first N % 7 one longer), empty fields "0", ids by first appearance over all rows,
    dense clipped at 0 then log(x + 1) in float32; train = days 0-5, test = first half of day 6."""
    n = len(lines)
    q, r = divmod(n, 7)
    last = q + (6 < r)
    dicts = [{} for _ in range(26)]
    dense, cats, label = [], [], []
    for line in lines:
        f = [x if x not in ("", "\n") else "0" for x in line.split("\t")]
        label.append(int(f[0]))
        dense.append([max(int(x), 0) for x in f[1:14]])
        row = []
        for j, x in enumerate(f[14:]):
            v = int(x, 16) % max_ind_range if max_ind_range else int(x, 16)
            row.append(dicts[j].setdefault(v, len(dicts[j])))
        cats.append(row)
    dense = np.log(np.array(dense, np.float32) + np.float32(1))
    cats, label = np.array(cats), np.array(label)
    t = n - last
    h = last - last // 2
    return {"train": slice(0, t), "test": slice(t, t + h), "val": slice(t + h, n)}, dense, cats, label, [len(d) for d in dicts]


@pytest.mark.parametrize("n,max_ind_range", [(3000, None), (1003, None), (1003, 7)])
def test_criteo_dlrm_layout_numbers_and_splits_as_dlrm(tmp_path, n, max_ind_range):
    from recompress.data.criteo_dlrm import prepare_criteo_dlrm
    rng = np.random.default_rng(5)
    lines = [criteo_line(rng) for _ in range(n)]
    src = tmp_path / "train.txt"
    src.write_text("\n".join(lines) + "\n")
    splits, dense, cats, label, counts = dlrm_reference(lines, max_ind_range)
    d = open_dataset(prepare_criteo_dlrm(src, tmp_path / "d", max_ind_range=max_ind_range))
    assert d.table_rows == counts and d.meta["layout"] == "dlrm"
    for split, s in splits.items():
        dd, sp, lab = d.arrays(split)
        assert np.array_equal(sp, cats[s]) and np.array_equal(lab, label[s]) and np.array_equal(dd, dense[s]), split
    # dlrm's processed file gives the same dataset
    np.savez(tmp_path / "kaggleAdDisplayChallenge_processed.npz", X_cat=cats.astype(np.float64),
             X_int=np.exp(dense).round().astype(np.int32) - 1, y=label.astype(np.int32), counts=np.array(counts, np.int32))
    d2 = open_dataset(prepare_criteo_dlrm(tmp_path / "kaggleAdDisplayChallenge_processed.npz", tmp_path / "d2"))
    for split in splits:
        assert all(np.array_equal(a, b) for a, b in zip(d.arrays(split), d2.arrays(split))), split


def test_criteo_dlrm_layout_refuses_options_it_fixes(tmp_path):
    from click.testing import CliRunner

    from recompress.cli import main
    write_criteo(tmp_path / "t.txt.gz", 50)
    r = CliRunner().invoke(main, ["data", "criteo", str(tmp_path / "t.txt.gz"), "--layout", "dlrm", "--min-count", "1",
                                  "-o", str(tmp_path / "d")])
    assert r.exit_code == 2 and "--min-count does not apply to --layout dlrm" in r.output
    r = CliRunner().invoke(main, ["data", "criteo", str(tmp_path / "t.txt.gz"), "--max-ind-range", "9",
                                  "-o", str(tmp_path / "d")])
    assert r.exit_code == 2 and "--max-ind-range applies to --layout dlrm only" in r.output
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(("min_count", "max_rows"), [(1, None), (2, 6)])
def test_criteo_ids_match_a_plain_python_reference(tmp_path, monkeypatch, min_count, max_rows):
    """Every id of every split against the rules written out in plain Python: vocabularies from train rows
    only, values seen >= min_count times, most frequent first, ties by hash value (missing first), at most
    max_rows - 1 values, row 0 for the rest; dense log(1 + max(x, 0))."""
    from recompress.data import criteo
    from recompress.data.ctr import split_of
    monkeypatch.setattr(criteo, "BLOCK_BYTES", 1 << 14)  # many chunks: counts merged across them
    monkeypatch.setattr(criteo, "BATCH_ROWS", 300)
    rng = np.random.default_rng(7)
    lines = [criteo_line(rng) for _ in range(2500)]
    lines[9] = lines[9].replace("a", "A")  # upper-case hex is the same value
    src = tmp_path / "t.txt"
    src.write_text("\n".join(lines) + "\n")
    d = open_dataset(prepare_criteo(src, tmp_path / "d", min_count=min_count, max_rows=max_rows, seed=2))
    fields = [ln.split("\t") for ln in lines]
    split = split_of(np.arange(len(lines)), 2, 0.1, 0.1)
    ids = np.zeros((len(lines), 26), np.int64)
    for j in range(26):
        values = [int(f[14 + j], 16) if f[14 + j] else -1 for f in fields]
        counts = {}
        for v, s in zip(values, split):
            if s == 0:
                counts[v] = counts.get(v, 0) + 1
        kept = sorted((v for v, c in counts.items() if c >= min_count), key=lambda v: (-counts[v], v))
        rank = {v: r + 1 for r, v in enumerate(kept[:(max_rows - 1) if max_rows else None])}
        ids[:, j] = [rank.get(v, 0) for v in values]
        assert d.table_rows[j] == len(rank) + 1
    dense = np.log1p(np.maximum([[int(x or 0) for x in f[1:14]] for f in fields], 0)).astype(np.float32)
    label = np.array([int(f[0]) for f in fields])
    for s, name in enumerate(("train", "val", "test")):
        got_dense, got_ids, got_label = d.arrays(name)
        assert np.array_equal(got_ids, ids[split == s]) and np.array_equal(got_label, label[split == s])
        np.testing.assert_allclose(got_dense, dense[split == s], rtol=1e-6)


def test_criteo_hash_keys_decode_every_byte_as_int_does():
    """Each 8-byte field read as a word: the values int(s, 16) gives, and every string int() refuses (or that
    holds anything but hex digits: signs, spaces, control and non-ASCII bytes) flagged."""
    import pyarrow as pa

    from recompress.data.criteo import _keys, hex_values
    rng = np.random.default_rng(0)
    alphabet = np.frombuffer(b"0123456789abcdefABCDEF", np.uint8)
    strings = [bytes(alphabet[rng.integers(0, len(alphabet), 8)]) for _ in range(2000)]
    strings += [b"ffffffff", b"00000000", b"FFFFFFFF"]
    for byte in range(256):  # one odd byte in a valid hash, at every position
        s = bytearray(b"0123abcd")
        s[byte % 8] = byte
        strings.append(bytes(s))
    strings += [b"+1234567", b" 1234567", b"0x123456", b"1_234567"]
    keys = _keys(pa.array(strings + [b""], pa.binary()), "C1", 1, "t")
    values, bad = hex_values(keys)
    for s, v, b in zip(strings, values, bad):
        ok = all(c in b"0123456789abcdefABCDEF" for c in s)
        assert b == (not ok), s
        if ok:
            assert v == int(s, 16), s
    assert values[-1] == -1 and not bad[-1]
    with pytest.raises(UserError, match="line 2: C1 value is eight NUL bytes"):
        _keys(pa.array([b"0000abcd", b"\0" * 8], pa.binary()), "C1", 1, "t")


def test_same_sized_vocabularies_in_another_order_are_refused(tmp_path):
    """Row counts alone cannot tell two vocabularies apart: a model is refused on a dataset whose ids stand for
    other values, named by table, and accepted on the data it was made from."""
    from recompress.families import get_family
    from recompress.data.sequences import prepare_sequences
    rng = np.random.default_rng(8)
    lines = [criteo_line(rng) for _ in range(2000)]
    swapped = []  # C1's two most common values exchanged everywhere: the same counts, other rows
    for ln in lines:
        f = ln.split("\t")
        f[14] = {"00000000": "00000001", "00000001": "00000000"}.get(f[14], f[14])
        swapped.append("\t".join(f))
    for name, text in (("a.txt", lines), ("b.txt", swapped)):
        (tmp_path / name).write_text("\n".join(text) + "\n")
    a = open_dataset(prepare_criteo(tmp_path / "a.txt", tmp_path / "a", min_count=1))
    b = open_dataset(prepare_criteo(tmp_path / "b.txt", tmp_path / "b", min_count=1))
    assert a.table_rows == b.table_rows
    dlrm = get_family("dlrm")
    spec = dlrm.new_spec(a, {})
    dlrm.check(spec, a)
    with pytest.raises(UserError, match="table 'C1': the rows of the model's table stand for other values"):
        dlrm.check(spec, b)
    users = [" ".join(str(x) for x in rng.integers(1, 30, 8)) for _ in range(40)]
    (tmp_path / "s.txt").write_text("\n".join(f"u{i} {u}" for i, u in enumerate(users)) + "\n")
    (tmp_path / "t.txt").write_text("\n".join(f"u{i} {u}" for i, u in enumerate(users[::-1])) + "\n")
    s, t = (open_dataset(prepare_sequences(tmp_path / f"{n}.txt", tmp_path / f"{n}d")) for n in "st")
    assert s.num_items == t.num_items
    sasrec = get_family("sasrec")
    spec = sasrec.new_spec(s, {"max_len": 8})
    sasrec.check(spec, s)
    with pytest.raises(UserError, match="table 'item'"):
        sasrec.check(spec, t)


def test_criteo_bad_hash_is_refused_while_reading_not_after(tmp_path, monkeypatch):
    """Review: a bad value on line 2 was only found once the whole file had been read and spilled."""
    from recompress.data import criteo
    rng = np.random.default_rng(6)
    lines = [criteo_line(rng) for _ in range(3000)]
    fields = lines[1].split("\t")
    fields[39] = "0000000g"
    lines[1] = "\t".join(fields)
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(criteo, "BLOCK_BYTES", 1 << 14)
    monkeypatch.setattr(criteo, "BATCH_ROWS", 250)
    parsed = []
    columns = criteo._columns
    monkeypatch.setattr(criteo, "_columns", lambda *a: parsed.append(1) or columns(*a))
    with pytest.raises(UserError, match="line 2: C26 value '0000000g' is not hexadecimal"):
        prepare_criteo(tmp_path / "t.txt", tmp_path / "out")
    assert len(parsed) <= 4  # the first chunk, and the few parsed ahead of it (12 in the file)
    with pytest.raises(UserError, match="--limit 0 reads no rows"):
        prepare_criteo(tmp_path / "t.txt", tmp_path / "out", limit=0)
