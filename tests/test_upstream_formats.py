"""Checkpoints in upstream layouts, written here the way the upstream code writes them: recognized, rebuilt
to score as the upstream forward does, compressed, exported with parity, and refused clearly when they
contradict themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from recompress.adapters import describe, load_any
from recompress.cli import main
from recompress.errors import UserError

from .conftest import shared_path
from .test_sequential_models import fresh, full_history, pmixer_log2feats, seq_data  # noqa: F401 (fixture)

PMIXER_NAME = "SASRec.epoch=20.lr=0.001.layer=2.head=2.hidden=16.maxlen=12.pth"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def pmixer_state(model) -> dict[str, torch.Tensor]:
    """Our SASRec's weights under SASRec.pytorch's keys (its feed-forward layers are Conv1d, k = 1)."""
    out = {}
    for k, v in model.state_dict().items():
        k = {"tables.item.weight": "item_emb.weight", "tables.position.weight": "pos_emb.weight"}.get(k, k)
        out[k] = v.unsqueeze(-1) if ".conv" in k and k.endswith("weight") else v.clone()
    out["item_emb.weight"][0] = 0  # its padding_idx rows
    out["pos_emb.weight"][0] = 0
    return out


def write_pmixer(folder: Path, model, args: dict[str, str] | None, name: str = PMIXER_NAME) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    torch.save(pmixer_state(model), path)
    if args is not None:  # main.py's args.txt: sorted key,value lines
        (folder / "args.txt").write_text("\n".join(f"{k},{v}" for k, v in sorted(args.items())))
    return path


@pytest.mark.parametrize("wiring,args", [("post-ln", {"norm_first": "False"}), ("pre-ln", {"norm_first": "True"}),
                                         ("pmixer-2020", {})])
def test_sasrec_pytorch_checkpoints_score_as_its_forward(seq_data, tmp_path, wiring, args):  # noqa: F811
    _, m = fresh("sasrec", seq_data, wiring=wiring)
    args = {"dataset": "syn", "hidden_units": "16", "maxlen": "12", "num_blocks": "2", "num_heads": "2",
            "dropout_rate": "0.5", **args}
    path = write_pmixer(tmp_path, m, args)
    found = describe(path)
    assert found.format == "sasrec.pytorch" and not found.missing
    assert found.hparams["wiring"] == wiring and found.sources["wiring"] == "sidecar: args.txt"
    assert (found.sources["heads"], found.sources["dim"], found.hparams["dropout"]) == ("file name", "shapes", 0.5)
    ck = load_any(path)
    seq = full_history(seq_data).clone()
    seq[0, :5], seq[1, :10] = 0, 0
    cand = torch.arange(151)[None]
    ref_model = fresh("sasrec", seq_data, wiring=wiring)[1]
    ref_model.load_state_dict(ck.model.state_dict())
    with torch.no_grad():
        h = pmixer_log2feats(ref_model, seq, wiring)[:, -1]
        want = h @ torch.cat([torch.zeros(1, 16), ck.model.tables["item"].weight[1:]]).T
        assert torch.allclose(ck.model(seq, cand), want, atol=1e-5)


def test_sasrec_pytorch_without_args_txt_asks_for_the_wiring_and_takes_it(seq_data, tmp_path):  # noqa: F811
    _, m = fresh("sasrec", seq_data, wiring="pmixer-2020")
    path = write_pmixer(tmp_path, m, None)
    with pytest.raises(UserError, match="does not say wiring") as e:
        load_any(path)
    assert "--hp wiring=post-ln|pre-ln|pmixer-2020" in e.value.hint
    ck = load_any(path, {"wiring": "pmixer-2020"})
    assert ck.spec.provenance["hparam_source"]["wiring"] == "user" and ck.spec.hparams["heads"] == 2
    renamed = write_pmixer(tmp_path / "r", m, None, name="model.pth")  # no file name hints either
    assert set(describe(renamed).missing) == {"heads", "wiring"}
    assert load_any(renamed, {"heads": "2", "wiring": "pmixer-2020"}).spec.hparams["heads"] == 2
    with pytest.raises(UserError, match="heads = 3 does not divide the width 16"):
        load_any(renamed, {"heads": "3", "wiring": "pmixer-2020"})


def test_sasrec_pytorch_contradictions_are_refused(seq_data, tmp_path):  # noqa: F811
    _, m = fresh("sasrec", seq_data)
    lying = write_pmixer(tmp_path / "a", m, None, name=PMIXER_NAME.replace("hidden=16", "hidden=32"))
    with pytest.raises(UserError, match="the file name says dim = 32, the tensors' shapes say 16"):
        describe(lying)
    state = pmixer_state(m)
    state["pos_emb.weight"] = state["pos_emb.weight"][:12]  # before 2024-06-25: maxlen rows, no padding row
    (tmp_path / "b").mkdir()
    torch.save(state, tmp_path / "b" / PMIXER_NAME)
    with pytest.raises(UserError, match="before commit 33bc1d8"):
        describe(tmp_path / "b" / PMIXER_NAME)


def test_sasrec_pytorch_evaluates_compresses_and_exports(seq_data, tmp_path):  # noqa: F811
    _, m = fresh("sasrec", seq_data)
    path = write_pmixer(tmp_path / "run", m, {"norm_first": "False", "num_heads": "2"})
    res = cli("evaluate", path, "--data", seq_data.path, "--no-latency", "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    base = json.loads((tmp_path / "r.json").read_text())["accuracy"]["torch"]["ndcg@10"]
    res = cli("checkpoint", path, "--method", "int8", "-o", tmp_path / "q")
    assert res.exit_code == 0, res.output
    res = cli("evaluate", tmp_path / "q", "--data", seq_data.path, "--no-latency", "--json", tmp_path / "q.json")
    q = json.loads((tmp_path / "q.json").read_text())["accuracy"]["torch"]["ndcg@10"]
    assert abs(q - base) < 0.01
    res = cli("export", tmp_path / "q", "--data", seq_data.path, "-o", tmp_path / "x")
    assert res.exit_code == 0 and "parity max |diff|" in res.output, res.output
    spec = json.loads((tmp_path / "q" / "spec.json").read_text())
    assert spec["provenance"]["source_format"] == "sasrec.pytorch" and spec["hparams"]["attend_padding"] is True


@pytest.mark.shared_data
def test_the_real_sasrec_pytorch_checkpoint():
    path = shared_path("fixtures/checkpoints/SASRec.epoch=1000.lr=0.001.layer=2.head=1.hidden=50.maxlen=200.pth")
    found = describe(path)
    assert (found.hparams["num_items"], found.hparams["dim"], found.hparams["max_len"], found.hparams["heads"]) == \
        (3416, 50, 200, 1)
    assert list(found.missing) == ["wiring"]  # no args.txt was committed with it
    ck = load_any(path, {"wiring": "pmixer-2020"})  # written by the 2020-2025 code (fixtures README)
    sd = torch.load(path, weights_only=True, map_location="cpu")  # saved from CUDA tensors
    assert torch.equal(ck.model.tables["item"].weight, sd["item_emb.weight"])
    assert torch.equal(ck.model.forward_layers[1].conv2.weight, sd["forward_layers.1.conv2.weight"][..., 0])
