"""The fused Triton HSTU attention kernel, run in Triton's CPU interpreter (TRITON_INTERPRET=1), against a
reference written out here with dense [L, L] matrices, and inside the HSTU model against its decomposed form.

The interpreter must be switched on before the kernel is defined, so the kernel runs in a subprocess;
inputs and outputs travel as torch files this test writes (loaded with weights_only=True).
"""

import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[kernels]')")

RUNNER = r"""
import sys, torch
from recompress.kernels.hstu_attention import hstu_attention
from recompress.models.attention import set_attention
cases = torch.load(sys.argv[1], weights_only=True)
out = {}
from recompress.families import get_family
from recompress.spec import ModelSpec
for name, c in cases.items():
    if name.startswith("model"):
        spec = ModelSpec.from_json(c["spec"].numpy().tobytes().decode(), "test")
        model = get_family("hstu").from_spec(spec)
        model.load_state_dict({k[6:]: v for k, v in c.items() if k.startswith("state.")})
        model.eval()
        with torch.no_grad():
            set_attention(model, "triton")
            out[name] = model.encode(c["history"], c["timestamps"])
        continue
    out[name] = hstu_attention(c["q"], c["k"], c["v"], c["pos"], int(c["max_len"]), c["real"], c.get("tsw"),
                               c.get("ts"), candidates=int(c["candidates"]), block_m=16, block_n=16,
                               norm=int(c["norm"]) if "norm" in c else None, query_time=bool(c.get("query_time", False)),
                               exact_buckets=bool(c.get("exact", True)))
torch.save(out, sys.argv[2])
"""


def reference(q, k, v, pos, max_len, real, tsw=None, ts=None, candidates=0, norm=None, query_time=False, exact=True):
    """SiLU(q k^T + rab) / L (or / norm) under the causal / M-FALCON mask, with dense [B, L, L] bias and mask;
    ``query_time``: ts has L + 1 columns, the last the next item's time; not ``exact``: float32 log buckets."""
    b, length = q.shape[:2]
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    bias = pos[(max_len - 1 + j - i).clamp(0, 2 * max_len - 2)].expand(b, length, length)
    if ts is not None:
        ts, nxt = (ts[:, :-1], ts[:, 1:]) if query_time else (ts, torch.cat([ts[:, 1:], ts[:, -1:]], 1))
        gap = (nxt[:, :, None] - ts[:, None, :]).abs().clamp(min=1)
        log = torch.log(gap.double()) if exact else torch.log(gap.float())  # float64: exact here
        bias = bias + tsw[(log / 0.301).floor().long().clamp(0, 128)]
    hist = length - candidates
    history_rule = (j <= i) & (real[:, None, :] | (i == j))
    candidate_rule = ((j < hist) & real[:, None, :]) | (i == j)
    allowed = torch.where(i >= hist, candidate_rule, history_rule)
    s = torch.einsum("blha,bmha->bhlm", q.double(), k.double()) + bias[:, None].double()
    p = s * torch.sigmoid(s) / (norm or length) * allowed[:, None]
    return torch.einsum("bhlm,bmhd->blhd", p, v.double()).float()


def case(b, length, heads, a, dv, max_len, pad, times, candidates, seed, research=False):
    g = torch.Generator().manual_seed(seed)
    real = torch.ones(b, length, dtype=torch.bool)
    for row, n in enumerate(pad):
        real[row, :n] = False
    c = {"q": torch.randn(b, length, heads, a, generator=g), "k": torch.randn(b, length, heads, a, generator=g),
         "v": torch.randn(b, length, heads, dv, generator=g), "pos": torch.randn(2 * max_len - 1, generator=g),
         "max_len": torch.tensor(max_len), "real": real, "candidates": torch.tensor(candidates)}
    if times:
        c["tsw"] = torch.randn(129, generator=g)
        c["ts"] = torch.cumsum(torch.randint(0, 200_000, (b, length + research), generator=g), 1)
        if research:
            c["ts"][:, 3] = c["ts"][:, 2] + 417901  # float32 and exact buckets differ for this gap
            c["ts"] = torch.cummax(c["ts"], 1).values
    if research:
        c.update(norm=torch.tensor(length + 5), query_time=torch.tensor(True), exact=torch.tensor(False))
    return c


