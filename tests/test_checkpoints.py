import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from recompress.adapters import load_any
from recompress.adapters.torch_files import safe_torch_load
from recompress.checkpoint import load_checkpoint, save_checkpoint
from recompress.errors import UserError

from .conftest import shared_path


def reference_row(sd, t, ids, qr_op=None):
    """dlrm's lookup of table ``t`` (plain, QREmbeddingBag, PrEmbeddingBag) for one id per row."""
    p = f"emb_l.{t}."
    if p + "weight_q" in sd:
        c = sd[p + "weight_r"].shape[0]
        q, r = sd[p + "weight_q"][ids // c], sd[p + "weight_r"][ids % c]
        return {"mult": q * r, "add": q + r, "concat": torch.cat([q, r], 1)}[qr_op]
    if p + "embs.weight" in sd:
        e = sd[p + "embs.weight"][ids]
        return e @ sd[p + "proj.weight"].T if p + "proj.weight" in sd else e
    return sd[p + "weight"][ids]


def reference_dlrm(sd, dense, ids, pad=0, itself=False, qr_op=None):
    """facebookresearch/dlrm's forward written out from the state_dict (one-hot bags)."""
    x = dense
    i = 0
    while f"bot_l.{i}.weight" in sd:
        x = torch.relu(x @ sd[f"bot_l.{i}.weight"].T + sd[f"bot_l.{i}.bias"])
        i += 2
    embs = [reference_row(sd, t, ids[:, t], qr_op) for t in range(ids.shape[1])]
    t = torch.stack([x, *embs], 1)
    z = t @ t.transpose(1, 2)
    f = t.shape[1]
    pairs = [z[:, a, b] for a in range(f) for b in range(a + (1 if itself else 0))]
    h = torch.cat([x, torch.stack(pairs, 1), torch.zeros(len(x), pad)], 1)
    j = 0
    keys = sorted({int(k.split(".")[1]) for k in sd if k.startswith("top_l.")})
    for n, j in enumerate(keys):
        h = h @ sd[f"top_l.{j}.weight"].T + sd[f"top_l.{j}.bias"]
        if n < len(keys) - 1:
            h = torch.relu(h)
    return h.squeeze(-1)


def dlrm_state(rows=(30, 7, 12), m=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = len(rows) + 1
    sd = {f"emb_l.{i}.weight": torch.randn(r, m, generator=g) for i, r in enumerate(rows)}
    for k, (o, i) in {"bot_l.0": (8, 13), "bot_l.2": (m, 8), "top_l.0": (8, m + f * (f - 1) // 2),
                      "top_l.2": (1, 8)}.items():
        sd[f"{k}.weight"], sd[f"{k}.bias"] = torch.randn(o, i, generator=g) * 0.3, torch.randn(o, generator=g) * 0.1
    return sd


def test_dlrm_adapter_matches_reference_forward(tmp_path):
    sd = dlrm_state()
    path = tmp_path / "dlrm.pt"
    torch.save({"state_dict": sd, "nepochs": 1, "test_acc": 0.7}, path)
    ck = load_any(path)
    dense, ids = torch.rand(9, 13), torch.stack([torch.randint(0, r, (9,)) for r in (30, 7, 12)], 1)
    assert torch.allclose(ck.model(dense, ids.unsqueeze(-1)), reference_dlrm(sd, dense, ids), atol=1e-5)
    assert ck.spec.provenance["source_format"] == "dlrm"


@pytest.mark.shared_data
def test_dlrm_fixture_and_nvidia_fixture():
    path = shared_path("fixtures/checkpoints/dlrm_sample.pt")
    sd = torch.load(path, weights_only=True)["state_dict"]
    ck = load_any(path)
    assert [t.rows for t in ck.model.tables.values()] == [1000, 50, 300]
    dense, ids = torch.rand(5, 13), torch.stack([torch.randint(0, r, (5,)) for r in (1000, 50, 300)], 1)
    assert torch.allclose(ck.model(dense, ids.unsqueeze(-1)), reference_dlrm(sd, dense, ids), atol=1e-4)
    nv = load_any(shared_path("fixtures/checkpoints/nvidia_dlrm"))
    assert nv.spec.hparams["interaction_pad"] == 2  # cuda_dot pads 22 -> 24
    assert nv.model.top[0].weight.shape == (64, 24)


def qr_md_state(m=4, seed=1):
    """A dlrm state dict with a plain (30 rows), a QR (40 rows, 4 collisions) and an MD table (12 rows, width 2)."""
    g = torch.Generator().manual_seed(seed)
    sd = dlrm_state(rows=(30, 40, 12), m=m, seed=seed)
    del sd["emb_l.1.weight"], sd["emb_l.2.weight"]
    sd.update({"emb_l.1.weight_q": torch.randn(10, m, generator=g), "emb_l.1.weight_r": torch.randn(4, m, generator=g),
               "emb_l.2.embs.weight": torch.randn(12, 2, generator=g), "emb_l.2.proj.weight": torch.randn(m, 2, generator=g)})
    return sd


def test_dlrm_qr_and_mixed_dimension_tables_match_dlrm_and_the_qr_operation_is_asked_for(tmp_path):
    import numpy as np
    sd = qr_md_state()
    path = tmp_path / "qr_md.pt"  # an --mlperf-logging run stores test_auc as a numpy scalar
    torch.save({"state_dict": sd, "nepochs": 1, "test_auc": np.float64(0.7812), "opt_state_dict": {"state": {}}}, path)
    with pytest.raises(UserError, match="does not say qr_operation") as e:
        load_any(path)
    assert "--hp qr_operation=mult|add" in e.value.hint
    dense, ids = torch.rand(9, 13), torch.stack([torch.randint(0, r, (9,)) for r in (30, 40, 12)], 1)
    for op in ("mult", "add"):
        ck = load_any(path, {"qr_operation": op})
        assert torch.allclose(ck.model(dense, ids.unsqueeze(-1)), reference_dlrm(sd, dense, ids, qr_op=op), atol=1e-5)
        assert [t.kind for t in ck.model.tables.values()] == ["dense", "qr", "factorized"]
        assert ck.spec.provenance["hparam_source"]["qr_operation"] == "user"
        assert ck.spec.provenance["upstream_metrics"]["test_auc"] == pytest.approx(0.7812)
    with pytest.raises(UserError, match="--hp qr_operation=sub: not one of mult, add"):
        load_any(path, {"qr_operation": "sub"})
    with pytest.raises(UserError, match="no hyper-parameter 'heads'"):
        load_any(path, {"heads": "2"})
    with pytest.raises(UserError, match="no hyper-parameter 'qr_operaton'") as e:  # a typo: the key it meant
        load_any(path, {"qr_operaton": "mult"})
    assert e.value.hint.startswith("did you mean qr_operation? known: ")


def test_dlrm_qr_concat_is_read_from_shapes_and_wrapper_prefixes_are_removed(tmp_path):
    sd = qr_md_state(m=4)
    sd["emb_l.1.weight_q"], sd["emb_l.1.weight_r"] = sd["emb_l.1.weight_q"][:, :2], sd["emb_l.1.weight_r"][:, :2]
    wrapped = {("module." + k).replace("bot_l.", "bot_l.module."): v for k, v in sd.items()}  # DDP, as dlrm's multi-process run
    path = tmp_path / "concat.pt"
    torch.save({"state_dict": wrapped}, path, _use_new_zipfile_serialization=False)  # the pre-1.6 torch format
    ck = load_any(path)
    assert ck.spec.provenance["hparam_source"]["qr_operation"] == "shapes"
    dense, ids = torch.rand(9, 13), torch.stack([torch.randint(0, r, (9,)) for r in (30, 40, 12)], 1)
    assert torch.allclose(ck.model(dense, ids.unsqueeze(-1)), reference_dlrm(sd, dense, ids, qr_op="concat"), atol=1e-5)


def test_inspect_lists_tables_sources_and_what_is_missing(tmp_path):
    from click.testing import CliRunner

    from recompress.cli import main
    path = tmp_path / "qr_md.pt"
    torch.save({"state_dict": qr_md_state()}, path)
    res = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    info = json.loads(res.output)
    assert info["format"] == "dlrm" and info["family"] == "dlrm"
    assert [(t["name"], t["kind"], t["rows"], t["dim"], t["dtype"], t["bytes"]) for t in info["tables"]] == [
        ("emb_0", "dense", 30, 4, "float32", 30 * 4 * 4), ("emb_1", "qr", 40, 4, "float32", (10 + 4) * 4 * 4),
        ("emb_2", "factorized", 12, 4, "float32", (12 * 2 + 4 * 2) * 4)]
    assert info["hparams"]["emb_dim"] == 4 and info["hparam_source"]["emb_dim"] == "shapes"
    assert info["missing"] == [{"hp": "qr_operation", "values": ["mult", "add"], "why": info["missing"][0]["why"]}]
    text = CliRunner().invoke(main, ["inspect", str(path)]).output
    assert "still to supply: --hp qr_operation=mult|add" in text
    text = CliRunner().invoke(main, ["inspect", str(path), "--hp", "qr_operation=add"]).output
    assert "qr_operation = \"add\"  (user)" in text and "still to supply" not in text


def test_refuses_arbitrary_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"emb_l.0.weight": torch.zeros(2, 2)}, "obj": Evil()}, path)
    with pytest.raises(UserError, match="would run code when unpickled: it calls builtins.print"):
        load_any(path)


