"""generative-recommenders' dlrm_v3 ranker (DlrmHSTU) read from its checkpoint folder, rebuilt, evaluated as its
eval_loop evaluates, compressed and exported.

The reference here is written from upstream's formulas one user at a time, on the jagged sequence
``[contextual | history | candidates]`` (no padding), in float64 where upstream computes in float32 only for the
time buckets and time features, from the weights under upstream's own key names: it checks the padded, batched
model and the adapter's renaming at once. (bench/upstream_dlrm_hstu.py compares against upstream's own module.)
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recompress.adapters import describe, load_any
from recompress.data import open_dataset
from recompress.data.sequences import prepare_sequences
from recompress.errors import UserError
from recompress.evaluation import evaluate_model

D, W, HEADS, LIN, QK, BLOCKS, M = 8, 16, 2, 4, 3, 2, 4
ITEMS, USERS = 60, 90
PRE, STU = "_hstu_transducer._input_preprocessor.", "_hstu_transducer._stu_module._stu_layers."
POST, POS = "_hstu_transducer._output_postprocessor.", "_hstu_transducer._positional_encoder."


def upstream_weights(seed: int = 0, group_norm: bool = True) -> dict[str, torch.Tensor]:
    """A DlrmHSTU state dict under upstream's keys (movielens-20m's tables and layers, small widths)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=0.3: torch.randn(*s, generator=g) * scale
    sd = {"_embedding_collection.embeddings.movie_id.weight": r(ITEMS + 1, D, scale=1.0),
          "_embedding_collection.embeddings.user_id.weight": r(USERS + 1, D, scale=1.0),
          PRE + "_batched_contextual_linear_weights": r(1, D, W), PRE + "_batched_contextual_linear_bias": r(1, W),
          POS + "_position_embeddings_weight": r(8192, W), POS + "_timestamp_embeddings_weight": r(2049, W),
          POST + "_period_units": torch.tensor([[3600.0, 86400.0]]),
          POST + "_units_per_period": torch.tensor([[24.0, 7.0]]),
          POST + "_layer_norm.weight": 1 + r(W), POST + "_layer_norm.bias": r(W),
          POST + "_time_feature_combiner.weight": r(W, W + 4), POST + "_time_feature_combiner.bias": r(W)}
    for prefix, dims in ((PRE + "_content_embedding_mlp.", (D, 256, W)), ("_item_embedding_mlp.", (D, 512, W)),
                         ("_multitask_module._prediction_module.", (W, 512, 1))):
        a, h, b = dims
        sd.update({prefix + "0.weight": r(h, a), prefix + "0.bias": r(h), prefix + "1.weight": 1 + r(h),
                   prefix + "1.bias": r(h), prefix + "2.weight": r(b, h, scale=0.1), prefix + "2.bias": r(b)})
        if b == W:
            sd.update({prefix + "3.weight": 1 + r(W), prefix + "3.bias": r(W)})
    for i in range(BLOCKS):
        p = f"{STU}{i}."
        uvqk = (2 * LIN + 2 * QK) * HEADS
        sd.update({p + "_uvqk_weight": r(W, uvqk), p + "_uvqk_beta": r(uvqk),
                   p + "_input_norm_weight": 1 + r(W), p + "_input_norm_bias": r(W),
                   p + "_output_weight": r(3 * LIN * HEADS, W),
                   p + "_output_norm_weight": 1 + r(HEADS if group_norm else HEADS * LIN),
                   p + "_output_norm_bias": r(HEADS if group_norm else HEADS * LIN)})
    return sd


