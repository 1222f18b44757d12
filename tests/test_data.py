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