def test_native_round_trip_exact(tiny_ckpt, tmp_path):
    a = load_checkpoint(tiny_ckpt)
    save_checkpoint(a, tmp_path / "copy")
    b = load_checkpoint(tmp_path / "copy")
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.spec.to_json() == b.spec.to_json()
    assert (tmp_path / "copy" / "weights.safetensors").read_bytes() == (tiny_ckpt / "weights.safetensors").read_bytes()


def copy_ckpt(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_weights(tiny_ckpt, tmp_path):
    c = copy_ckpt(tiny_ckpt, tmp_path / "c")
    w = c / "weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(c)


def test_spec_disagrees_with_weights(tiny_ckpt, tmp_path):
    c = copy_ckpt(tiny_ckpt, tmp_path / "c")
    spec = (c / "spec.json").read_text().replace('"rows": 800', '"rows": 801')
    (c / "spec.json").write_text(spec)
    with pytest.raises(UserError, match=r"has shape \[800, 8\] but spec.json implies \[801, 8\]"):
        load_checkpoint(c)


def test_nan_weights(tiny_ckpt, tmp_path):
    c = copy_ckpt(tiny_ckpt, tmp_path / "c")
    sd = load_file(c / "weights.safetensors")
    sd["tables.C2.weight"][3, 1] = float("nan")
    save_file(sd, c / "weights.safetensors")
    with pytest.raises(UserError, match="'tables.C2.weight' has 1 NaN/Inf"):
        load_checkpoint(c)


def test_unknown_format(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(UserError, match="not a checkpoint format recompress knows"):
        load_any(p)


def _x(text):
    b = text.encode()
    return b"X" + len(b).to_bytes(4, "little") + b


@pytest.mark.parametrize("body", [
    b"\x80\x02c_codecs\nencode\n" + _x("x") + _x("no-such-codec") + b"\x86R.",  # LookupError inside the unpickler
    b"\x80\x02cbuiltins\nbytearray\n\x8a\x09" + b"\x00" * 8 + b"\x01\x85R.",  # OverflowError: bytearray(2**64)
    b"\x80\x02cbuiltins\nbytearray\n\x8a\x08" + b"\x00" * 7 + b"\x40\x85R.",  # MemoryError: bytearray(2**62)
    b"\x80\x02ctorch.cuda\nFloatTensor\n)R.",  # TypeError on a CPU build
], ids=["lookup", "overflow", "memory", "cuda"])
def test_hostile_pickles_fail_cleanly_not_with_a_traceback(tmp_path, body):
    """Found by an independent review: these escaped safe_torch_load as tracebacks."""
    path = tmp_path / "bad.pt"
    path.write_bytes(body)
    with pytest.raises(UserError, match="not a readable torch file"):
        safe_torch_load(path)


def test_zip_with_a_bad_persistent_id_fails_cleanly(tmp_path):
    path = tmp_path / "bad.pt"
    w = torch._C.PyTorchFileWriter(str(path))
    w.write_record("data.pkl", b"\x80\x02K\x01Q.", 6)  # a persistent id that is not a tuple: AssertionError in torch
    w.write_end_of_file()
    with pytest.raises(UserError, match="not a readable torch file"):
        safe_torch_load(path)