def reference(sd: dict[str, torch.Tensor], hist: list[int], ts: list[int], user: int, cands: list[int], qt: int,
              norm: int, clamp: int = W - 1, min_uih: int = 20, group_norm: bool = True) -> np.ndarray:
    """Upstream's DlrmHSTU forward for one user, token by token (``norm``: the batch's max_seq_len)."""
    w = {k: v.double() for k, v in sd.items()}
    ln = lambda x, a, b, eps: F.layer_norm(x, x.shape[-1:], a, b, eps)
    swish = lambda x, a, b: x * torch.sigmoid(ln(x, a, b, 1e-5))

    def mlp(prefix: str, x: torch.Tensor, final: bool) -> torch.Tensor:
        x = swish(x @ w[prefix + "0.weight"].T + w[prefix + "0.bias"], w[prefix + "1.weight"], w[prefix + "1.bias"])
        x = x @ w[prefix + "2.weight"].T + w[prefix + "2.bias"]
        return ln(x, w[prefix + "3.weight"], w[prefix + "3.bias"], 1e-5) if final else x

    items = w["_embedding_collection.embeddings.movie_id.weight"]
    users = w["_embedding_collection.embeddings.user_id.weight"]
    length, m = len(hist), len(cands)
    seq = mlp(PRE + "_content_embedding_mlp.", items[hist + cands], True)
    ctx = users[user] * float(length + m >= min_uih)
    ctx = ctx @ w[PRE + "_batched_contextual_linear_weights"][0] + w[PRE + "_batched_contextual_linear_bias"][0]
    x = torch.cat([ctx[None], seq])
    n, c = len(x), 1
    high = n - m
    pos = [j if j < c else min(high - min(j, high) + c, 8191) for j in range(n)]
    times = torch.tensor([0] + ts + [qt] * m, dtype=torch.int64)
    bucket = torch.sqrt((times[-1] - times).clamp(min=1e-6) / 60.0).clamp(min=0).int().clamp(0, clamp).long()
    x = x * math.sqrt(W) + w[POS + "_position_embeddings_weight"][pos] + w[POS + "_timestamp_embeddings_weight"][bucket]
    ids = [min(j, high) for j in range(n)]
    for i in range(BLOCKS):
        p = f"{STU}{i}."
        normed = ln(x, w[p + "_input_norm_weight"], w[p + "_input_norm_bias"], 1e-6)
        uvqk = normed @ w[p + "_uvqk_weight"] + w[p + "_uvqk_beta"]
        u, v, q, k = uvqk.split([LIN * HEADS] * 2 + [QK * HEADS] * 2, -1)
        u = F.silu(u)
        out = torch.zeros(n, HEADS * LIN, dtype=torch.float64)
        gated = torch.zeros_like(out)
        for h in range(HEADS):
            qh, kh, vh = q[:, h * QK:(h + 1) * QK], k[:, h * QK:(h + 1) * QK], v[:, h * LIN:(h + 1) * LIN]
            for a in range(n):
                for b in range(n):
                    if a == b or ids[a] > ids[b]:
                        out[a, h * LIN:(h + 1) * LIN] += F.silu(qh[a] @ kh[b] / math.sqrt(QK)) / norm * vh[b]
            o = out[:, h * LIN:(h + 1) * LIN]
            gn = (o - o.mean(1, keepdim=True)) / torch.sqrt(o.var(1, unbiased=False, keepdim=True) + 1e-6)
            gated[:, h * LIN:(h + 1) * LIN] = gn * w[p + "_output_norm_weight"][h] + w[p + "_output_norm_bias"][h]
        if not group_norm:  # one layer norm over every head
            gated = ln(out, w[p + "_output_norm_weight"], w[p + "_output_norm_bias"], 1e-6)
        x = x + torch.cat([u, out, u * gated], -1) @ w[p + "_output_weight"]
    feats = []
    for period, units in ((3600.0, 24.0), (86400.0, 7.0)):  # TimestampLayerNormPostprocessor, as it computes them
        elapsed = torch.div(torch.tensor([qt]), torch.tensor([period]), rounding_mode="floor")
        angle = (torch.remainder(elapsed, units) / units * 2 * 3.14).double()
        feats += [torch.cos(angle), torch.sin(angle)]
    user_out = torch.cat([x[-m:], torch.cat(feats).expand(m, 4)], -1)
    user_out = ln(user_out @ w[POST + "_time_feature_combiner.weight"].T + w[POST + "_time_feature_combiner.bias"],
                  w[POST + "_layer_norm.weight"], w[POST + "_layer_norm.bias"], 1e-5)
    item = mlp("_item_embedding_mlp.", items[cands], True)
    return mlp("_multitask_module._prediction_module.", user_out * item, False)[:, 0].numpy()


