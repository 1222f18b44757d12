"""TorchRec's BERT4Rec example: its saved state dicts rebuilt to score as the example's own forward (written out
here from its formulas, on the inputs its evaluation builds), evaluated, compressed, exported and trained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from click.testing import CliRunner

from recompress.adapters import describe, load_any
from recompress.cli import main
from recompress.errors import UserError
from recompress.families import get_family

from .test_sequential_models import seq_data  # noqa: F401 (fixture)
from .test_upstream_formats import cli

N, L, D, FFN = 150, 12, 16, 64  # seq_data's items; the example's max_len, emb_dim and 4 * emb_dim
VOCAB, MASK = N + 2, N + 1  # the example's vocab_size: padding 0, items, mask token


def example_state(blocks=2, seed=0, prefix="module.", vocab=VOCAB):
    """A state dict in the layout bert4rec_main.py saves (DDP's ``module.``), random weights."""
    VOCAB = vocab  # noqa: N806
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3
    sd = {"history.positional": r(L, D), "history.layernorm.weight": 1 + r(L, D), "history.layernorm.bias": r(L, D),
          "history.ec.embeddings.item_embedding.weight": r(VOCAB, D), "out.weight": r(VOCAB, D), "out.bias": r(VOCAB)}
    for i in range(blocks):
        b = f"transformer_blocks.{i}."
        for j in range(3):
            sd[f"{b}attention.linear_layers.{j}.weight"], sd[f"{b}attention.linear_layers.{j}.bias"] = r(D, D), r(D)
        sd[b + "attention.output_linear.weight"], sd[b + "attention.output_linear.bias"] = r(D, D), r(D)
        sd[b + "feed_forward.w_1.weight"], sd[b + "feed_forward.w_1.bias"] = r(FFN, D), r(FFN)
        sd[b + "feed_forward.w_2.weight"], sd[b + "feed_forward.w_2.bias"] = r(D, FFN), r(D)
        for norm in ("input_sublayer.norm", "output_sublayer.norm"):
            sd[f"{b}{norm}.weight"], sd[f"{b}{norm}.bias"] = 1 + r(D), r(D)
    return {prefix + k: v for k, v in sd.items()}


def example_tokens(items_of_user):
    """The example's _generate_labeled_eval_set: history + [mask], its last max_len, left-padded with 0."""
    rows = []
    for seq in items_of_user:
        tokens = (list(seq) + [MASK])[-L:]
        rows.append([0] * (L - len(tokens)) + tokens)
    return torch.tensor(rows)


def example_scores(sd, tokens, heads):
    """BERT4Rec.forward of the example, step by step, at the last slot: item rows (padding id 0 looked up) plus
    positional, layer norm over [L, d], pre-LN blocks (q/k/v linears, keys masked where the id is 0 with -1e9,
    output_linear; ReLU feed-forward), no final norm, then ``out``."""
    w = lambda k: sd["module." + k]
    lin = lambda x, p: x @ w(p + ".weight").T + w(p + ".bias")
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], w(p + ".weight"), w(p + ".bias"), 1e-5)
    x = w("history.ec.embeddings.item_embedding.weight")[tokens] + w("history.positional")
    x = F.layer_norm(x, (L, D), w("history.layernorm.weight"), w("history.layernorm.bias"), 1e-5)
    mask = (tokens > 0)[:, None, None, :]
    for i in range(2):
        b = f"transformer_blocks.{i}."
        y = ln(x, b + "input_sublayer.norm")
        split = lambda t: t.view(len(t), L, heads, D // heads).transpose(1, 2)
        q, k, v = (split(lin(y, f"{b}attention.linear_layers.{j}")) for j in range(3))
        s = (q @ k.transpose(-2, -1) / (D // heads) ** 0.5).masked_fill(~mask, -1e9)
        x = x + lin((s.softmax(-1) @ v).transpose(1, 2).reshape(len(x), L, D), b + "attention.output_linear")
        x = x + lin(torch.relu(lin(ln(x, b + "output_sublayer.norm"), b + "feed_forward.w_1")), b + "feed_forward.w_2")
    return lin(x, "out")[:, -1]


def user_sequences(data, n=8):
    """Test histories of n users, long and short (shortest first), and recompress's window of each."""
    ends = data.history_end("test")
    lengths = ends - data.offsets[:-1]
    users = np.concatenate([np.argsort(lengths, kind="stable")[: n // 2], np.flatnonzero(lengths > L + 3)[: n // 2]])
    seqs = [np.asarray(data.items[data.offsets[u]:ends[u]]).tolist() for u in users]
    return seqs, torch.from_numpy(data.windows(users, ends[users], L))


def write_example(path, sd):
    torch.save(sd, path)
    return path


def test_the_examples_state_dict_scores_as_its_own_forward(seq_data, tmp_path):  # noqa: F811
    sd = example_state()
    path = write_example(tmp_path / "epoch_10_model.pth", sd)
    found = describe(path)
    assert found.format == "torchrec-bert4rec" and found.family == "bert4rec"
    assert [(t.name, t.rows, t.dim) for t in found.tables] == [("item", VOCAB, D), ("position", L + 1, D),
                                                              ("output", VOCAB, D)]
    assert {k: found.hparams[k] for k in ("num_items", "max_len", "blocks", "ffn_dim", "flavor")} == \
        {"num_items": N, "max_len": L, "blocks": 2, "ffn_dim": FFN, "flavor": "torchrec"}
    assert "heads" in found.missing  # the example never saves --nhead
    with pytest.raises(UserError, match="does not say heads"):
        load_any(path)
    ck = load_any(path, {"heads": "2"})
    seqs, history = user_sequences(seq_data)
    assert min(map(len, seqs)) < L - 1 < max(map(len, seqs))  # padded windows and cut ones
    with torch.no_grad():
        want = example_scores(sd, example_tokens(seqs), heads=2)
        got = ck.model(history, torch.arange(VOCAB)[None])
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    with torch.no_grad():  # the heads matter: the same file read with 4 heads scores otherwise
        assert not torch.allclose(load_any(path, {"heads": "4"}).model(history, torch.arange(VOCAB)[None]), want,
                                  atol=1e-2)


def test_padding_is_a_row_and_the_window_norm_mixes_every_slot(seq_data, tmp_path):  # noqa: F811
    """The example looks id 0 up (its row is trained) and normalizes over the whole window: changing row 0 changes
    the scores of a padded history and not of a full one."""
    sd = example_state()
    seqs, history = user_sequences(seq_data)
    padded = torch.tensor([len(s) < L - 1 for s in seqs])
    other = dict(sd)
    other["module.history.ec.embeddings.item_embedding.weight"] = sd["module.history.ec.embeddings.item_embedding.weight"].clone()
    other["module.history.ec.embeddings.item_embedding.weight"][0] += 1.0
    scores = []
    for name, state in (("a.pth", sd), ("b.pth", other)):
        with torch.no_grad():
            scores.append(load_any(write_example(tmp_path / name, state), {"heads": "2"}).model(
                history, torch.arange(1, N + 1)[None]))
    moved = (scores[0] - scores[1]).abs().amax(1) > 1e-3
    assert torch.equal(moved, padded), (moved, padded)


def test_files_that_contradict_themselves_are_refused(tmp_path):
    sd = example_state()
    sd["module.out.bias"] = sd["module.out.bias"][:-1]
    with pytest.raises(UserError, match=r"out.bias is \[151\], expected \[152\]"):
        describe(write_example(tmp_path / "a.pth", sd))
    sd = {k: v for k, v in example_state().items() if "linear_layers.1.bias" not in k}
    with pytest.raises(UserError, match="without transformer_blocks.0.attention.linear_layers.1.bias"):
        load_any(write_example(tmp_path / "b.pth", sd), {"heads": "2"})
    with pytest.raises(UserError, match="heads = 3 does not divide the width 16"):
        load_any(write_example(tmp_path / "c.pth", example_state()), {"heads": "3"})


def test_the_example_evaluates_compresses_and_exports(seq_data, tmp_path):  # noqa: F811
    path = write_example(tmp_path / "epoch_10_model.pth", example_state())
    data = seq_data.path
    res = cli("evaluate", path, "--hp", "heads=2", "--data", data, "--no-latency", "--json", tmp_path / "base.json")
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())  # not silent: warned, however the terminal wraps it
    assert "was prepared with --layout recompress: the example numbers ids its own way" in said, said
    res = cli("checkpoint", path, "--hp", "heads=2", "--method", "int8", "-o", tmp_path / "q")
    assert res.exit_code == 0, res.output
    spec = json.loads((tmp_path / "q" / "spec.json").read_text())
    quant = {t["name"]: t.get("params", {}).get("quant", {}).get("dtype") for t in spec["tables"]}
    assert quant == {"item": "int8", "position": None, "output": "int8"}  # both id tables, by their roles
    res = cli("checkpoint", path, "--hp", "heads=2", "--method", "mlet", "--dim", 8, "-o", tmp_path / "m")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output  # post-training MLET: DLRM only
    res = cli("checkpoint", path, "--hp", "heads=2", "--method", "lowrank", "--rank", 8, "-o", tmp_path / "r")
    assert res.exit_code == 0, res.output
    for name in ("q", "r"):
        res = cli("export", tmp_path / name, "--data", data, "-o", tmp_path / f"x{name}")
        assert res.exit_code == 0, res.output
        manifest = json.loads((tmp_path / f"x{name}" / "manifest.json").read_text())
        assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_diff"] < 1e-4, manifest["parity"]
    res = cli("evaluate", tmp_path / "xq", "--data", data, "--no-latency", "--compare", tmp_path / "base.json",
              "--json", tmp_path / "x.json")
    assert res.exit_code == 0, res.output
    base = json.loads((tmp_path / "base.json").read_text())["accuracy"]["torch"]["ndcg@10"]
    onnx = json.loads((tmp_path / "x.json").read_text())["accuracy"]
    assert abs(next(iter(onnx.values()))["ndcg@10"] - base) < 0.02


def test_cloze_windows_and_training_scores_match_serving(seq_data):  # noqa: F811
    """TorchRec's flavor trains on the window of the last max_len training items, the last one masked: with no
    other slot masked, its last logits are the scores forward() gives after the history before that item."""
    fam = get_family("bert4rec")
    model = fam.from_spec(fam.new_spec(seq_data, {"dim": 16, "max_len": L, "mask_ratio": 0.0, "negatives": 5,
                                                  "flavor": "torchrec"}))
    fam.init(model, 0)
    with torch.no_grad():
        model.output_bias.normal_(0, 1.0, generator=torch.Generator().manual_seed(2))
        model.tables["item"].weight[0].normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    model.eval()
    (batch,) = fam.batches(model, seq_data, seq_data.num_users, seed=0)
    h, t = batch["history"].numpy(), batch["targets"].numpy()
    ends = seq_data.history_end("train")
    want = {tuple([0] * (L - len(s)) + s) for s in
            (np.asarray(seq_data.items[max(seq_data.offsets[u], ends[u] - L):ends[u]]).tolist()
             for u in range(seq_data.num_users))}
    assert {tuple(r) for r in np.where(h == MASK, t, h)} == want and (h[:, -1] == MASK).all()
    with torch.no_grad():
        pos, neg = model.train_logits(batch["history"], batch["targets"], batch["negatives"])
    rows = {tuple(np.where(r == MASK, tt, r)): i for i, (r, tt) in enumerate(zip(h, t))}
    users = np.arange(seq_data.num_users)
    order = [rows[tuple(w)] for w in seq_data.windows(users, ends, L)]
    history = torch.from_numpy(seq_data.windows(users, ends - 1, L))
    target = torch.from_numpy(np.asarray(seq_data.items)[ends - 1].astype(np.int64))
    with torch.no_grad():
        assert torch.allclose(pos[order, -1], model(history, target[:, None])[:, 0], atol=1e-5)
        assert torch.allclose(neg[order, -1], model(history, batch["negatives"][None]), atol=1e-5)


def test_training_the_torchrec_flavor_learns_the_planted_structure(seq_data, tmp_path):  # noqa: F811
    common = ("--data", seq_data.path, "--model", "bert4rec", "--flavor", "torchrec", "--dim", 16, "--max-len", L)
    assert cli("train", *common, "--epochs", 8, "--lr", 0.01, "-o", tmp_path / "m").exit_code == 0
    assert cli("train", *common, "--steps", 0, "-o", tmp_path / "z").exit_code == 0
    spec = json.loads((tmp_path / "m" / "spec.json").read_text())
    assert {k: spec["hparams"][k] for k in ("flavor", "activation", "ln_eps", "ffn_dim")} == \
        {"flavor": "torchrec", "activation": "relu", "ln_eps": 1e-5, "ffn_dim": 64}
    scores = []
    for m in ("m", "z"):
        assert cli("evaluate", tmp_path / m, "--data", seq_data.path, "--split", "val", "--no-latency",
                   "--json", tmp_path / f"{m}.json").exit_code == 0
        scores.append(json.loads((tmp_path / f"{m}.json").read_text())["accuracy"]["torch"]["ndcg@10"])
    assert scores[0] > 3 * scores[1] + 0.03, scores
    res = cli("train", "--data", seq_data.path, "--model", "sasrec", "--flavor", "torchrec", "-o", tmp_path / "s")
    assert res.exit_code == 2 and "not a sasrec choice" in res.output, res.output


def example_preprocessing(rows, seed):
    """TorchRec's Bert4RecPreprocsser on (user, item, rating, timestamp) rows, in its steps, with plain Python in
    place of pandas (the same operations: a filter on user counts, set() numbering, a quicksort of each user's
    timestamps, a Counter of every split, np.random.choice from the global generator)."""
    from collections import Counter
    counts = Counter(r[0] for r in rows)
    rows = [r for r in rows if counts[r[0]] >= 5]
    umap = {u: i for i, u in enumerate(set(r[0] for r in rows))}  # noqa: C401
    smap = {s: i + 1 for i, s in enumerate(set(r[1] for r in rows))}  # noqa: C401
    groups = {}
    for u, s, _, t in rows:
        groups.setdefault(umap[u], []).append((smap[s], t))
    seqs = {}
    for u, g in groups.items():
        order = np.array([t for _, t in g], dtype=np.int64).argsort(kind="quicksort")
        seqs[u] = [g[i][0] for i in order]
    popularity = Counter()
    for u in range(len(umap)):
        popularity.update(seqs[u])
    items, freq = zip(*popularity.items())
    prob = [f / sum(freq) for f in freq]
    np.random.seed(seed)
    negatives = {}
    for u in range(len(umap)):
        samples = []
        while len(samples) < 100:
            samples.extend(x for x in np.random.choice(items, 200, replace=False, p=prob) if x not in set(seqs[u]))
        negatives[u] = samples[:100]
    return umap, smap, seqs, negatives


def ratings_file(path, seed=0):
    """A MovieLens ratings.csv: 40 users (one with 4 ratings, one with 700 of the 800 items, whose negatives take
    several draws), ids far from 1..N (a set of them iterates in another order than it was filled: they collide
    in its table), same-second ratings."""
    rng = np.random.default_rng(seed)
    catalogue = rng.choice(np.arange(10, 200_000, 7), 800, replace=False)  # a set of these iterates in another order
    rows = []
    for u in rng.permutation(np.arange(1000, 1040)):  # 1007: too few ratings; 1013: so many that draws repeat
        n = 4 if u == 1007 else 700 if u == 1013 else int(rng.integers(5, 30))
        items = rng.choice(catalogue, n, replace=False)
        times = 1_000_000 + np.sort(rng.integers(0, 40, n))  # many ties
        rows += [(int(u), int(i), 4.0, int(t)) for i, t in zip(items, rng.permutation(times))]
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    path.write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows))
    return rows


def test_the_torchrec_layout_numbers_orders_and_draws_as_the_example(tmp_path):
    from recompress.data import open_dataset
    rows = ratings_file(tmp_path / "ratings.csv")
    assert cli("data", "sequences", tmp_path / "ratings.csv", "--layout", "torchrec", "--seed", 3,
               "-o", tmp_path / "d").exit_code == 0
    data = open_dataset(tmp_path / "d")
    umap, smap, seqs, negatives = example_preprocessing(rows, seed=3)
    assert data.num_users == len(umap) == 39 and data.num_items == len(smap)
    assert [int(u) for u in np.load(tmp_path / "d" / "user_ids.npy")] == sorted(umap, key=umap.get)
    ids = np.load(tmp_path / "d" / "item_ids.npy")[1:]
    assert [int(i) for i in ids] == sorted(smap, key=smap.get)  # row i is the example's id i
    for u in range(data.num_users):
        assert np.asarray(data.items[data.offsets[u]:data.offsets[u + 1]]).tolist() == seqs[u]
    assert data.negatives.tolist() == [negatives[u] for u in range(data.num_users)]
    assert any(len(set(row)) < len(row) for row in negatives.values())  # a later block repeated an item, kept
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["order_by"].startswith(f"numpy {np.__version__}")
    fam = get_family("bert4rec")
    (inputs, truth), = fam.eval_batches({"max_len": L}, data, "test", "sampled", batch_size=100)
    want = [[seqs[u][-1], *negatives[u]] for u in range(data.num_users)]
    assert inputs["candidates"].tolist() == want and (truth[0] == 0).all()
    (inputs, _), = fam.eval_batches({"max_len": L}, data, "val", "sampled", batch_size=100, negatives=30)
    assert inputs["candidates"].tolist() == [[seqs[u][-2], *negatives[u][:30]] for u in range(data.num_users)]
    with pytest.raises(UserError, match="stores 100 negatives per user"):
        next(fam.eval_batches({"max_len": L}, data, "test", "sampled", negatives=101))
    timing = fam.latency_inputs({"max_len": L}, data, batch=4, count=2, candidates=150)  # timing draws its own
    assert [x["candidates"].shape for x in timing] == [(4, 150), (4, 150)]


def test_the_torchrec_layout_refuses_what_the_example_cannot_reproduce(tmp_path):
    ratings_file(tmp_path / "ratings.csv")
    res = cli("data", "sequences", tmp_path / "ratings.csv", "--layout", "torchrec", "--max-len", 10, "-o", tmp_path / "a")
    assert res.exit_code == 2 and "--max-len cuts each user's sequence" in res.output, res.output
    (tmp_path / "s.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(
        f"u{u},m{i},4.0,{i}\n" for u in range(3) for i in range(6)))
    res = cli("data", "sequences", tmp_path / "s.csv", "--layout", "torchrec", "-o", tmp_path / "b")
    assert res.exit_code == 2 and "ids are not all integers" in res.output, res.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    (tmp_path / "z.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(
        f"{u},{i:03d},4.0,{i}\n" for u in range(1, 4) for i in range(1, 7)))
    res = cli("data", "sequences", tmp_path / "z.csv", "--layout", "torchrec", "-o", tmp_path / "c")
    assert res.exit_code == 2 and "id '001' is not written as the integer pandas reads (1)" in res.output, res.output
    (tmp_path / "p.txt").write_text("".join(f"{u} {i}\n" for u in range(3) for i in range(1, 7)))
    res = cli("data", "sequences", tmp_path / "p.txt", "--layout", "torchrec", "-o", tmp_path / "d")
    assert res.exit_code == 2 and "is a pairs file and --layout torchrec reads movielens or movielens-dat" in res.output
    res = cli("data", "sequences", tmp_path / "ratings.csv", "--layout", "torchrec", "--seed", -1, "-o", tmp_path / "g")
    assert res.exit_code == 2 and "--seed -1 is not a seed of NumPy's legacy generator" in res.output, res.output
    res = cli("data", "sequences", tmp_path / "ratings.csv", "--layout", "torchrec", "--min-items", 1000,
              "-o", tmp_path / "h")
    assert res.exit_code == 2 and "has the 1000 ratings the example keeps a user for" in res.output, res.output
    from recompress.data.sequences import prepare_sequences
    with pytest.raises(UserError, match="sequence files take no setting 'samples'"):
        prepare_sequences(tmp_path / "ratings.csv", tmp_path / "i", samples=5)
    res = cli("data", "sequences", tmp_path / "ratings.csv", "--seed", 3, "-o", tmp_path / "e")
    assert res.exit_code == 2 and "--seed draws the negatives of --layout torchrec" in res.output, res.output
    rows = [(u, i, 4.0, i) for u in (1, 2) for i in range(1, 206)] + [(3, i, 4.0, i) for i in range(1, 250)]
    (tmp_path / "all.csv").write_text("userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n"
                                                                                     for u, i, r, t in rows))
    res = cli("data", "sequences", tmp_path / "all.csv", "--layout", "torchrec", "-o", tmp_path / "f")
    assert res.exit_code == 2 and "user 3 has had every one of the 249 items" in res.output, res.output
    assert not any((tmp_path / x).exists() for x in "cdefghi")