def hstu_model(**given):
    from recompress.families import get_family
    from recompress.spec import ModelSpec, TableSpec
    fam = get_family("hstu")
    hp = fam.hparams({"dim": 16, "heads": 2, "max_len": 20, **given})
    hp.update(num_items=60, has_times=True, tied_output=True)
    spec = ModelSpec(family="hstu", hparams=hp, tables=[TableSpec("item", 61, 16, role="item"), TableSpec("position", 21, 16, role="position")])
    model = fam.from_spec(spec)
    fam.init(model, 0)
    with torch.no_grad():
        for t in model.tables.values():
            t.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
        for blk in model.blocks:  # larger biases than the 0.02 init, so a wrong bias index shows
            blk.pos_w.normal_(0, 1.0, generator=torch.Generator().manual_seed(4))
            blk.ts_w.normal_(0, 1.0, generator=torch.Generator().manual_seed(5))
    return spec, model.eval()


def test_triton_hstu_kernel_matches_the_dense_reference(tmp_path):
    cases = {
        "padded rows, time bias, 3 query blocks": case(3, 37, 2, 8, 8, 40, [0, 10, 30], True, 0, 0),
        "M-FALCON candidates": case(2, 29, 2, 8, 8, 29, [0, 7], False, 5, 1),
        "odd head dims, one block": case(2, 16, 1, 12, 10, 50, [3, 0], True, 0, 2),
        "research: norm, query time, float32 buckets": case(3, 21, 2, 8, 8, 30, [0, 4, 17], True, 0, 3, research=True),
    }
    g = torch.Generator().manual_seed(6)
    history = torch.randint(1, 61, (4, 20), generator=g)
    history[1, :8] = 0
    history[3, :19] = 0
    models = {"model": hstu_model(), "model_research": hstu_model(variant="research", attn_norm=27)}
    for name, (spec, model) in models.items():
        timestamps = torch.cumsum(torch.randint(0, 100_000, (4, 20 + model.research), generator=g), 1)
        cases[name] = {f"state.{k}": v for k, v in model.state_dict().items()}
        cases[name].update(history=history, timestamps=timestamps,
                           spec=torch.frombuffer(bytearray(spec.to_json().encode()), dtype=torch.uint8))
    torch.save(cases, tmp_path / "in.pt")
    (tmp_path / "run.py").write_text(RUNNER)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for name, c in cases.items():
        if name.startswith("model"):
            continue
        want = reference(c["q"], c["k"], c["v"], c["pos"], int(c["max_len"]), c["real"], c.get("tsw"), c.get("ts"),
                         int(c["candidates"]), int(c["norm"]) if "norm" in c else None, bool(c.get("query_time", False)),
                         bool(c.get("exact", True)))
        assert got[name].shape == want.shape
        err = (got[name] - want).abs().max().item()
        assert err < 1e-5 * max(1.0, want.abs().max().item()), (name, err)
    real = history > 0
    for name, (_, model) in models.items():
        with torch.no_grad():
            decomposed = model.encode(history, cases[name]["timestamps"])
        assert (got[name][real] - decomposed[real]).abs().max().item() < 1e-5, name
        assert math.isfinite(got[name].abs().sum().item())


def test_triton_form_refuses_training():
    from recompress.errors import UserError
    from recompress.models.attention import set_attention
    _, model = hstu_model()
    model.train()
    set_attention(model, "triton")
    with pytest.raises(UserError, match="forward-only"):
        model.encode(torch.randint(1, 61, (2, 20)), None)
