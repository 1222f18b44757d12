"""SASRec, HSTU and the ranker against independent references written from their papers' code; training,
evaluation protocols, compressed item tables and checkpoints."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from recompress.compress.registry import Context, compress, parse_methods

from recompress.checkpoint import load_checkpoint, save_checkpoint
from recompress.data import open_dataset
from recompress.data.synthetic_sequences import make_synthetic_sequences
from recompress.errors import UserError
from recompress.evaluation import score, torch_predict
from recompress.families import get_family
from recompress.tables import DenseTable
from recompress.training import TrainConfig, train_model, validate


@pytest.fixture(scope="module")
def seq_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq") / "syn"
    return open_dataset(make_synthetic_sequences(out, users=600, items=150, clusters=8, mean_len=15, seed=2))


def fresh(name, data, **hp):
    fam = get_family(name)
    spec = fam.new_spec(data, {"dim": 16, "heads": 2, "max_len": 12, **hp})
    model = fam.build(spec, {t.name: DenseTable(t.rows, t.dim) for t in spec.tables})
    fam.init(model, 0)
    with torch.no_grad():  # make the tables matter: no tiny init, nothing left at zero
        for t in model.tables.values():
            t.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    return fam, model.eval()


def full_history(data, n=6, length=12):
    users = np.flatnonzero(np.diff(data.offsets) > length + 2)[:n]
    return torch.from_numpy(data.windows(users, data.history_end("test")[users], length))


def attention(x, w_in, b_in, w_out, b_out, heads, mask):
    """Multi-head softmax attention written out (the computation nn.MultiheadAttention performs)."""
    b, n, d = x.shape
    q, k, v = (x @ w_in.T + b_in).chunk(3, -1)
    split = lambda t: t.view(b, n, heads, d // heads).transpose(1, 2)
    s = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    out = (s.masked_fill(~mask, float("-inf")).softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, d)
    return out @ w_out.T + b_out


@pytest.mark.parametrize("norm_first", [False, True])
def test_sasrec_equals_the_pmixer_forward(seq_data, norm_first):
    fam, m = fresh("sasrec", seq_data, norm_first=norm_first)
    seq = full_history(seq_data)  # no padding, so masking choices cannot differ
    emb, pos = m.tables["item"].weight.detach(), m.tables["position"].weight.detach()
    x = emb[seq] * math.sqrt(16) + pos[torch.arange(1, 13)]
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    for ln_a, attn, ln_f, ffn in zip(m.attention_layernorms, m.attention_layers, m.forward_layernorms, m.forward_layers):
        def mha(y):
            return attention(y, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.weight, attn.out_proj.bias, 2, causal)

        def ff(y):
            return torch.relu(y @ ffn.conv1.weight.T + ffn.conv1.bias) @ ffn.conv2.weight.T + ffn.conv2.bias
        if norm_first:
            q = ln_a(x)
            x = x + mha(q)
            x = x + ff(ln_f(x))
        else:
            x = ln_a(x + mha(x))
            x = ln_f(x + ff(x))
    h = m.last_layernorm(x)[:, -1]
    cand = torch.tensor([[3, 7, 150]]).expand(len(seq), -1)
    with torch.no_grad():
        assert torch.allclose(m(seq, cand), (emb[cand] * h.unsqueeze(1)).sum(-1), atol=1e-5)
        full = m(seq, torch.arange(151)[None])  # the tied output; id 0 (padding) scores 0
        assert torch.allclose(full[:, 1:], h @ emb[1:].T, atol=1e-5) and (full[:, 0] == 0).all()


def pmixer_log2feats(m, log_seqs, wiring):
    """SASRec.pytorch's log2feats (model.py) in its three wirings, with torch's own nn.MultiheadAttention
    called as it calls it (causal attn_mask only: padded positions are neither masked as keys nor zeroed;
    our layers are batch first, SASRec.pytorch transposes to sequence first instead)."""
    emb, pos = m.tables["item"].weight.detach().clone(), m.tables["position"].weight.detach().clone()
    emb[0], pos[0] = 0, 0  # its padding_idx rows
    seqs = emb[log_seqs] * emb.shape[1] ** 0.5
    poss = torch.arange(1, log_seqs.shape[1] + 1).expand_as(log_seqs) * (log_seqs != 0)
    seqs = seqs + pos[poss]
    tl = seqs.shape[1]
    attention_mask = ~torch.tril(torch.ones((tl, tl), dtype=torch.bool))
    for ln_a, attn, ln_f, ffn in zip(m.attention_layernorms, m.attention_layers, m.forward_layernorms, m.forward_layers):
        def ff(y):
            return torch.relu(y @ ffn.conv1.weight.T + ffn.conv1.bias) @ ffn.conv2.weight.T + ffn.conv2.bias
        if wiring == "pmixer-2020":
            q = ln_a(seqs)
            out, _ = attn(q, seqs, seqs, attn_mask=attention_mask)
            seqs = ln_f(q + out)
            seqs = seqs + ff(seqs)
        elif wiring == "pre-ln":
            x = ln_a(seqs)
            out, _ = attn(x, x, x, attn_mask=attention_mask)
            seqs = seqs + out
            seqs = seqs + ff(ln_f(seqs))
        else:
            out, _ = attn(seqs, seqs, seqs, attn_mask=attention_mask)
            seqs = ln_a(seqs + out)
            seqs = ln_f(seqs + ff(seqs))
    return m.last_layernorm(seqs)


@pytest.mark.parametrize("wiring", ["post-ln", "pre-ln", "pmixer-2020"])
def test_sasrec_attending_padding_equals_pmixer_on_padded_histories(seq_data, wiring):
    fam, m = fresh("sasrec", seq_data, wiring=wiring, attend_padding=True)
    seq = full_history(seq_data).clone()
    seq[0, :5], seq[1, :11], seq[2, :3] = 0, 0, 0  # left padding of several lengths
    cand = torch.tensor([[3, 7, 150]]).expand(len(seq), -1)
    with torch.no_grad():
        h = pmixer_log2feats(m, seq, wiring)[:, -1]
        assert torch.allclose(m(seq, cand), (m.tables["item"].weight[cand] * h.unsqueeze(1)).sum(-1), atol=1e-5)
        masked = fam.build(fam.new_spec(seq_data, {"dim": 16, "heads": 2, "max_len": 12, "wiring": wiring}),
                           dict(m.tables.items()))
        masked.load_state_dict(m.state_dict())
        assert not torch.allclose(masked.eval()(seq, cand)[:3], m(seq, cand)[:3], atol=1e-3)  # padding matters there


def gr_relative_bias(w, n):
    """generative-recommenders' pad-and-repeat construction of the relative position bias, verbatim in math."""
    t = F.pad(w[: 2 * n - 1], [0, n]).repeat(n)
    t = t[..., :-n].reshape(1, n, 3 * n - 2)
    r = (2 * n - 1) // 2
    return t[..., r:-r]