@pytest.mark.parametrize("damage", ["rows", "value"])
def test_damaged_stored_negatives_are_named(tmp_path, damage):
    ratings_file(tmp_path / "ratings.csv")
    res = cli("data", "sequences", tmp_path / "ratings.csv", "--layout", "torchrec", "-o", tmp_path / "d")
    assert res.exit_code == 0, res.output
    neg = np.load(tmp_path / "d" / "negatives.npy")
    if damage == "rows":
        np.save(tmp_path / "d" / "negatives.npy", neg[:-3])
    else:
        neg[5, 7] = 10**6
        np.save(tmp_path / "d" / "negatives.npy", neg)
    items = json.loads((tmp_path / "d" / "meta.json").read_text())["num_items"]
    write_example(tmp_path / "m.pth", example_state(vocab=items + 2))
    res = cli("evaluate", tmp_path / "m.pth", "--hp", "heads=2", "--data", tmp_path / "d", "--no-latency")
    said = "holds int32 [36, 100], not the negatives of 39 users" if damage == "rows" else "item 1000000 is outside"
    assert res.exit_code == 2 and "negatives.npy" in res.output and said in res.output, res.output


SHARD = '''
import os, sys, torch, torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata, init_from_local_shards

def work(rank, out, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    sd = torch.load(os.path.join(out, "full.pt"))
    key = "history.ec.embeddings.item_embedding.weight"  # what DMP saves: column-wise, 10 + 6 columns
    v = sd[key]
    off, n = (0, 10) if rank == 0 else (10, v.shape[1] - 10)
    shard = Shard(v[:, off:off + n].clone(), ShardMetadata([0, off], [v.shape[0], n], f"rank:{rank}/cpu"))
    state = {**sd, key: init_from_local_shards([shard], list(v.shape))}
    torch.save(state, os.path.join(out, "ranks", f"epoch_10_model_rank{rank}.pth"))
    dcp.save(state, checkpoint_id=os.path.join(out, "dcp"))
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(work, args=(sys.argv[1], int(sys.argv[2])), nprocs=2)
'''


