"""The CLI as a user sees it: the flow end to end, and bad input -> one line, exit 2, nothing written."""

import json
import subprocess
import sys
import zipfile

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from recompress import __version__
from recompress.cli import main
from recompress.data.synthetic import make_synthetic

from .conftest import tree_hash


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(res, fragment):
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("error: ") and fragment in lines[0], res.stderr
    assert "Traceback" not in res.output and len(lines) <= 2


def test_version_and_help():
    assert cli("--version").output.strip().endswith(__version__)
    res = cli("--help")
    for cmd in ("checkpoint", "export", "evaluate", "inspect", "run", "train", "data"):
        assert cmd in res.output


def test_flow_train_mlet_export_evaluate(tiny_data, tmp_path):
    d = tiny_data.path
    assert cli("train", "--data", d, "--dim", 8, "--bottom", 16, "--top", 16, "--epochs", 2, "--lr", 3e-3,
               "--batch-size", 128, "-o", tmp_path / "base").exit_code == 0
    res = cli("checkpoint", tmp_path / "base", "--method", "mlet", "--dim", 2, "--data", d, "--steps", 30,
              "-o", tmp_path / "m2")
    assert res.exit_code == 0 and "4.00x smaller" in res.output
    assert cli("export", tmp_path / "m2", "--target", "onnx", "--data", d, "-o", tmp_path / "e").exit_code == 0
    res = cli("evaluate", tmp_path / "e", "--data", d, "--batch-sizes", "1,8", "--repeats", 5, "--json", tmp_path / "r.json")
    assert res.exit_code == 0 and "AUC (onnxruntime, test)" in res.output
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["model"]["emb_dim"] == 2 and r["model"]["methods"] == ["mlet"]
    res = cli("evaluate", tmp_path / "base", "--data", d, "--no-latency", "--compare", tmp_path / "r.json")
    assert res.exit_code == 0 and "compared with baseline" in res.output and "4.000x" in res.output
    info = json.loads(cli("inspect", tmp_path / "e", "--json").output)
    assert info["format"] == "onnx export" and info["embedding_bytes"] == sum(tiny_data.table_rows) * 2 * 4


