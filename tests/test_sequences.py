"""Sequence datasets: every reader, the leave-one-out split, bad input; ranking metrics."""

import gzip
import re

import numpy as np
import pytest

from recompress.data import open_dataset
from recompress.data.sequences import detect_format, prepare_sequences
from recompress.data.synthetic_sequences import make_synthetic_sequences
from recompress.errors import UserError
from recompress.metrics import METRICS, ranks

from .conftest import shared_path

USERS = {"u1": ["a", "b", "c", "d"], "u2": ["b", "c", "e"], "u3": ["a", "e"], "u4": ["d", "a", "b", "c", "e"]}


def write(tmp_path, fmt):
    """The same interactions in each format (timestamped formats get shuffled rows to test the sorting)."""
    if fmt == "lines":
        text = "".join(f"{u} {' '.join(items)}\n" for u, items in USERS.items())
        (tmp_path / "x.txt").write_text(text)
        return tmp_path / "x.txt"
    if fmt == "pairs":
        text = "".join(f"{u} {i}\n" for u, items in USERS.items() for i in items)
        with gzip.open(tmp_path / "x.txt.gz", "wt") as f:
            f.write(text)
        return tmp_path / "x.txt.gz"
    rows = [(u, i, 1000 + 10 * k) for u, items in USERS.items() for k, i in enumerate(items)]
    rows = rows[::-1]  # file order is not time order
    if fmt == "recbole":
        text = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(
            f"{u}\t{i}\t5\t{t}\n" for u, i, t in rows)
        (tmp_path / "x.inter").write_text(text)
        return tmp_path / "x.inter"
    text = "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},4.0,{t}\n" for u, i, t in rows)
    (tmp_path / "ratings.csv").write_text(text)
    return tmp_path / "ratings.csv"


def sequences(d):
    ids = np.load(d.path / "item_ids.npy")
    users = np.load(d.path / "user_ids.npy")
    return {u: [ids[i] for i in d.items[d.offsets[k]:d.offsets[k + 1]]] for k, u in enumerate(users)}


@pytest.mark.parametrize("fmt", ["lines", "pairs", "recbole", "movielens"])
def test_every_format_gives_the_same_time_ordered_sequences(tmp_path, fmt):
    src = write(tmp_path, fmt)
    assert detect_format(src) == fmt
    d = open_dataset(prepare_sequences(src, tmp_path / "d"))
    assert sequences(d) == {u: s for u, s in USERS.items() if len(s) >= 3}  # u3 has 2 items: dropped
    assert d.meta["dropped_users"] == 1 and d.num_items == 5 and d.meta["has_times"] == (fmt in ("recbole", "movielens"))
    assert d.kind == "sequences" and d.meta["format"] == fmt


def test_leave_one_out_split(tmp_path):
    d = open_dataset(prepare_sequences(write(tmp_path, "lines"), tmp_path / "d"))
    ids = list(np.load(d.path / "item_ids.npy"))
    u1 = 0  # "a b c d": train a b, val target c, test target d
    assert ids[d.items[d.history_end("val")[u1]]] == "c" and ids[d.items[d.history_end("test")[u1]]] == "d"
    hist = d.windows(np.array([u1]), d.history_end("test")[[u1]], 5)[0]
    assert [ids[i] for i in hist if i] == ["a", "b", "c"] and list(hist[:2]) == [0, 0]  # left-padded
    counts = d.id_counts()
    assert counts[ids.index("a")] == 2 and counts[ids.index("d")] == 1 and counts[ids.index("e")] == 0  # a b|b|d a b
    assert counts.sum() == 2 + 1 + 3


def test_max_len_keeps_the_most_recent(tmp_path):
    d = open_dataset(prepare_sequences(write(tmp_path, "lines"), tmp_path / "d", max_len=3))
    assert sequences(d)["u4"] == ["b", "c", "e"]


@pytest.mark.parametrize("text,fragment", [
    ("u1 a b c\nu2\nu3 a b c\n", "line 2: 1 field(s), expected a user and at least one item"),
    ("userId,movieId,rating,timestamp\n1,2,3,4\n1,2,3\n", "line 3: 3 fields, the header has 4"),
    ("userId,movieId,rating,timestamp\n1,2,3,soon\n", "line 2: timestamp 'soon' is not a number"),
])
def test_malformed_lines_name_file_and_line(tmp_path, text, fragment):
    src = tmp_path / "bad.txt"
    src.write_text(text)
    with pytest.raises(UserError, match=re.escape(fragment)) as e:
        prepare_sequences(src, tmp_path / "d", fmt="movielens" if "userId" in text else "lines")
    assert str(src) in e.value.message and not (tmp_path / "d").exists()