def test_sharded_saves_of_the_example_merge_offline(seq_data, tmp_path):  # noqa: F811
    """DMP's state dict holds the item table as a ShardedTensor: per-rank files and a DCP folder of two ranks
    score as the plain file does, read without a process group."""
    import os
    import subprocess
    import sys
    sd = {k.removeprefix("module."): v for k, v in example_state().items()}
    torch.save(sd, tmp_path / "full.pt")
    (tmp_path / "ranks").mkdir()
    (tmp_path / "shard.py").write_text(SHARD)
    r = subprocess.run([sys.executable, str(tmp_path / "shard.py"), str(tmp_path), str(29600 + os.getpid() % 300)],
                       capture_output=True, text=True, timeout=300, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    _, history = user_sequences(seq_data)
    with torch.no_grad():
        want = example_scores({"module." + k: v for k, v in sd.items()}, example_tokens(user_sequences(seq_data)[0]), 2)
        for where in ("ranks", "dcp"):
            got = load_any(tmp_path / where, {"heads": "2"}).model(history, torch.arange(VOCAB)[None])
            assert torch.allclose(got, want, atol=1e-4), (where, (got - want).abs().max())


def test_ml1m_ratings_dat_reads_as_its_csv_does(tmp_path):
    """The example's default data is ML-1M's ratings.dat (u::i::rating::time, no header): the same rows as a
    ratings.csv give the same dataset, draws included."""
    rows = ratings_file(tmp_path / "ratings.csv")
    (tmp_path / "ratings.dat").write_text("".join(f"{u}::{i}::{int(r)}::{t}\n" for u, i, r, t in rows))
    for name in ("ratings.csv", "ratings.dat"):
        assert cli("data", "sequences", tmp_path / name, "--layout", "torchrec", "-o", tmp_path / name[-3:]).exit_code == 0
    assert json.loads((tmp_path / "dat" / "meta.json").read_text())["format"] == "movielens-dat"
    for array in ("items", "offsets", "times", "negatives", "item_ids", "user_ids"):
        assert np.array_equal(np.load(tmp_path / "csv" / f"{array}.npy"), np.load(tmp_path / "dat" / f"{array}.npy"))
    (tmp_path / "bad.dat").write_text("1::2::3::4\n1::2::3\n")
    res = cli("data", "sequences", tmp_path / "bad.dat", "--format", "movielens-dat", "-o", tmp_path / "bad")
    assert res.exit_code == 2 and "line 2: 3 fields, expected UserID::MovieID::Rating::Timestamp" in res.output


def test_a_recipe_starts_from_the_examples_file(tmp_path):
    """``[baseline] checkpoint``: one run from an upstream file to compressed variants, exports and a report; the
    baseline scores what ``evaluate`` gives the file itself; what the file lacks is named before anything runs."""
    from .test_cli import assert_user_error
    from .test_pipeline_gate import cli as run_cli, rows_of
    write_example(tmp_path / "epoch_10_model.pth", example_state())
    recipe = f"""name = "b4r"
[data]
kind = "synthetic-sequences"
users = 300
items = {N}
mean_len = 12
[baseline]
checkpoint = "epoch_10_model.pth"
hp = ["heads=2"]
[[variants]]
method = "int8"
[[variants]]
name = "lowrank-r8"
method = "lowrank"
rank = 8
[export]
targets = ["onnx"]
[evaluate]
latency = false
"""
    (tmp_path / "r.toml").write_text(recipe)
    res = run_cli("run", tmp_path / "r.toml", "-o", tmp_path / "run")
    assert res.exit_code == 0, res.output
    rows = {(x["variant"], x["target"]): x for x in rows_of(tmp_path / "run")}
    assert {v for v, _ in rows} == {"baseline", "int8", "lowrank-r8"}
    data = next((tmp_path / "run" / "cache").glob("data-*"))
    assert cli("evaluate", tmp_path / "epoch_10_model.pth", "--hp", "heads=2", "--data", data, "--no-latency",
               "--json", tmp_path / "direct.json").exit_code == 0
    direct = json.loads((tmp_path / "direct.json").read_text())["accuracy"]["torch"]["ndcg@10"]
    base = [x for (v, _), x in rows.items() if v == "baseline"]
    assert all(x["metrics"]["ndcg@10"] == pytest.approx(direct, abs=1e-6) for x in base), (base, direct)
    assert f"Baseline: the trained checkpoint {tmp_path / 'epoch_10_model.pth'} (read with heads=2)." in \
        (tmp_path / "run" / "report.md").read_text()
    int8 = [x for (v, _), x in rows.items() if v == "int8"][0]
    position = (L + 1) * D * 4
    assert base[0]["emb_bytes"] == 2 * VOCAB * D * 4 + position
    assert int8["emb_bytes"] == 2 * VOCAB * (D + 8) + position  # both id tables: int8 rows, fp32 scale and offset
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [x["cached"] for x in summary["steps"] if x["label"] == "baseline" and x["step"] == "ckpt"] == [False]
    for sets, reused in (((), True), (("--set", "train.lr=0.002"), False)):  # [train] budgets fine-tunes: in the key
        assert run_cli("run", tmp_path / "r.toml", "-o", tmp_path / "run", *sets).exit_code == 0
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert [x["cached"] for x in summary["steps"] if x["label"] == "baseline" and x["step"] == "ckpt"] == [reused]
    torch.save({"embedding_bags.t0.weight": torch.zeros(4, 2)}, tmp_path / "bare.pth")  # tables, no model
    (tmp_path / "parts.toml").write_text('name = "p"\nparts = ["r.toml"]\n[baseline]\ncheckpoint = "x"\n')
    for wrong, said in ((recipe.replace('hp = ["heads=2"]\n', ""), 'does not say heads'),
                        (recipe.replace('checkpoint = "epoch_10_model.pth"\n', ""), "[baseline] without a checkpoint"),
                        (recipe.replace("epoch_10_model.pth", "bare.pth").replace('hp = ["heads=2"]\n', ""),
                         "no model recompress can rebuild"),
                        (recipe + "[train]\ndim = 16\n", "train.dim shapes a model trained here"),
                        (recipe.replace('checkpoint = "epoch_10_model.pth"', 'checkpoint = ""'), "checkpoint is empty"),
                        (recipe.replace("[data]", '[data]\nlayout = "torchrec"'), "data.layout is for kind"),
                        (recipe.replace("[[variants]]\nmethod = \"int8\"", "[[variants]]\nmethod = \"int8\"\n"
                                        "from_scratch = true"), "trains from scratch"),
                        (recipe + "[train]\nmodel = \"sasrec\"\n", "holds a bert4rec model"),
                        (recipe.replace("epoch_10_model.pth", "nothing.pth"), "baseline.checkpoint")):
        (tmp_path / "w.toml").write_text(wrong)
        res = CliRunner().invoke(main, ["run", str(tmp_path / "w.toml"), "-o", str(tmp_path / "w")])
        assert_user_error(res, said)
        assert not (tmp_path / "w").exists()
    res = CliRunner().invoke(main, ["run", str(tmp_path / "parts.toml"), "-o", str(tmp_path / "w")])
    assert_user_error(res, "has parts and a [baseline]")
    inside = tmp_path / "run" / "model.pth"  # a checkpoint inside the run folder is an input: never replaced
    (tmp_path / "epoch_10_model.pth").rename(inside)
    (tmp_path / "in.toml").write_text(recipe.replace("epoch_10_model.pth", "run/model.pth"))
    res = CliRunner().invoke(main, ["run", str(tmp_path / "in.toml"), "-o", str(tmp_path / "run"), "--overwrite"])
    assert res.exit_code == 2 and inside.exists(), res.output


def test_the_cache_tells_same_size_weights_apart(tmp_path):
    """A copy of other weights of the same size that kept the file's times (cp -p, rsync -a) is another key."""
    import os

    from recompress.pipeline import files_key
    f = tmp_path / "w.bin"
    for size in (1000, 3 << 20):  # small: hashed whole; large: its first and last MiB
        data = bytearray(size)
        f.write_bytes(bytes(data))
        os.utime(f, ns=(10**18, 10**18))
        before = files_key(f)
        data[-5] = 1
        f.write_bytes(bytes(data))
        os.utime(f, ns=(10**18, 10**18))
        assert files_key(f) != before and files_key(f)[0][1:3] == before[0][1:3]


def test_evaluate_scores_the_stored_candidates_by_default(tmp_path):
    """On a --layout torchrec dataset, evaluate's default protocol is the example's: the target among the stored
    100 negatives (NDCG@10 recomputed here from the model's scores of exactly those candidates)."""
    from recompress.data import open_dataset
    ratings_file(tmp_path / "ratings.csv")
    res = cli("data", "sequences", tmp_path / "ratings.csv", "--layout", "torchrec", "-o", tmp_path / "d")
    assert res.exit_code == 0, res.output
    data = open_dataset(tmp_path / "d")
    write_example(tmp_path / "m.pth", example_state(vocab=data.num_items + 2))
    res = cli("evaluate", tmp_path / "m.pth", "--hp", "heads=2", "--data", tmp_path / "d", "--no-latency",
              "--json", tmp_path / "r.json")
    assert res.exit_code == 0 and "warning" not in res.output, res.output
    got = json.loads((tmp_path / "r.json").read_text())
    users = np.arange(data.num_users)
    ends = data.history_end("test")
    cands = np.concatenate([np.asarray(data.items)[ends][:, None], data.negatives], axis=1).astype(np.int64)
    with torch.no_grad():
        scores = load_any(tmp_path / "m.pth", {"heads": "2"}).model(torch.from_numpy(data.windows(users, ends, L)),
                                                                    torch.from_numpy(cands)).numpy()
    rank = (scores[:, 1:] > scores[:, :1]).sum(1)
    assert got["data"]["protocol"] == "sampled"
    assert got["accuracy"]["torch"]["ndcg@10"] == pytest.approx(np.mean(np.where(rank < 10, 1 / np.log2(rank + 2), 0)))


def test_dropout_sits_where_the_example_puts_it(seq_data):  # noqa: F811
    """In training, with every dropout replaced by a deterministic stand-in (x 2), the encoder computes the
    example's forward with its dropouts in their places: after the input norm; in each block after the attention
    output, after the feed-forward's ReLU, after its second layer, and after the block."""
    fam = get_family("bert4rec")
    model = fam.from_spec(fam.new_spec(seq_data, {"dim": D, "max_len": L, "flavor": "torchrec", "dropout": 0.0}))
    fam.init(model, 0)

    class Twice(torch.nn.Module):
        def forward(self, x):
            return 2 * x

    for name, m in list(model.named_modules()):
        if type(m).__name__ == "Dropout":
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            child = name.rsplit(".", 1)[-1]
            if isinstance(parent, torch.nn.ModuleList):
                parent[int(child)] = Twice()
            else:
                setattr(parent, child, Twice())
    model.train()
    _, history = user_sequences(seq_data)
    window = model.served(history)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    lin = lambda x, p: x @ sd[p + ".weight"].T + sd[p + ".bias"]
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-5)
    x = sd["tables.item.weight"][window] + sd["tables.position.weight"][1:]
    x = 2 * F.layer_norm(x, (L, D), sd["input_layernorm.weight"], sd["input_layernorm.bias"], 1e-5)
    mask = (window > 0)[:, None, None, :]
    for i in range(2):
        a = f"attention_layers.{i}."
        qkv = ln(x, f"attention_layernorms.{i}") @ sd[a + "in_proj_weight"].T + sd[a + "in_proj_bias"]
        q, k, v = (t.view(len(x), L, 2, D // 2).transpose(1, 2) for t in qkv.chunk(3, -1))
        s = (q @ k.transpose(-2, -1) / (D // 2) ** 0.5).masked_fill(~mask, -1e9)
        x = x + 2 * lin((s.softmax(-1) @ v).transpose(1, 2).reshape(len(x), L, D), a + "out_proj")
        f = f"forward_layers.{i}."
        x = 2 * (x + 2 * lin(2 * torch.relu(lin(ln(x, f"forward_layernorms.{i}"), f + "conv1")), f + "conv2"))
    with torch.no_grad():
        assert torch.allclose(model.encode(window), x, atol=1e-4)