def test_hstu_equals_the_paper_formulas(seq_data):
    fam, m = fresh("hstu", seq_data, heads=2, time_bias=True)
    seq = full_history(seq_data)
    users = np.flatnonzero(np.diff(seq_data.offsets) > 14)[:6]
    ts = torch.from_numpy(seq_data.windows(users, seq_data.history_end("test")[users], 12, seq_data.times))
    emb, pos = m.tables["item"].weight.detach(), m.tables["position"].weight.detach()
    x = emb[seq] * math.sqrt(16) + pos[torch.arange(1, 13)]
    n, h, a = 12, 2, 8
    causal = torch.ones(n, n).tril()
    for blk in m.blocks:
        u, v, q, k = F.silu(F.layer_norm(x, [16], eps=1e-6) @ blk.uvqk).split([h * a] * 4, -1)
        qk = torch.einsum("bnhd,bmhd->bhnm", q.reshape(-1, n, h, a), k.reshape(-1, n, h, a))
        nxt = torch.cat([ts[:, 1:], ts[:, -1:]], 1)
        bucket = (torch.log((nxt[:, :, None] - ts[:, None, :]).abs().clamp(min=1).double()) / 0.301).floor().long().clamp(0, 128)
        qk = qk + (gr_relative_bias(blk.pos_w, n) + blk.ts_w[bucket]).unsqueeze(1)
        y = torch.einsum("bhnm,bmhd->bnhd", F.silu(qk) / n * causal, v.reshape(-1, n, h, a)).reshape(-1, n, h * a)
        x = x + blk.o(u * F.layer_norm(y, [h * a], eps=1e-6))
    out = F.normalize(x[:, -1], dim=-1)
    with torch.no_grad():
        got = m(seq, torch.arange(1, 151)[None], ts)
    assert torch.allclose(got, out @ F.normalize(emb[1:], dim=-1).T, atol=1e-5)
    assert got.abs().max() <= 1 + 1e-5  # cosine similarities