def write_checkpoint(folder, sd: dict[str, torch.Tensor], extra_dense: dict | None = None) -> None:
    """save_dmp_checkpoint's layout: the tables (fp16, as dlrm_v3's configs store them) in a DCP sparse/ folder,
    the rest in non_sparse.ckpt (written in a subprocess: DCP wants no process group here)."""
    folder.mkdir(parents=True)
    sparse = {k: v.half() for k, v in sd.items() if "embedding_collection" in k}
    dense = {**{k: v for k, v in sd.items() if k not in sparse}, **(extra_dense or {})}
    torch.save({"sparse": sparse, "dense": dense}, folder.parent / "parts.pt")
    code = ("import sys, torch, torch.distributed.checkpoint as dcp; f = sys.argv[1]; p = torch.load(sys.argv[2]); "
            "dcp.save({'sparse_dict': p['sparse']}, checkpoint_id=f + '/sparse'); "
            "torch.save({'dense_dict': p['dense'], 'optimizer_dict': {}, 'sparse_tensor_keys': set(p['sparse'])}, "
            "f + '/non_sparse.ckpt')")
    r = subprocess.run([sys.executable, "-c", code, str(folder), str(folder.parent / "parts.pt")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (folder.parent / "parts.pt").unlink()


def sequences(seed: int = 0) -> list[tuple[int, list[int], list[int]]]:
    """(user id, items, timestamps): 80 users with 6 to 40 items over years (time buckets beyond the clamp)."""
    rng = np.random.default_rng(seed)
    out = []
    for u in rng.permutation(np.arange(1, USERS + 1))[:80]:
        n = int(rng.integers(6, 41))
        t = np.sort(rng.integers(1_000_000_000, 1_300_000_000, n))
        out.append((int(u), [int(i) for i in rng.integers(1, ITEMS + 1, n)], [int(x) for x in t]))
    return out


def write_csv(path, rows) -> None:
    lines = ["index,user_id,sequence_item_ids,sequence_ratings,sequence_timestamps"]
    for k, (u, items, ts) in enumerate(rows):
        lines.append(f'{k},{u},"{",".join(map(str, items))}","{",".join(["4.0"] * len(items))}",'
                     f'"{",".join(map(str, ts))}"')
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dlrm_hstu")
    sd = upstream_weights()
    write_checkpoint(root / "ckpt" / "2026_12_08_10_00_00", sd)
    rows = sequences()
    write_csv(root / "sasrec_format.csv", rows)
    prepare_sequences(root / "sasrec_format.csv", root / "data", fmt="gr", layout="gr")
    return root, sd, rows, root / "ckpt" / "2026_12_08_10_00_00"


def batch_inputs(rows, users, m=M, keep=2056 - M - 1):
    """Upstream's load_item by hand: candidates the last m items, the history the first of the rest, query time the
    latest history time."""
    hists = [r[1][:-m][:keep] for r in (rows[u] for u in users)]
    tss = [r[2][:-m][:keep] for r in (rows[u] for u in users)]
    width = max(map(len, hists))
    pad = lambda xs: torch.tensor([x + [0] * (width - len(x)) for x in xs])
    return {"history": pad(hists), "timestamps": pad(tss), "lengths": torch.tensor([len(h) for h in hists]),
            "context": torch.tensor([[rows[u][0]] for u in users]),
            "candidates": torch.tensor([rows[u][1][-m:] for u in users]),
            "query_time": torch.tensor([max(t) for t in tss])}, hists, tss


def test_inspect_reads_the_shapes_and_the_config(setup):
    _, _, _, ckpt = setup
    found = describe(ckpt)
    assert found.family == "dlrm_hstu" and sorted(t.name for t in found.tables) == ["movie_id", "user_id"]
    hp, src = found.hparams, found.sources
    shapes = (hp["dim"], hp["width"], hp["blocks"], hp["heads"], hp["linear_dim"], hp["qk_dim"])
    assert shapes == (D, W, BLOCKS, HEADS, LIN, QK)
    assert hp["group_norm"] is True and src["heads"] == "shapes" and hp["contextual"] == ["user_id"]
    assert hp["max_seq_len"] == 2056 and "movielens-20m" in src["max_seq_len"] and hp["kernel"] == "pytorch"


def test_model_matches_upstreams_formulas_user_by_user(setup):
    _, sd, rows, ckpt = setup
    model = load_any(ckpt).model
    by_length = sorted(range(len(rows)), key=lambda u: len(rows[u][1]))
    users = [by_length[0], by_length[-1], by_length[1], by_length[40], by_length[-2]]  # padding, the normalizer
    inputs, hists, tss = batch_inputs(rows, users)
    with torch.no_grad():
        got = model(**inputs)[..., 0].numpy()
    half = {k: (v.half().float() if "embedding_collection" in k else v) for k, v in sd.items()}  # stored as fp16
    norm = 1 + max(map(len, hists)) + M
    for r, u in enumerate(users):
        want = reference(half, hists[r], tss[r], rows[u][0], rows[u][1][-M:], max(tss[r]), norm)
        np.testing.assert_allclose(got[r], want, atol=1e-4)
    assert any(len(h) + M < 20 for h in hists) and any(len(h) + M >= 20 for h in hists)  # both sides of min_uih
    wide = {**inputs, "history": F.pad(inputs["history"], (0, 5)), "timestamps": F.pad(inputs["timestamps"], (0, 5))}
    with torch.no_grad():  # padding wider than the longest history changes nothing (the normalizer reads lengths)
        assert torch.allclose(model(**wide)[..., 0], torch.from_numpy(got), atol=1e-6)


def test_the_time_bucket_clamp_follows_the_kernel(setup):
    """upstream's PyTorch kernel clamps at width - 1 (what dlrm_v3 trains with), its Triton kernel at 2048."""
    _, sd, rows, ckpt = setup
    half = {k: (v.half().float() if "embedding_collection" in k else v) for k, v in sd.items()}
    inputs, hists, tss = batch_inputs(rows, [5])
    out = {}
    for kernel, clamp in (("pytorch", W - 1), ("triton", 2048)):
        model = load_any(ckpt, {"kernel": kernel}).model
        with torch.no_grad():
            out[kernel] = model(**inputs)[0, :, 0].numpy()
        want = reference(half, hists[0], tss[0], rows[5][0], rows[5][1][-M:], max(tss[0]), len(hists[0]) + 1 + M, clamp)
        np.testing.assert_allclose(out[kernel], want, atol=1e-4)
    assert np.abs(out["pytorch"] - out["triton"]).max() > 1e-3


def test_evaluate_is_upstreams_eval_loop(setup):
    """Test users: the last quarter in file order, in DistributedSampler's order (seed 0), batches of 16 with the
    last partial one dropped; every label 1; MSE and MAE over every candidate."""
    root, _, rows, ckpt = setup
    model = load_any(ckpt, {"num_candidates": str(M)}).model  # the config's 10 candidates would not fit these users
    data = open_dataset(root / "data")
    scored = evaluate_model(model, data)
    train = round(0.75 * len(rows))
    order = (train + torch.randperm(len(rows) - train, generator=torch.Generator().manual_seed(0))).tolist()
    preds = []
    for s in range(0, len(order) - 15, 16):
        inputs, _, _ = batch_inputs(rows, order[s:s + 16])
        with torch.no_grad():
            preds.append(model(**inputs)[..., 0].reshape(-1))
    p = torch.cat(preds).double().numpy()
    assert len(p) == 16 * M and scored.metrics(("mse",))["rows"] == 16 * M  # 20 test users: one batch, 4 dropped
    metrics = scored.metrics(("mse", "mae"))
    assert metrics["mse"] == pytest.approx(np.mean((p - 1) ** 2), rel=1e-5)
    assert metrics["mae"] == pytest.approx(np.mean(np.abs(p - 1)), rel=1e-5)


def test_int8_and_onnx_keep_the_predictions(setup, tmp_path):
    """int8 rows of both tables move MSE by little; the ONNX export reproduces the checkpoint it was made from."""
    root, _, _, ckpt = setup
    out = tmp_path / "q"
    r = subprocess.run([sys.executable, "-m", "recompress", "checkpoint", str(ckpt), "--method", "int8", "-o", str(out),
                        "--hp", f"num_candidates={M}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    from recompress.checkpoint import load_checkpoint
    q = load_checkpoint(out)
    assert all(t.quant is not None for t in q.model.tables.values())
    data = open_dataset(root / "data")
    base = evaluate_model(load_any(ckpt, {"num_candidates": str(M)}).model, data).metrics(("mse",))["mse"]
    int8 = evaluate_model(q.model, data).metrics(("mse",))["mse"]
    assert int8 != base and abs(int8 - base) < 0.003, (int8, base)
    r = subprocess.run([sys.executable, "-m", "recompress", "export", str(out), "-o", str(tmp_path / "x"), "--data",
                        str(root / "data")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "parity max |diff|" in r.stdout + r.stderr


def test_configs_it_cannot_rebuild_are_refused_by_name(setup, tmp_path):
    _, sd, _, _ = setup
    kuai = {k.replace("movie_id", "video_id"): v for k, v in sd.items()}
    write_checkpoint(tmp_path / "kuairand" / "2026_12_08_10_00_00", kuai)
    with pytest.raises(UserError, match=r"does not rebuild: its tables \(user_id, video_id\) are not a MovieLens"):
        load_any(tmp_path / "kuairand" / "2026_12_08_10_00_00")
    extra = {"_hstu_transducer._input_preprocessor._action_embedding_mlp.0.weight": torch.ones(2, 2)}
    write_checkpoint(tmp_path / "action" / "2026_12_08_10_00_00", sd, extra)
    with pytest.raises(UserError, match=r"dense tensors recompress does not rebuild \(.*_action_embedding_mlp"):
        load_any(tmp_path / "action" / "2026_12_08_10_00_00")
    bad = dict(sd)
    bad[f"{STU}1._output_weight"] = torch.full_like(bad[f"{STU}1._output_weight"], float("nan"))
    write_checkpoint(tmp_path / "nan" / "2026_12_08_10_00_00", bad)
    with pytest.raises(UserError, match="NaN"):
        load_any(tmp_path / "nan" / "2026_12_08_10_00_00")


def test_data_it_cannot_read_is_refused(setup, tmp_path):
    root, _, rows, ckpt = setup
    model = load_any(ckpt).model
    with pytest.raises(UserError, match=r"has \d+ items, and a sample needs more than its 10 candidates"):
        evaluate_model(model, open_dataset(root / "data"))
    (tmp_path / "pairs.txt").write_text("".join(f"{u} {i}\n" for u, items, _ in rows for i in items))
    prepare_sequences(tmp_path / "pairs.txt", tmp_path / "untimed", fmt="pairs")
    from recompress.models.dlrm_hstu import FAMILY
    with pytest.raises(UserError, match="has no timestamps"):
        FAMILY.check(load_any(ckpt).spec, open_dataset(tmp_path / "untimed"))
    big = [(u + 1000, items, ts) for u, items, ts in rows]  # user ids beyond the user table
    write_csv(tmp_path / "big.csv", big)
    prepare_sequences(tmp_path / "big.csv", tmp_path / "big", fmt="gr", layout="gr")
    with pytest.raises(UserError, match=r"user ids up to 10\d\d, and table 'user_id' has 91 rows"):
        FAMILY.check(load_any(ckpt).spec, open_dataset(tmp_path / "big"))


def test_regression_metrics_and_their_paired_records():
    from recompress.metrics import METRICS
    from recompress.stats import paired_from_records, predictions_record
    truth, p = np.ones(4), np.array([1.5, 0.0, 1.0, 2.0])
    assert METRICS["mse"].value(truth, p) == pytest.approx((0.25 + 1 + 0 + 1) / 4)
    assert METRICS["mae"].value(truth, p) == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    assert not METRICS["mse"].higher_is_better
    rng = np.random.default_rng(0)
    base = 1 + rng.normal(0, 0.5, 2000)
    new = base + 0.1  # worse: further from 1 on average
    d = paired_from_records("mse", predictions_record(new, "predictions", "torch", np.ones(2000)),
                            predictions_record(base, "predictions", "torch", np.ones(2000)), None)
    want = np.mean((new - 1) ** 2) - np.mean((base - 1) ** 2)
    assert d["delta"] == pytest.approx(want, rel=1e-4) and d["lo"] <= want <= d["hi"]


def test_training_from_scratch_learns_the_constant_label(setup, tmp_path):
    """train --model dlrm_hstu: upstream's MovieLens label is 1 for every candidate; training moves MSE toward 0."""
    root, _, _, _ = setup
    args = [sys.executable, "-m", "recompress", "train", "--model", "dlrm_hstu", "--data", str(root / "data"),
            "--dim", "8", "--width", "16", "--blocks", "1", "--heads", "2", "--linear-dim", "4", "--qk-dim", "4",
            "--num-candidates", str(M), "--batch-size", "8"]
    for out, steps in (("none", "1"), ("some", "60")):
        lr = "0.01" if steps != "1" else "1e-9"
        r = subprocess.run(args + ["-o", str(tmp_path / out), "--steps", steps, "--lr", lr], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    from recompress.checkpoint import load_checkpoint
    data = open_dataset(root / "data")
    mse = {k: evaluate_model(load_checkpoint(tmp_path / k).model, data).metrics(("mse",))["mse"]
           for k in ("none", "some")}
    assert mse["some"] < 0.5 * mse["none"], mse


def test_latency_batches_too_big_for_memory_are_refused_before_they_run(setup, monkeypatch, capsys):
    root, _, _, ckpt = setup
    from recompress.models import dlrm_hstu
    spec, data = load_any(ckpt, {"num_candidates": str(M)}).spec, open_dataset(root / "data")
    batches = dlrm_hstu.FAMILY.latency_inputs(spec.hparams, data, 4, 2)
    assert [b["history"].shape[0] for b in batches] == [4, 4]
    monkeypatch.setattr(dlrm_hstu.os, "sysconf", lambda name: 4096 if name == "SC_PAGE_SIZE" else 16)  # 64 KiB
    with pytest.raises(UserError, match=r"latency at batch 4: test histories reach \d+ tokens.*pass smaller --batch"):
        dlrm_hstu.FAMILY.latency_inputs(spec.hparams, data, 4, 2)
    from recompress.evaluate.run import evaluate
    with pytest.raises(UserError, match="latency at batch 4"):  # before any scoring
        evaluate(ckpt, data, batch_sizes=[1, 4], hp={"num_candidates": str(M)})
    assert "scoring" not in capsys.readouterr().err


def test_hour_of_day_is_upstreams_floor_division():
    """Found by review: floor(float32(t) / 3600) is an hour late where the float32 quotient rounds up to a whole
    number; upstream's torch.div(int64, float32, rounding_mode="floor") is exact."""
    from recompress.models.dlrm_hstu_net import DlrmHSTU
    t = torch.arange(1_200_000_000, 1_200_000_000 + 4_000_000, 7, dtype=torch.int64)
    upstream = torch.div(t.unsqueeze(-1), torch.tensor([[3600.0, 86400.0]]), rounding_mode="floor")
    rounded = torch.floor(t.unsqueeze(-1).to(torch.float32) / torch.tensor([[3600.0, 86400.0]]))
    assert (rounded != upstream).any()  # the range holds such times
    angle = torch.remainder(upstream, torch.tensor([[24.0, 7.0]])) / torch.tensor([[24.0, 7.0]]) * 2 * 3.14
    want = torch.stack([torch.cos(angle), torch.sin(angle)], -1).flatten(-2)
    assert torch.equal(DlrmHSTU.time_features(_Units(), t), want)


class _Units:
    period_units, units_per_period = torch.tensor([[3600.0, 86400.0]]), torch.tensor([[24.0, 7.0]])


def test_a_layer_norm_checkpoint_takes_its_heads_from_the_user(tmp_path, setup):
    """Found by review: with a layer norm over every head the shapes give heads x widths only; the config's 4 heads
    do not divide these widths, and --hp heads=2 must split them (it was refused as a shape contradiction)."""
    _, _, rows, _ = setup
    sd = upstream_weights(seed=3, group_norm=False)
    folder = tmp_path / "ln" / "2026_12_08_10_00_00"
    write_checkpoint(folder, sd)
    found = describe(folder)
    assert found.hparams["group_norm"] is False and found.hparams["heads"] == 4 and "config" in found.sources["heads"]
    with pytest.raises(UserError, match="4 heads do not divide its STU widths"):
        load_any(folder)
    model = load_any(folder, {"heads": "2"}).model
    inputs, hists, tss = batch_inputs(rows, [1, 2])
    half = {k: (v.half().float() if "embedding_collection" in k else v) for k, v in sd.items()}
    with torch.no_grad():
        got = model(**inputs)[..., 0].numpy()
    for r, u in enumerate([1, 2]):
        want = reference(half, hists[r], tss[r], rows[u][0], rows[u][1][-M:], max(tss[r]), 1 + max(map(len, hists)) + M,
                         group_norm=False)
        np.testing.assert_allclose(got[r], want, atol=1e-4)


def test_impossible_hyper_parameters_are_refused(setup):
    _, _, _, ckpt = setup
    for hp, match in (({"num_candidates": "0"}, "num_candidates = 0 is impossible"),
                      ({"num_candidates": "4", "max_seq_len": "5"}, "max_seq_len 5 leaves no history item"),
                      ({"tasks": '["rating:regression", "click:binary"]'}, "binary tasks come before regression")):
        with pytest.raises(UserError, match=match):
            load_any(ckpt, hp)
    from recompress.models.dlrm_hstu import FAMILY
    with pytest.raises(UserError, match="no contextual feature"):  # train --contextual ""
        FAMILY.hparams({"contextual": ""})
    with pytest.raises(UserError, match="heads = 0 is impossible"):
        FAMILY.hparams({"heads": 0})


def test_padded_slots_of_a_short_history_beside_a_long_one_stay_in_range(monkeypatch):
    """Found by review: a padded slot's position (C + length - slot) went negative beside a history longer than
    the position table, and indexed out of range."""
    from recompress.models import dlrm_hstu_net
    from recompress.models.dlrm_hstu import FAMILY
    from recompress.spec import ModelSpec
    from recompress.tables import DenseTable
    monkeypatch.setattr(dlrm_hstu_net, "POSITION_ROWS", 16)
    hp = FAMILY.hparams({"dim": 4, "width": 8, "blocks": 1, "heads": 2, "linear_dim": 2, "qk_dim": 2,
                         "num_candidates": 2})
    model = FAMILY.build(ModelSpec(family="dlrm_hstu", hparams=hp, tables=[]),
                         {"movie_id": DenseTable(50, 4), "user_id": DenseTable(5, 4)})
    FAMILY.init(model, 0)
    history = torch.randint(1, 50, (2, 30))
    times = torch.sort(1_000_000 + torch.randint(0, 10 ** 6, (2, 30)), 1).values
    with torch.no_grad():
        out = model.eval()(history, times, torch.tensor([30, 1]), torch.tensor([[1], [2]]), torch.tensor([[3, 4]] * 2),
                           times.max(1).values)
    assert torch.isfinite(out).all()


def test_too_few_users_and_foreign_ids_are_refused(setup, tmp_path):
    root, _, rows, ckpt = setup
    write_csv(tmp_path / "few.csv", rows[:20])  # 5 test users: no full batch of 16
    prepare_sequences(tmp_path / "few.csv", tmp_path / "few", fmt="gr", layout="gr")
    model = load_any(ckpt, {"num_candidates": str(M)}).model
    with pytest.raises(UserError, match="5 test users, fewer than one batch of 16"):
        evaluate_model(model, open_dataset(tmp_path / "few"))
    prepare_sequences(root / "sasrec_format.csv", tmp_path / "renumbered", fmt="gr")  # --layout recompress
    from recompress.models.dlrm_hstu import FAMILY
    with pytest.raises(UserError, match="not prepared with the file's own ids"):
        FAMILY.check(load_any(ckpt).spec, open_dataset(tmp_path / "renumbered"))
    r = subprocess.run([sys.executable, "-m", "recompress", "train", "--model", "dlrm_hstu", "--data",
                        str(tmp_path / "few"), "-o", str(tmp_path / "m"), "--num-candidates", str(M),
                        "--batch-size", "64"], capture_output=True, text=True)
    assert r.returncode != 0 and "fewer than one batch of 64" in r.stderr and not (tmp_path / "m").exists()


def test_post_training_mlet_cuts_the_width_exactly_for_tables_of_that_rank(setup, tmp_path):
    """reduce_width: each table times its own basis, the layers that read it take the basis in; for tables whose
    rows span d dimensions the cut changes no prediction."""
    from types import SimpleNamespace

    from recompress.models.dlrm_hstu import FAMILY
    root, _, rows, _ = setup
    g = torch.Generator().manual_seed(5)
    sd = upstream_weights(seed=5)
    for name, n in (("movie_id", ITEMS + 1), ("user_id", USERS + 1)):  # rank-3 tables of halves: exact in fp16
        a = torch.randint(-3, 4, (n, 3), generator=g).float()
        b = torch.randint(-2, 3, (3, D), generator=g).float() / 4
        sd[f"_embedding_collection.embeddings.{name}.weight"] = a @ b
    folder = tmp_path / "lowrank" / "2026_12_08_10_00_00"
    write_checkpoint(folder, sd)
    ckpt = load_any(folder, {"num_candidates": str(M)})
    inputs, _, _ = batch_inputs(rows, [0, 5, 9])
    with torch.no_grad():
        before = ckpt.model(**inputs)
    ctx = SimpleNamespace(data=open_dataset(root / "data"), select=SimpleNamespace(pick=lambda c: []))
    info = FAMILY.reduce_width(ckpt, 3, ctx)
    assert {t.dim for t in ckpt.model.tables.values()} == {3} and info["energy_kept"] == {"movie_id": 1.0, "user_id": 1.0}
    with torch.no_grad():
        assert torch.allclose(ckpt.model(**inputs), before, atol=1e-4)
    ckpt2 = load_any(folder, {"num_candidates": str(M)})
    FAMILY.reduce_width(ckpt2, 2, ctx)  # below the rank: predictions move
    with torch.no_grad():
        assert not torch.allclose(ckpt2.model(**inputs), before, atol=1e-3)


def test_mlet_from_the_command_line(setup, tmp_path):
    root, _, _, ckpt = setup
    out = tmp_path / "mlet"
    r = subprocess.run([sys.executable, "-m", "recompress", "checkpoint", str(ckpt), "--method", "mlet", "--dim", "4",
                        "--data", str(root / "data"), "--steps", "3", "--batch-size", "8", "--hp",
                        f"num_candidates={M}", "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    from recompress.checkpoint import load_checkpoint
    model = load_checkpoint(out).model
    assert {t.dim for t in model.tables.values()} == {4} and model.hparams["dim"] == 4
    assert np.isfinite(evaluate_model(model, open_dataset(root / "data")).metrics(("mse",))["mse"])


def test_a_recipe_refuses_a_latency_batch_too_big_before_its_variants_run(setup, tmp_path, monkeypatch):
    """Found by review: the pipeline checked latency batches only after training, exporting and scoring everything."""
    from click.testing import CliRunner

    from recompress.cli import main
    from recompress.models import dlrm_hstu
    root, _, _, ckpt = setup
    (tmp_path / "r.toml").write_text(f'''name = "t"
[data]
kind = "prepared"
path = "{root / "data"}"
[baseline]
checkpoint = "{ckpt}"
hp = ["num_candidates={M}"]
[[variants]]
name = "int8"
method = "int8"
[evaluate]
batch_sizes = [1, 4]
''')
    monkeypatch.setattr(dlrm_hstu.os, "sysconf", lambda name: 4096 if name == "SC_PAGE_SIZE" else 16)  # 64 KiB
    res = CliRunner().invoke(main, ["run", str(tmp_path / "r.toml"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and "latency at batch 4" in res.output, res.output
    assert "int8" not in res.output.split("latency at batch")[0]  # no variant ran before the refusal
