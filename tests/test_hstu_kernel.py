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
for name, c in cases.items():
    if name == "model":
        continue
    out[name] = hstu_attention(c["q"], c["k"], c["v"], c["pos"], int(c["max_len"]), c["real"], c.get("tsw"),
                               c.get("ts"), candidates=int(c["candidates"]), block_m=16, block_n=16)
m = cases["model"]
from recompress.families import get_family
from recompress.spec import ModelSpec
spec = ModelSpec.from_json(m["spec"].numpy().tobytes().decode(), "test")
fam = get_family("hstu")
model = fam.from_spec(spec)
model.load_state_dict({k[6:]: v for k, v in m.items() if k.startswith("state.")})
model.eval()
with torch.no_grad():
    set_attention(model, "triton")
    out["model_triton"] = model.encode(m["history"], m["timestamps"])
torch.save(out, sys.argv[2])
"""


def reference(q, k, v, pos, max_len, real, tsw=None, ts=None, candidates=0):
    """SiLU(q k^T + rab) / L under the causal / M-FALCON mask, with dense [B, L, L] bias and mask."""
    b, length = q.shape[:2]
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    bias = pos[(max_len - 1 + j - i).clamp(0, 2 * max_len - 2)].expand(b, length, length)
    if ts is not None:
        nxt = torch.cat([ts[:, 1:], ts[:, -1:]], 1)
        gap = (nxt[:, :, None] - ts[:, None, :]).abs().clamp(min=1).double()
        bias = bias + tsw[(torch.log(gap) / 0.301).floor().long().clamp(0, 128)]  # float64: exact here
    hist = length - candidates
    history_rule = (j <= i) & (real[:, None, :] | (i == j))
    candidate_rule = ((j < hist) & real[:, None, :]) | (i == j)
    allowed = torch.where(i >= hist, candidate_rule, history_rule)
    s = torch.einsum("blha,bmha->bhlm", q.double(), k.double()) + bias[:, None].double()
    p = s * torch.sigmoid(s) / length * allowed[:, None]
    return torch.einsum("bhlm,bmhd->blhd", p, v.double()).float()


def case(b, length, heads, a, dv, max_len, pad, times, candidates, seed):
    g = torch.Generator().manual_seed(seed)
    real = torch.ones(b, length, dtype=torch.bool)
    for row, n in enumerate(pad):
        real[row, :n] = False
    c = {"q": torch.randn(b, length, heads, a, generator=g), "k": torch.randn(b, length, heads, a, generator=g),
         "v": torch.randn(b, length, heads, dv, generator=g), "pos": torch.randn(2 * max_len - 1, generator=g),
         "max_len": torch.tensor(max_len), "real": real, "candidates": torch.tensor(candidates)}
    if times:
        c["tsw"] = torch.randn(129, generator=g)
        c["ts"] = torch.cumsum(torch.randint(0, 200_000, (b, length), generator=g), 1)
    return c


def hstu_model():
    from recompress.families import get_family
    from recompress.spec import ModelSpec, TableSpec
    fam = get_family("hstu")
    hp = fam.hparams({"dim": 16, "heads": 2, "max_len": 20})
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
    }
    spec, model = hstu_model()
    g = torch.Generator().manual_seed(6)
    history = torch.randint(1, 61, (4, 20), generator=g)
    history[1, :8] = 0
    history[3, :19] = 0
    timestamps = torch.cumsum(torch.randint(0, 100_000, (4, 20), generator=g), 1)
    model_case = {f"state.{k}": v for k, v in model.state_dict().items()}
    model_case.update(history=history, timestamps=timestamps,
                      spec=torch.frombuffer(bytearray(spec.to_json().encode()), dtype=torch.uint8))
    torch.save({**cases, "model": model_case}, tmp_path / "in.pt")
    (tmp_path / "run.py").write_text(RUNNER)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for name, c in cases.items():
        want = reference(c["q"], c["k"], c["v"], c["pos"], int(c["max_len"]), c["real"], c.get("tsw"), c.get("ts"),
                         int(c["candidates"]))
        assert got[name].shape == want.shape
        err = (got[name] - want).abs().max().item()
        assert err < 1e-5 * max(1.0, want.abs().max().item()), (name, err)
    with torch.no_grad():
        decomposed = model.encode(history, timestamps)
    real = history > 0
    assert (got["model_triton"][real] - decomposed[real]).abs().max().item() < 1e-5
    assert math.isfinite(got["model_triton"].abs().sum().item())


def test_triton_form_refuses_training():
    from recompress.errors import UserError
    from recompress.models.attention import set_attention
    _, model = hstu_model()
    model.train()
    set_attention(model, "triton")
    with pytest.raises(UserError, match="forward-only"):
        model.encode(torch.randint(1, 61, (2, 20)), None)