def test_ranker_scores_each_candidate_as_if_it_were_alone(seq_data):
    fam, m = fresh("ranker", seq_data)
    hist = full_history(seq_data, n=3)
    hist[0, :4] = 0  # one padded history
    cands = torch.tensor([[5, 9, 2, 77], [1, 1, 3, 150], [60, 61, 62, 63]])
    with torch.no_grad():
        together = m(hist, cands)
        alone = torch.stack([m(hist, cands[:, j:j + 1])[:, 0] for j in range(4)], 1)
        swapped = m(hist, cands.flip(1)).flip(1)
        shared = m(hist, cands[:1])  # one candidate list for every history
    assert torch.allclose(together, alone, atol=1e-5) and torch.allclose(together, swapped, atol=1e-5)
    assert torch.allclose(shared[0], together[0], atol=1e-5)
    with torch.no_grad():  # the history matters, and padding does not leak into scores
        other = hist.clone()
        other[0, -1] = 140
        assert not torch.allclose(m(other, cands)[0], together[0])
        more_pad = hist.clone()
        more_pad[0, :4] = 0
        assert torch.allclose(m(more_pad, cands), together, atol=1e-6)


def early_fusion_reference(m, history, cand, end=None):
    """The concat ranker written out for a left-padded ``history`` [L] read up to index ``end`` (default: all)
    and a candidate id: every real item's token is [item row * sqrt(d) + position row (its index in the
    history + 1, as SASRec.pytorch's positions), candidate row * sqrt(d)] projected to d; pre-LN causal blocks over the real items; the CTR
    head on the last output, the candidate row and their product."""
    emb, pos = m.tables["item"].weight.detach(), m.tables["position"].weight.detach()
    end = len(history) - 1 if end is None else end
    real = history[: end + 1][history[: end + 1] > 0]
    n, d = len(real), emb.shape[1]
    slots = torch.arange(end + 2 - n, end + 2)
    c = emb[cand] * math.sqrt(d)
    x = torch.cat([emb[real] * math.sqrt(d) + pos[slots], c.expand(n, d)], -1) @ m.fuse.weight.T + m.fuse.bias
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for blk in m.blocks:
        y = F.layer_norm(x, [d], blk.ln1.weight, blk.ln1.bias, 1e-8)
        w, b = blk.qkv.weight, blk.qkv.bias
        x = x + attention(y[None], w, b, blk.o.weight, blk.o.bias, m.hparams["heads"], causal)[0]
        y = F.layer_norm(x, [d], blk.ln2.weight, blk.ln2.bias, 1e-8)
        x = x + blk.ff2(torch.relu(blk.ff1(y)))
    out = F.layer_norm(x[-1], [d], m.last_layernorm.weight, m.last_layernorm.bias, 1e-8)
    e = emb[cand]
    return m.head(torch.cat([out, e, out * e]))[0]