def test_bad_options_and_files(tmp_path):
    src = write(tmp_path, "lines")
    with pytest.raises(UserError, match="--max-len 0 is impossible"):
        prepare_sequences(src, tmp_path / "d", max_len=0)
    with pytest.raises(UserError, match="--max-len 2 leaves no user"):
        prepare_sequences(src, tmp_path / "d", max_len=2)
    short = tmp_path / "short.txt"
    short.write_text("u1 a b\nu2 c\n")
    with pytest.raises(UserError, match="no user has the 3 interactions leave-one-out needs \\(2 users dropped\\)"):
        prepare_sequences(short, tmp_path / "d", fmt="lines")
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\xff\xfe\x00\x01" * 100)
    with pytest.raises(UserError, match="not a text file"):
        prepare_sequences(binary, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_synthetic_sequences_have_a_learnable_structure(tmp_path):
    d = open_dataset(make_synthetic_sequences(tmp_path / "s", users=400, items=200, clusters=10, seed=1))
    assert d.meta["synthetic"] and d.meta["has_times"] and d.num_users == 400
    a, b = np.asarray(d.items[:-1]), np.asarray(d.items[1:])
    inside = np.ones(len(a), bool)
    inside[d.offsets[1:-1] - 1] = False  # pairs that cross users
    pairs = np.stack([a[inside], b[inside]], 1)
    _, counts = np.unique(pairs, axis=0, return_counts=True)
    # the planted successor makes a few (item, next item) pairs very common: far from uniform
    assert counts.max() > 10 * np.median(counts)
    assert (np.diff(np.asarray(d.times)[d.offsets[0]:d.offsets[1]]) >= 0).all()


@pytest.mark.shared_data
def test_real_s3rec_beauty(tmp_path):
    d = open_dataset(prepare_sequences(shared_path("data/seq_s3rec_amazon_yelp_lastfm/Beauty.txt.gz"), tmp_path / "b"))
    assert d.meta["format"] == "lines" and d.num_users == 22_363 and d.num_items == 12_101
    assert d.meta["interactions"] == 198_502


def test_ranks_break_ties_uniformly_at_random():
    """A tie is broken as a server's arbitrary pick would be, in expectation: the target's rank is uniform
    over its tie group. (Counting ties against the target gave items that share a hashed row HR@10 = 0
    whenever 10+ items share it, however well the model ranks the row.)"""
    scores = np.array([[0.9, 0.5, 0.5, 0.1], [0.9, 0.5, 0.5, 0.1]])
    assert list(ranks(scores, np.array([0, 3]))) == [0, 3]  # no ties: exact ranks
    many = 20_000
    constant = np.ones((many, 8))
    got = ranks(constant, np.zeros(many, dtype=np.int64))
    assert np.bincount(got, minlength=8).min() > many / 8 * 0.9  # uniform over 0..7, not always last
    group = np.tile([2.0, 1.0, 1.0, 1.0, 1.0, 0.0], (many, 1))  # target ties with 3 others, one ahead
    got = ranks(group, np.full(many, 2))
    assert set(np.unique(got)) == {1, 2, 3, 4} and abs(got.mean() - 2.5) < 0.03
    exclude = np.zeros_like(group, dtype=bool)
    exclude[:, [0, 1]] = True  # excluded candidates neither lead nor tie
    got = ranks(group, np.full(many, 2), exclude)
    assert set(np.unique(got)) == {0, 1, 2} and abs(got.mean() - 1.0) < 0.03
    assert (ranks(constant, np.zeros(many, dtype=np.int64)) == ranks(constant, np.zeros(many, dtype=np.int64))).all()


def test_ranking_metrics_against_their_definitions():
    r = np.array([0, 3, 9, 10, 50])
    n = np.full(5, 101)
    assert METRICS["hr@10"].value(n, r) == pytest.approx(3 / 5)
    assert METRICS["ndcg@10"].value(n, r) == pytest.approx((1 + 1 / np.log2(5) + 1 / np.log2(11)) / 5)
    assert METRICS["mrr"].value(n, r) == pytest.approx(np.mean(1 / (r + 1)))
    assert METRICS["uauc"].value(n, r) == pytest.approx(np.mean(1 - r / 100))


def test_sasrec_layout_keeps_the_files_ids_and_users_with_four_items(tmp_path):
    """SASRec.pytorch's data_partition: item N is row N (max id + 1 rows), users with fewer than 4
    interactions are train-only there, so they are not evaluated here."""
    rows = {1: [5, 9, 2, 7, 9], 2: [3, 4, 5], 3: [9, 1, 8, 2], 4: [12, 2, 3, 5, 6, 7]}
    (tmp_path / "Video.txt").write_text("".join(f"{u} {i}\n" for u, items in rows.items() for i in items))
    d = open_dataset(prepare_sequences(tmp_path / "Video.txt", tmp_path / "d", layout="sasrec"))
    assert d.num_items == 12 and d.num_users == 3 and d.meta["dropped_users"] == 1
    for u, items in enumerate([rows[1], rows[3], rows[4]]):  # the file's ids, in the file's order
        assert np.asarray(d.items[d.offsets[u]:d.offsets[u + 1]]).tolist() == items
    ours = open_dataset(prepare_sequences(tmp_path / "Video.txt", tmp_path / "o"))
    assert ours.num_items == 10 and ours.num_users == 4  # numbered by first appearance; 3 items suffice
    with pytest.raises(UserError, match="--min-items 2 leaves users"):
        prepare_sequences(tmp_path / "Video.txt", tmp_path / "x", min_items=2)
    (tmp_path / "named.txt").write_text("u1 a\nu1 b\nu1 c\nu1 d\n")
    with pytest.raises(UserError, match="item ids are not all integers"):
        prepare_sequences(tmp_path / "named.txt", tmp_path / "y", layout="sasrec")


def test_sasrec_layout_draws_negatives_outside_the_training_items_only(tmp_path):
    from recompress.families import get_family
    # user 1: train [1, 2], validation 3, test 4; user 2 has items 5..30
    (tmp_path / "s.txt").write_text("1 1\n1 2\n1 3\n1 4\n" + "".join(f"2 {i}\n" for i in range(5, 31)))
    fam = get_family("sasrec")
    drawn = {}
    for layout in ("sasrec", "recompress"):
        d = open_dataset(prepare_sequences(tmp_path / "s.txt", tmp_path / layout, layout=layout, fmt="pairs"))
        (inputs, _), = fam.eval_batches({"max_len": 4}, d, "test", "sampled", negatives=100)
        drawn[layout] = set(inputs["candidates"][0, 1:].tolist())
    assert {3, 4} <= drawn["sasrec"] and not drawn["sasrec"] & {1, 2}  # SASRec.pytorch: anything not in train[u]
    assert drawn["recompress"] <= set(range(5, 31))  # ours: items the user never had


def write_gr(path, users):
    """``sasrec_format.csv`` as generative-recommenders' DataProcessor.to_seq_data + to_csv write it: an index
    column, users shuffled, each list comma-joined (so quoted) in time order."""
    lines = ["index,user_id,sequence_item_ids,sequence_ratings,sequence_timestamps"]
    for k, (u, items) in enumerate(users.items()):
        times = [1_000_000 + 60 * j for j in range(len(items))]
        lines.append(f'{k},{u},"{",".join(map(str, items))}","{",".join("4.0" for _ in items)}",'
                     f'"{",".join(map(str, times))}"')
    path.write_text("\n".join(lines) + "\n")
    return path


GR_USERS = {7: [3, 9, 4, 12, 9], 2: [5, 3, 4], 11: [8, 3, 5, 9, 2, 6, 3], 4: [2, 20, 4, 6]}


def test_gr_layout_keeps_the_files_ids_order_and_times_and_the_catalogue(tmp_path):
    src = write_gr(tmp_path / "sasrec_format.csv", GR_USERS)
    assert detect_format(src) == "gr"
    (tmp_path / "movies.csv").write_text("movie_id,title,genres\n" + "".join(
        f'{i},"Film {i}, The (1999)",Drama\n' for i in (2, 3, 4, 5, 6, 8, 9, 12, 25)))
    d = open_dataset(prepare_sequences(src, tmp_path / "d", layout="gr", items=tmp_path / "movies.csv"))
    assert np.load(d.path / "user_ids.npy").tolist() == ["7", "2", "11", "4"]  # the file's order
    for u, items in enumerate(GR_USERS.values()):  # the file's ids as rows, in the file's order
        assert np.asarray(d.items[d.offsets[u]:d.offsets[u + 1]]).tolist() == items
    assert np.asarray(d.times[d.offsets[2]:d.offsets[3]]).tolist() == [1_000_000 + 60 * j for j in range(7)]
    assert d.num_items == 25  # rows up to the catalogue's largest id (upstream: expected_max_item_id + 1 rows)
    assert np.flatnonzero(d.catalogue).tolist() == [2, 3, 4, 5, 6, 8, 9, 12, 25]  # 20 is rated, not listed
    plain = open_dataset(prepare_sequences(src, tmp_path / "p", layout="gr"))
    assert plain.num_items == 20 and np.flatnonzero(plain.catalogue).tolist() == [2, 3, 4, 5, 6, 8, 9, 12, 20]


def test_gr_layout_shifts_zero_based_ids_by_one_as_amzn_books_reads_them(tmp_path):
    src = write_gr(tmp_path / "s.csv", {1: [0, 4, 2], 2: [3, 0, 1, 2]})
    d = open_dataset(prepare_sequences(src, tmp_path / "d", layout="gr"))
    assert np.asarray(d.items).tolist() == [1, 5, 3, 4, 1, 2, 3] and d.num_items == 5 and d.meta["id_shift"] == 1
    assert d.catalogue.tolist() == [False] + [True] * 5


def upstream_rank(scores, catalogue, window, target, max_k=2500):
    """generative-recommenders' eval_metrics_v2_from_tensors, written out: candidates = the catalogue less the
    window's ids; the target's 1-based place among them by score, or max_k + 1 when it is not among the first
    max_k (or filtered)."""
    cands = [i for i in catalogue if i not in set(window)]
    top = sorted(cands, key=lambda i: -scores[i])[:max_k]
    return top.index(target) + 1 if target in top else max_k + 1


def test_gr_layout_ranks_as_generative_recommenders_eval(tmp_path):
    """The window (max_len 3) is filtered, not the whole history: user 11's target 3 is also its first item
    (outside the window) and is ranked; user 7's target 9 is in its window, so upstream never finds it."""
    from recompress.families import get_family
    src = write_gr(tmp_path / "sasrec_format.csv", GR_USERS)
    (tmp_path / "movies.csv").write_text("movieId,title\n" + "".join(f"{i},x\n" for i in (2, 3, 4, 5, 6, 8, 9, 12, 25)))
    d = open_dataset(prepare_sequences(src, tmp_path / "d", layout="gr", items=tmp_path / "movies.csv"))
    fam = get_family("hstu")
    (inputs, truth), = fam.eval_batches({"max_len": 3}, d, "test", "full")
    assert inputs["history"].tolist() == [[9, 4, 12], [0, 5, 3], [9, 2, 6], [2, 20, 4]]
    scores = np.random.default_rng(0).normal(size=(4, d.num_items + 1))
    mine, count = fam.reduce(scores, truth)
    catalogue = np.flatnonzero(d.catalogue).tolist()
    for u, items in enumerate(GR_USERS.values()):
        expected = upstream_rank(scores[u], catalogue, items[-4:-1], items[-1])
        if items[-1] in items[-4:-1]:  # filtered: upstream gives MAX_K + 1; here it ranks after every candidate
            assert u == 0 and expected == 2501 and mine[u] == count[u] - 1 == len(set(catalogue) - set(items[-4:-1]))
        else:
            assert mine[u] + 1 == expected
    assert mine[2] + 1 == upstream_rank(scores[2], catalogue, [9, 2, 6], 3)  # in its history, not its window


@pytest.mark.parametrize("text,message", [
    ("user_id,sequence_item_ids\n1,\"1,2,3\"\n", "no sequence_timestamps column"),
    ("user_id,sequence_item_ids,sequence_timestamps\n1,\"1,2,3\",\"1,2\"\n", "has 3 items and 2 timestamps"),
    ("user_id,sequence_item_ids,sequence_timestamps\n1,\"1,2,3\",\"1,2,x\"\n", "timestamp of user 1 is not a number"),
    ("user_id,sequence_item_ids,sequence_timestamps\n1,\"1,2,3\",\"1,2,3\"\n1,\"4,5,6\",\"1,2,3\"\n",
     "user 1 has a second row"),
    ("user_id,sequence_item_ids,sequence_timestamps\n1,\"a,b,c\",\"1,2,3\"\n", "item ids are not all integers"),
    ("user_id,sequence_item_ids,sequence_timestamps\n", "has a header and no user"),
    ("user_id,sequence_item_ids,sequence_timestamps\n1,\"1,2,3\",\"1,nan,3\"\n", "not a number of seconds"),
    ("user_id,sequence_item_ids,sequence_timestamps\n1,\"1,2,3\",\"1,2,1e30\"\n", "not a number of seconds"),
    ("user_id,sequence_item_ids,sequence_timestamps\n1,\"1,2,900000000\",\"1,2,3\"\n", "almost all empty rows"),
])
def test_gr_files_that_are_wrong_are_refused_by_name(tmp_path, text, message):
    (tmp_path / "s.csv").write_text(text, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        prepare_sequences(tmp_path / "s.csv", tmp_path / "d", layout="gr", fmt="gr")
    assert not (tmp_path / "d").exists()


def test_a_gr_catalogue_must_be_one(tmp_path):
    src = write_gr(tmp_path / "s.csv", GR_USERS)
    (tmp_path / "m.csv").write_text("title\nx\n")
    with pytest.raises(UserError, match="none of the columns movie_id, movieId, item_id"):
        prepare_sequences(src, tmp_path / "d", layout="gr", items=tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("movie_id\n3\n-1\n")
    with pytest.raises(UserError, match="item id .-1. is not an integer from 0"):
        prepare_sequences(src, tmp_path / "d", layout="gr", items=tmp_path / "m.csv")
    with pytest.raises(UserError, match="--items names the catalogue of --layout gr"):
        prepare_sequences(src, tmp_path / "d", items=tmp_path / "m.csv")
    assert not (tmp_path / "d").exists()


def test_gr_catalogue_as_a_count_and_in_the_fingerprint(tmp_path):
    """amzn-books ranks ids 1..expected_num_unique_items, codes the file may lack (a review found the catalogue
    could not be given for 0-based files, and two catalogues gave one fingerprint)."""
    src = write_gr(tmp_path / "s.csv", {1: [0, 4, 2], 2: [3, 0, 1, 2]})  # codes 0..4; 5 and 6 never occur
    d = open_dataset(prepare_sequences(src, tmp_path / "d", layout="gr", items="7"))
    assert d.num_items == 7 and np.flatnonzero(d.catalogue).tolist() == list(range(1, 8))
    (tmp_path / "m.csv").write_text("item_id\n0\n1\n2\n3\n4\n")  # a list in the file's own 0-based codes
    listed = open_dataset(prepare_sequences(src, tmp_path / "l", layout="gr", items=tmp_path / "m.csv"))
    assert np.flatnonzero(listed.catalogue).tolist() == [1, 2, 3, 4, 5] and listed.num_items == 5
    plain = open_dataset(prepare_sequences(src, tmp_path / "p", layout="gr"))
    assert np.flatnonzero(plain.catalogue).tolist() == [1, 2, 3, 4, 5] and plain.num_items == 5
    (tmp_path / "m.csv").write_text("item_id\n0\n1\n2\n3\n")
    fewer = open_dataset(prepare_sequences(src, tmp_path / "f", layout="gr", items=tmp_path / "m.csv"))
    assert fewer.num_items == 5 and fewer.fingerprint != listed.fingerprint  # same path, same items, other catalogue


def test_gr_rows_longer_than_the_csv_field_limit_are_read(tmp_path):
    items = list(range(1, 15_001))
    d = open_dataset(prepare_sequences(write_gr(tmp_path / "s.csv", {9: items}), tmp_path / "d", layout="gr"))
    assert np.asarray(d.items).tolist() == items


def test_a_gr_file_with_a_byte_order_mark_is_read(tmp_path):
    text = "\ufeffuser_id,sequence_item_ids,sequence_timestamps\n1,\"1,2,3\",\"1,2,3\"\n"  # a BOM is not a column
    (tmp_path / "s.csv").write_text(text, encoding="utf-8")
    assert open_dataset(prepare_sequences(tmp_path / "s.csv", tmp_path / "d", layout="gr")).num_users == 1


def test_a_short_catalogue_row_is_refused_by_line(tmp_path):
    src = write_gr(tmp_path / "s.csv", GR_USERS)
    (tmp_path / "m.csv").write_text("title,movie_id\nx,3\ny\n")
    with pytest.raises(UserError, match="m.csv line 3: 1 fields, no item id"):
        prepare_sequences(src, tmp_path / "d", layout="gr", items=tmp_path / "m.csv")


def test_sampled_negatives_of_a_gr_dataset_come_from_its_catalogue(tmp_path):
    """Found by the review: negatives were drawn over every row, most of them ids outside the catalogue."""
    from recompress.families import get_family
    src = write_gr(tmp_path / "s.csv", GR_USERS)
    (tmp_path / "m.csv").write_text("movie_id\n" + "".join(f"{i}\n" for i in (2, 3, 4, 5, 6, 8, 9, 12, 25, 400)))
    d = open_dataset(prepare_sequences(src, tmp_path / "d", layout="gr", items=tmp_path / "m.csv"))
    (inputs, _), = get_family("hstu").eval_batches({"max_len": 3}, d, "test", "sampled", negatives=50)
    drawn = set(inputs["candidates"][:, 1:].ravel().tolist())
    assert drawn <= {2, 3, 4, 5, 6, 8, 9, 12, 25, 400} and 400 in drawn and d.num_items == 400