@pytest.fixture()
def workdir(tiny_ckpt, tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    for f in tiny_ckpt.iterdir():
        (ck / f.name).write_bytes(f.read_bytes())
    return ck


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "model.pt"
    p.write_bytes(b"\x00garbage" * 100)
    assert_user_error(cli("checkpoint", p, "--method", "lowrank", "--rank", 2, "-o", tmp_path / "o"),
                      "not a checkpoint format recompress knows")
    assert not (tmp_path / "o").exists()


def test_truncated_safetensors_input_untouched(workdir, tmp_path):
    w = workdir / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    before = tree_hash(workdir)
    assert_user_error(cli("export", workdir, "-o", tmp_path / "o"), "not a readable safetensors file")
    assert tree_hash(workdir) == before and not (tmp_path / "o").exists()


def test_spec_mismatch(workdir, tmp_path):
    s = workdir / "spec.json"
    s.write_text(s.read_text().replace('"emb_dim": 8', '"emb_dim": 6'))
    assert_user_error(cli("inspect", workdir), "spec")


def test_nan_weights_cli(workdir, tmp_path):
    sd = load_file(workdir / "weights.safetensors")
    sd["top.0.weight"][0, 0] = float("inf")
    save_file(sd, workdir / "weights.safetensors")
    assert_user_error(cli("export", workdir, "-o", tmp_path / "o"), "NaN/Inf")


@pytest.mark.parametrize("args,fragment", [
    (["--dim", 8], "is not below the current embedding width 8"),
    (["--dim", 4, "--hidden", 2], "--hidden 2 is smaller than --dim 4"),
])
def test_impossible_dims(workdir, tiny_data, tmp_path, args, fragment):
    before = tree_hash(workdir)
    res = cli("checkpoint", workdir, "--method", "mlet", *args, "--data", tiny_data.path, "-o", tmp_path / "o")
    assert_user_error(res, fragment)
    assert tree_hash(workdir) == before and not (tmp_path / "o").exists()


def test_wrong_columns_data_file(tmp_path):
    src = tmp_path / "train.txt"
    src.write_text("0\t1\t2\n")
    assert_user_error(cli("data", "criteo", src, "-o", tmp_path / "d"), "line 1: 3 tab-separated fields")
    assert not (tmp_path / "d").exists()


def test_ids_out_of_range(workdir, tmp_path):
    bigger = make_synthetic(tmp_path / "big", samples=300, table_rows=[5000, 200, 40, 7], seed=1)
    assert_user_error(cli("evaluate", workdir, "--data", bigger, "--no-latency"), "ids out of range")


def test_existing_output_not_overwritten(workdir, tiny_data, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(cli("export", workdir, "-o", out), "already exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_recipe_validation(tmp_path):
    r = tmp_path / "r.toml"
    r.write_text('name = "x"\n[data]\nkind = "synthetic"\n[train]\ndimm = 4\n')
    assert_user_error(cli("run", r), "unknown key train.dimm; did you mean 'dim'?")
    r.write_text('name = "x"\n[data]\nsamples = "many"\n[train]\ndim = 4\n')
    assert_user_error(cli("run", r), "data.samples is str 'many', expected int")


TINY_RECIPE = """name = "tiny"
[data]
kind = "synthetic"
samples = 4000
tables = [600, 100, 20]
zipf = 1.4
[train]
dim = 8
bottom = [16]
top = [16]
epochs = 3
lr = 0.003
batch_size = 128
[[variants]]
name = "mlet-d2"
method = "mlet"
dim = 2
steps = 20
[evaluate]
batch_sizes = [1, 32]
repeats = 5
"""


def _rows(folder):
    return [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]


def test_recipe_end_to_end_resumes_from_cache(tmp_path):
    r = tmp_path / "tiny.toml"
    r.write_text(TINY_RECIPE)
    res = cli("run", r, "-o", tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert "(0 of 7 steps reused from cache)" in res.output
    rows = _rows(tmp_path / "run")
    assert [x["variant"] for x in rows] == ["baseline", "mlet-d2"]
    assert rows[1]["emb_bytes"] * 4 == rows[0]["emb_bytes"]
    assert all(x["auc"] > 0.55 for x in rows) and rows[0]["latency_ratio"] == {"1": 1.0, "32": 1.0}
    for f in ("pareto_auc_vs_bytes.png", "pareto_auc_vs_latency.png"):
        assert (tmp_path / "run" / f).stat().st_size > 10_000
    assert "mlet-d2" in (tmp_path / "run" / "report.md").read_text()
    page = (tmp_path / "run" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "mlet-d2" in page  # self-contained
    assert (tmp_path / "run" / "results.csv").read_text().splitlines()[0].startswith("variant,target,method,auc")
    # unchanged re-run: everything cached, same accuracy; an edited variant re-runs only its own steps
    res = cli("run", r, "-o", tmp_path / "run")
    assert "(7 of 7 steps reused from cache)" in res.output
    assert [x["auc"] for x in _rows(tmp_path / "run")] == [x["auc"] for x in rows]
    r.write_text(TINY_RECIPE.replace("steps = 20", "steps = 21"))
    res = cli("run", r, "-o", tmp_path / "run")
    assert "(4 of 7 steps reused from cache)" in res.output


def test_bench_sweep_and_regression_gate(tmp_path):
    r = tmp_path / "tiny.toml"
    r.write_text(TINY_RECIPE.split("[[variants]]")[0] + "[evaluate]\nbatch_sizes = [8]\nrepeats = 5\n")
    res = cli("bench", r, "-o", tmp_path / "b", "--sweep", "hash:ratio=2,4", "--sweep", "int8",
              "--save-baseline", tmp_path / "base.json")
    assert res.exit_code == 0, res.output
    assert [x["variant"] for x in _rows(tmp_path / "b")] == ["baseline", "hash ratio=2.0", "hash ratio=4.0", "int8"]
    res = cli("bench", r, "-o", tmp_path / "b", "--sweep", "hash:ratio=2,4", "--sweep", "int8",
              "--baseline", tmp_path / "base.json", "--fail-on-regression",
              "--max-latency-growth", "1000")  # 5 timed calls: latency is checked in test_gate_latency_ratio
    assert res.exit_code == 0 and "gate passed" in res.output
    base = json.loads((tmp_path / "base.json").read_text())
    base["rows"][3]["auc"] += 0.01      # the baseline claims int8 was more accurate
    base["rows"][1]["emb_bytes"] //= 2  # ... and hash 2x smaller than it is
    (tmp_path / "worse.json").write_text(json.dumps(base))
    res = cli("bench", r, "-o", tmp_path / "b", "--sweep", "hash:ratio=2,4", "--sweep", "int8",
              "--baseline", tmp_path / "worse.json", "--fail-on-regression",
              "--max-latency-growth", "1000")
    assert res.exit_code == 1 and "REGRESSION: 2 of" in res.stderr
    gate = json.loads((tmp_path / "b" / "gate.json").read_text())
    assert {(c["variant"], c["metric"]) for c in gate["checks"] if not c["ok"]} == {("int8", "auc"),
                                                                                    ("hash ratio=2.0", "emb_bytes")}
    assert_user_error(cli("bench", r, "--sweep", "hash:ration=2"), "unknown parameter 'ration'; did you mean 'ratio'?")
    assert_user_error(cli("bench", r, "--fail-on-regression"), "--fail-on-regression needs --baseline")


@pytest.mark.slow
def test_wheel_contains_stage_packages(tmp_path):
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(root)], check=True)
    names = zipfile.ZipFile(next(tmp_path.glob("recompress-*.whl"))).namelist()
    for mod in ("recompress/compress/mlet.py", "recompress/export/onnx.py", "recompress/evaluate/run.py",
                "recompress/recipes/quickstart.toml", "recompress/cli.py"):
        assert mod in names
    assert not any(n.split("/")[0] in {"compress", "export", "evaluate", "recipes", "tests"} for n in names)


def test_cli_tt_from_scratch_then_int8_export_and_lookup_costs(tiny_data, tmp_path):
    res = cli("train", "--data", tiny_data.path, "-o", tmp_path / "tt", "--dim", "8", "--method", "tt",
              "--tt-rank", "4", "--min-rows", "100", "--epochs", "2", "--lr", "0.003", "--batch-size", "128")
    assert res.exit_code == 0, res.output
    val = float(res.output.split("val AUC ")[1].split(",")[0])
    assert val > 0.55  # the planted signal is learnable through TT tables
    res = cli("checkpoint", tmp_path / "tt", "--method", "int8", "-o", tmp_path / "tt8")
    assert res.exit_code == 0 and "smaller" in res.output
    info = json.loads(cli("inspect", tmp_path / "tt8", "--json").output)
    kinds = {t["name"]: t["kind"] for t in info["tables"]}
    assert kinds == {"C1": "tt+int8", "C2": "tt+int8", "C3": "dense+int8", "C4": "dense+int8"}
    res = cli("evaluate", tmp_path / "tt8", "--data", tiny_data.path, "--no-latency", "--json", tmp_path / "r.json")
    r = json.loads((tmp_path / "r.json").read_text())
    per_table = r["lookup"]["tables"]
    assert per_table["C1"]["flops"] > 0 and per_table["C4"]["flops"] == 0
    assert r["lookup"]["per_sample"]["bytes_read_gpu"] == sum(c["bytes_read_gpu"] for c in per_table.values())


def test_cli_bad_compression_parameters(workdir, tmp_path):
    for args, fragment in [(["--method", "int3"], "int3 is not a supported row-wise format"),
                           (["--method", "tt", "--tt-rank", "0"], "--tt-rank 0 is impossible"),
                           (["--method", "qr", "--collisions", "100000"], "--collisions 100000 is impossible")]:
        res = cli("checkpoint", workdir, *args, "-o", tmp_path / "out")
        assert_user_error(res, fragment)
        assert not (tmp_path / "out").exists()


def test_gate_latency_ratio_and_missing_variants():
    from recompress.gate import Tolerances, compare
    row = lambda v, ratio: {"variant": v, "target": "onnx", "auc": 0.7, "emb_bytes": 100,  # noqa: E731
                            "latency_ratio": {"512": ratio}}
    base = {"rows": [row("baseline", 1.0), row("tt", 2.0), row("int8", 1.1)]}
    new = {"rows": [row("baseline", 1.0), row("tt", 3.1)]}
    bad = [(c["variant"], c["metric"]) for c in compare(new, base, Tolerances(latency_growth=1.5)) if not c["ok"]]
    assert bad == [("tt", "latency ratio b=512"), ("int8", "present")]
    new["rows"][1]["latency_ratio"]["512"] = 2.9
    assert [c["variant"] for c in compare(new, base, Tolerances(latency_growth=1.5)) if not c["ok"]] == ["int8"]


@pytest.mark.parametrize("name", ["quickstart", "dlrm-criteo", "ci-smoke"])
def test_shipped_recipes_validate(name):
    from recompress.pipeline import Variant
    from recompress.recipe import load_recipe
    r = load_recipe(name)
    assert r["name"] == name and r["variants"]
    for v in r["variants"]:
        Variant.from_recipe(v)  # every variant's keys map to a method parameter or a known setting


def test_recipe_with_missing_criteo_file(tmp_path):
    r = tmp_path / "c.toml"
    r.write_text(f'name = "c"\n[data]\nkind = "criteo"\npath = "{tmp_path / "nope.txt"}"\n[train]\ndim = 4\n')
    assert_user_error(cli("run", r, "-o", tmp_path / "run"), "does not exist")