def appended_reference(m, history, cand):
    """The appended-candidate ranker written out for one unpadded ``history`` [L] and a candidate id: the
    history runs through pre-LN causal blocks; the candidate token (its row * sqrt(d) + position L + 1), in
    every block, attends to the history's keys and values of that block and to its own, per head."""
    emb, pos = m.tables["item"].weight.detach(), m.tables["position"].weight.detach()
    n, d = len(history), emb.shape[1]
    heads = m.hparams["heads"]
    h = emb[history] * math.sqrt(d) + pos[torch.arange(1, n + 1)]
    c = emb[cand] * math.sqrt(d) + pos[n + 1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    for blk in m.blocks:
        ln = lambda x, b=blk: F.layer_norm(x, [d], b.ln1.weight, b.ln1.bias, 1e-8)
        ffn = lambda x, b=blk: x + b.ff2(torch.relu(b.ff1(F.layer_norm(x, [d], b.ln2.weight, b.ln2.bias, 1e-8))))
        _, k, v = (ln(h) @ blk.qkv.weight.T + blk.qkv.bias).chunk(3, -1)
        qc, kc, vc = (ln(c) @ blk.qkv.weight.T + blk.qkv.bias).chunk(3, -1)
        out = []
        for j in range(heads):
            sl = slice(j * d // heads, (j + 1) * d // heads)
            keys, values = torch.cat([k[:, sl], kc[None, sl]]), torch.cat([v[:, sl], vc[None, sl]])
            a = (keys @ qc[sl] / math.sqrt(d // heads)).softmax(0)
            out.append(a @ values)
        c = ffn(c + blk.o(torch.cat(out)))
        h = ffn(h + attention(ln(h)[None], blk.qkv.weight, blk.qkv.bias, blk.o.weight, blk.o.bias, heads, causal)[0])
    out = F.layer_norm(c, [d], m.last_layernorm.weight, m.last_layernorm.bias, 1e-8)
    e = emb[cand]
    return m.head(torch.cat([out, e, out * e]))[0]


def test_ranker_equals_the_written_out_appended_candidate(seq_data):
    _, m = fresh("ranker", seq_data)
    hist = full_history(seq_data, n=3)
    cands = torch.tensor([[5, 9, 2, 77], [1, 1, 3, 150], [60, 61, 62, 63]])
    with torch.no_grad():
        got = m(hist, cands)
        ref = torch.stack([torch.stack([appended_reference(m, hist[i], c) for c in cands[i]]) for i in range(3)])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_concat_ranker_equals_the_written_out_early_fusion(seq_data, monkeypatch):
    import recompress.models.ranker_concat as rc
    monkeypatch.setattr(rc, "GROUP_ROWS", 3)  # several groups, each trimmed to its own length
    fam, m = fresh("ranker", seq_data, fusion="concat")
    hist = full_history(seq_data, n=3)
    hist[0, :5] = 0  # padded histories: trimmed in eager scoring, which must not change a score
    hist[1, :9] = 0
    cands = torch.tensor([[5, 9, 2, 77], [1, 1, 3, 150], [60, 61, 62, 63]])
    with torch.no_grad():
        got = m(hist, cands)
        ref = torch.stack([torch.stack([early_fusion_reference(m, hist[i], c) for c in cands[i]]) for i in range(3)])
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        # training: position t's target and negatives are scored after the history up to t, and only there
        targets = torch.roll(hist, -1, 1)
        targets[:, -1] = 7
        negatives = torch.randint(1, 151, (*hist.shape, 2), generator=torch.Generator().manual_seed(0))
        pos, neg = m.train_logits(hist, targets, negatives)
        for i, t in [(0, 5), (0, 9), (1, 9), (1, 11), (2, 0), (2, 11)]:
            torch.testing.assert_close(pos[i, t], early_fusion_reference(m, hist[i], targets[i, t], t), atol=1e-5,
                                       rtol=1e-5)
            torch.testing.assert_close(neg[i, t, 1], early_fusion_reference(m, hist[i], negatives[i, t, 1], t),
                                       atol=1e-5, rtol=1e-5)
        assert (pos[0, :5] == 0).all()  # padded positions are not scored


@pytest.mark.parametrize("name", ["sasrec", "hstu"])
def test_padding_rows_and_left_padding_never_matter(seq_data, name):
    fam, m = fresh(name, seq_data)
    hist = full_history(seq_data, n=2)
    hist[:, :5] = 0
    with torch.no_grad():
        before = m(hist, torch.arange(151)[None], None)
        m.tables["item"].weight[0] = 123.0  # the padding row's content
        after = m(hist, torch.arange(151)[None], None)
    assert torch.allclose(before[:, 1:], after[:, 1:], atol=1e-5)


@pytest.mark.parametrize("name,floor,hp", [("sasrec", 0.15, {}), ("hstu", 0.15, {}), ("ranker", 0.15, {}),
                                           ("ranker", 0.15, {"fusion": "concat"})])
def test_each_family_learns_the_planted_structure(seq_data, name, floor, hp):
    torch.manual_seed(0)
    fam = get_family(name)
    epochs = {"sasrec": 25, "hstu": 12, "ranker": 8}[name]
    ck = train_model(fam, seq_data, TrainConfig(epochs=epochs, lr=3e-3, batch_size=64),
                     {"dim": 16, "max_len": 12, "heads": 2, "dropout": 0.1, **hp})
    val = ck.spec.metrics["train"]["val"]
    # random ranking: NDCG@10 about 0.03 among 150 items (full) or 0.05 among 101 candidates (sampled)
    assert val["ndcg@10"] > floor, val
    assert val["protocol"] == fam.protocols[0]


def test_sasrec_with_a_hashed_item_table_learns_from_scratch(seq_data):
    """16 items share each hashed row and score alike. With ties counted against the target, validation
    NDCG@10 was exactly 0 at every check, so keep-best kept the untrained step-0 weights."""
    from recompress.compress.registry import fresh_tables
    torch.manual_seed(0)
    ck = train_model(get_family("sasrec"), seq_data, TrainConfig(epochs=15, lr=1e-2, batch_size=64, keep_best=True),
                     {"dim": 16, "max_len": 12, "heads": 2}, make_table=fresh_tables("hash", {"ratio": 16.0}, 0, 0))
    assert ck.model.tables["item"].kind == "hash" and ck.model.tables["item"].buckets == 9
    train = ck.spec.metrics["train"]
    assert train["keep_best"]["best_step"] > 0
    # random ranking of 150 items: HR@10 = 10/150 = 0.067 with std 0.010 over 600 users; require 4 stds above
    # (it was 2x random, 0.133, which the run met or missed by 0.002 depending on the global RNG's state)
    chance = 10 / 150
    assert train["val"]["hr@10"] > chance + 4 * math.sqrt(chance * (1 - chance) / seq_data.num_users), train["val"]


@pytest.fixture(scope="module")
def sasrec_ckpt(seq_data, tmp_path_factory):
    ck = train_model(get_family("sasrec"), seq_data, TrainConfig(epochs=8, lr=3e-3, batch_size=64),
                     {"dim": 16, "max_len": 12, "heads": 2})
    return save_checkpoint(ck, tmp_path_factory.mktemp("sasrec") / "ck")


def test_native_checkpoint_holds_the_architecture(sasrec_ckpt):
    ck = load_checkpoint(sasrec_ckpt)
    hp = ck.spec.hparams
    assert (hp["max_len"], hp["heads"], hp["blocks"], hp["dropout"], hp["tied_output"], hp["num_items"]) == \
        (12, 2, 2, 0.2, True, 150)
    roles = {t.name: (t.role, t.rows) for t in ck.spec.tables}
    assert roles == {"item": ("item", 151), "position": ("position", 13)}


def test_protocols_rank_against_the_right_candidates(seq_data, sasrec_ckpt):
    ck = load_checkpoint(sasrec_ckpt)
    fam = get_family("sasrec")
    hp = ck.model.hparams
    (inputs, (target, exclude)), = list(fam.eval_batches(hp, seq_data, "test", "full", batch_size=600))[:1]
    users = np.arange(seq_data.num_users)
    ends = seq_data.history_end("test")
    for u in (0, 17, 300):
        seen = set(seq_data.items[seq_data.offsets[u]:ends[u]])
        assert exclude[u, 0] and not exclude[u, target[u]]
        assert {i for i in range(1, 151) if exclude[u, i]} == seen - {target[u]}
    sampled = list(fam.eval_batches(hp, seq_data, "test", "sampled", negatives=100))
    again = list(fam.eval_batches(hp, seq_data, "test", "sampled", negatives=100))
    cands = np.concatenate([b[0]["candidates"] for b in sampled])
    assert np.array_equal(cands, np.concatenate([b[0]["candidates"] for b in again]))  # the same for every model
    assert (cands[:, 0] == np.asarray(seq_data.items)[ends]).all()
    for u in (0, 17, 300):
        assert not set(cands[u, 1:]) & set(seq_data.items[seq_data.offsets[u]:ends[u] + 1])
    assert len(users) == len(cands)


def test_full_ranking_metrics_equal_a_brute_force_ranking(seq_data, sasrec_ckpt):
    ck = load_checkpoint(sasrec_ckpt)
    fam = get_family("sasrec")
    s = score(fam, torch_predict(fam, ck.model), ck.model.hparams, seq_data, "test", "full")
    ends = seq_data.history_end("test")
    for u in (3, 99, 501):
        hist = torch.from_numpy(seq_data.windows(np.array([u]), ends[[u]], 12))
        with torch.no_grad():
            sc = ck.model(hist, torch.arange(151)[None])[0].numpy()
        target = seq_data.items[ends[u]]
        others = [i for i in range(1, 151) if i not in set(seq_data.items[seq_data.offsets[u]:ends[u]]) or i == target]
        rank = sum(sc[i] >= sc[target] for i in others if i != target)
        assert s.values[u] == rank


def test_item_table_methods_apply_to_the_tied_table(seq_data, sasrec_ckpt, tmp_path):
    for methods, params, form in [("int8", {}, "dense+int8"), ("hash", {"ratio": 4}, "hash"),
                                  ("lowrank", {"rank": 4}, "factorized"), ("tt,int8", {"tt_rank": 4}, "tt+int8"),
                                  ("freqhash", {"ratio": 2}, "freqhash"), ("qr,int4", {"collisions": 8}, "qr+int4")]:
        ck = compress(load_checkpoint(sasrec_ckpt), parse_methods(methods, params), Context(seq_data, TrainConfig(steps=0)))
        forms = {n: t.form for n, t in ck.model.tables.items()}
        assert forms == {"item": form, "position": "dense"}, methods  # positions are not compressed by default
        # the tied output scores with the compressed rows: a dense copy of them scores the same
        dense = load_checkpoint(sasrec_ckpt).model
        dense.tables["item"] = DenseTable(151, 16, ck.model.tables["item"].dense_weight())
        hist = full_history(seq_data, n=4)
        with torch.no_grad():
            assert torch.allclose(ck.model(hist, torch.arange(151)[None]), dense(hist, torch.arange(151)[None]),
                                  atol=1e-5)
        path = save_checkpoint(ck, tmp_path / methods.replace(",", "-"))
        assert load_checkpoint(path).model.tables["item"].form == form


def test_freqhash_uses_item_frequencies_and_finetune_uses_the_family_loss(seq_data, sasrec_ckpt):
    base = load_checkpoint(sasrec_ckpt)
    ck = compress(base, parse_methods("freqhash", {"hot": 20, "buckets": 30, "finetune": True}),
                  Context(seq_data, TrainConfig(epochs=1, lr=1e-3, batch_size=64)))
    t = ck.model.tables["item"]
    counts = seq_data.id_counts()
    hot = set(np.argsort(-counts, kind="stable")[:20].tolist())
    assert {i for i in range(151) if t.slot[i] >= 0} == hot
    h = ck.spec.history[-1]
    assert "ndcg@10" in h["val_after_finetune"] and h["finetune"]["steps"] == 10


def test_mlet_width_cut_is_refused_with_a_hint(seq_data, sasrec_ckpt):
    with pytest.raises(UserError, match="sasrec does not support") as e:
        compress(load_checkpoint(sasrec_ckpt), parse_methods("mlet", {"dim": 8}), Context(seq_data))
    assert "lowrank" in e.value.hint


def test_bad_pairings_of_models_and_data(seq_data, sasrec_ckpt, tiny_data, tiny_ckpt, tmp_path):
    fam = get_family("sasrec")
    with pytest.raises(UserError, match="needs a sequences dataset"):
        fam.check(load_checkpoint(sasrec_ckpt).spec, tiny_data)
    with pytest.raises(UserError, match="needs a ctr dataset"):
        get_family("dlrm").check(load_checkpoint(tiny_ckpt).spec, seq_data)
    bigger = open_dataset(make_synthetic_sequences(tmp_path / "big", users=50, items=400, clusters=4, seed=3))
    with pytest.raises(UserError, match=r"the model's item table has 151 rows \(150 items and padding\) but the dataset has \d\d\d items"):
        fam.check(load_checkpoint(sasrec_ckpt).spec, bigger)
    with pytest.raises(UserError, match="--heads 3 is impossible"):
        fam.new_spec(seq_data, {"dim": 16, "heads": 3})
    with pytest.raises(UserError, match="--max-len 0 is impossible"):
        fam.new_spec(seq_data, {"max_len": 0})


def test_validation_metric_drives_keep_best(seq_data, sasrec_ckpt):
    ck = load_checkpoint(sasrec_ckpt)
    start = validate(ck.model, seq_data)["ndcg@10"]
    from recompress.training import fit
    out = fit(ck.model, seq_data, TrainConfig(epochs=2, lr=1.0, batch_size=64, keep_best=True))  # a ruinous lr
    assert out["keep_best"]["best_step"] == 0 and out["val"]["ndcg@10"] == start


def test_dropout_is_inverted_dropout_and_identity_in_eval():
    from recompress.models.sequential import Dropout

    x = torch.full((200, 500), 3.0, requires_grad=True)
    drop = Dropout(0.3)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01  # 100k draws: std of the rate is 0.0015
    assert torch.allclose(y[kept], torch.tensor(3.0 / 0.7))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept) and torch.allclose(x.grad[kept], torch.tensor(1 / 0.7))
    assert torch.equal(drop.eval()(x), x)
    with pytest.raises(ValueError):
        Dropout(1.0)


@pytest.mark.parametrize("name", ["sasrec", "ranker"])  # full-ranking (shared candidates) and sampled defaults
def test_latency_inputs_are_full_batches_of_real_users_even_on_small_data(seq_data, name):
    fam = get_family(name)
    hp = fam.new_spec(seq_data, {"dim": 8, "max_len": 12}).hparams
    batches = fam.latency_inputs(hp, seq_data, 256, 16)  # 16 x 256 rows > 600 users: must cycle
    assert len(batches) == 16 and all(len(b["history"]) == 256 for b in batches)
    ends = seq_data.history_end("test")
    real = {tuple(seq_data.windows(np.array([u]), ends[[u]], 12)[0]) for u in range(seq_data.num_users)}
    assert all(tuple(h) in real for b in batches for h in b["history"])
    cands = batches[0]["candidates"]
    assert cands.shape == ((1, seq_data.num_items + 1) if name == "sasrec" else (256, 101))


def test_time_buckets_are_exact_in_torch_and_onnx_runtime(tmp_path):
    """Gaps where float32 log lands one bucket off (417901, ...) and every bucket start ±1."""
    import onnxruntime as ort

    from recompress.models.hstu import time_buckets

    starts = [math.ceil(math.exp(0.301 * k)) for k in range(1, 60)]
    gaps = sorted({1, 2, 417901, 1030959, 1882290, 2543367, 2543368, *(s + d for s in starts for d in (-1, 0, 1))})
    ts = torch.tensor([[0] + gaps], dtype=torch.int64)  # key 0 vs next timestamps: gap = t_{i+1}
    expected = torch.tensor([min(128, math.floor(math.log(g) / 0.301)) for g in gaps])
    assert torch.equal(time_buckets(ts)[0, :-1, 0], expected)

    class Buckets(torch.nn.Module):
        def forward(self, t):
            return time_buckets(t)

    path = tmp_path / "b.onnx"
    torch.onnx.export(Buckets(), (ts,), str(path), input_names=["t"], dynamo=False)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"t": ts.numpy()})[0]
    assert np.array_equal(got[0, :-1, 0], expected.numpy())


@pytest.mark.parametrize("name", ["sasrec", "hstu", "ranker"])
def test_init_depends_only_on_the_seed(seq_data, name):
    """Every layer parameter is drawn from the seeded generator: two models built in one process (whose
    global RNG has moved on between them) start equal, and another seed changes every drawn parameter; the
    biases follow PyTorch's default rule U(+-1/sqrt(fan_in)) as in SASRec.pytorch (which keeps them)."""
    fam = get_family(name)
    spec = fam.new_spec(seq_data, {"dim": 16, "heads": 2, "max_len": 12})

    def built(seed):
        torch.rand(7)  # whatever the global generator did before
        model = fam.build(spec, {t.name: DenseTable(t.rows, t.dim) for t in spec.tables})
        fam.init(model, seed)
        return dict(model.named_parameters())

    a, b, c = built(3), built(3), built(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for m_name, m in fam.build(spec, {t.name: DenseTable(t.rows, t.dim) for t in spec.tables}).named_modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None and not m_name.endswith("out_proj"):
            bias, bound = a[f"{m_name}.bias"], 1 / math.sqrt(m.weight.shape[1])
            if name == "hstu":  # generative-recommenders zeroes its output projection's bias
                assert not bias.any()
                continue
            assert not torch.equal(bias, c[f"{m_name}.bias"]) and bias.abs().max() <= bound
            assert bias.numel() < 8 or bias.std() > bound / 3  # uniform on [-b, b]: std b/sqrt(3)


def test_a_predictor_in_another_attention_form_shares_the_tables(seq_data):  # noqa: F811
    """``evaluate --attention`` scores a copy of the model in that form; the copy shares the tables' storage (a
    deep copy held a second item table, as large as the model), and the caller's model keeps its form and its
    tables' tensor objects."""
    from recompress.evaluate.predictors import TorchPredictor
    from recompress.models.attention import attention_modules

    fam, model = fresh("sasrec", seq_data)
    forms = [m.attention for m in attention_modules(model)]
    other = next(f for f in type(attention_modules(model)[0]).attention_forms if f != forms[0])
    pred = TorchPredictor(model, 1, family=fam, attention=other)
    copied = [m for m in pred.scorer.modules() if hasattr(m, "tables")][0]
    for name, t in model.tables.items():
        assert copied.tables[name].weight.data_ptr() == t.weight.data_ptr()
        assert copied.tables[name].weight is not t.weight
    assert [m.attention for m in attention_modules(pred.scorer)] == [other] * len(forms)
    assert [m.attention for m in attention_modules(model)] == forms
