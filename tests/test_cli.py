"""The CLI as a user sees it: the flow end to end, and bad input -> one line, exit 2, nothing written."""

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from recompress import __version__
from recompress.cli import main
from recompress.data.synthetic import make_synthetic

from .conftest import shared_path, tree_hash


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(res, fragment):
    """Exit 2 and exactly one line on stderr, ``error: <problem>; hint: <fix>``, naming ``fragment``."""
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    errors = [ln for ln in lines if ln.startswith("error")]
    assert len(errors) == 1 and not any(ln.lstrip().startswith("hint") for ln in lines), res.stderr
    assert errors[0].startswith("error: ") and fragment in errors[0] and "; hint: " in errors[0], res.stderr
    assert "Traceback" not in res.output


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
    assert res.exit_code == 0 and "auc (onnxruntime, test)" in res.output
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["model"]["emb_dim"] == 2 and r["model"]["methods"] == ["mlet"]
    res = cli("evaluate", tmp_path / "base", "--data", d, "--no-latency", "--compare", tmp_path / "r.json")
    assert res.exit_code == 0 and "compared with baseline" in res.output and "4.000x" in res.output
    res = cli("evaluate", tmp_path / "base", "--data", d, "--no-latency", "--compare", tmp_path / "r.json",
              "--json", tmp_path / "b.json")  # the comparison printed is also kept in the JSON
    b = json.loads((tmp_path / "b.json").read_text())
    c = b["compare"]
    new_auc, base_auc = b["accuracy"]["torch"]["auc"], r["accuracy"]["onnxruntime"]["auc"]
    assert c["baseline"] == str(tmp_path / "r.json") and c["metric"] == "auc" and c["rows"] == r["data"]["rows"]
    assert abs(c["delta"] - (new_auc - base_auc)) < 1e-9 and c["lo"] <= c["delta"] <= c["hi"]
    info = json.loads(cli("inspect", tmp_path / "e", "--json").output)
    assert info["format"] == "onnx export" and info["embedding_bytes"] == sum(tiny_data.table_rows) * 2 * 4
    assert cli("export", tmp_path / "m2", "--target", "onnx", "--dense", "int8", "--data", d,
               "-o", tmp_path / "q").exit_code == 0
    said = cli("inspect", tmp_path / "q").output.splitlines()
    assert said[0] == f"{tmp_path / 'q'}: onnx export, family dlrm", said[0]  # not "onnx export checkpoint"
    assert all(line.split()[-3] == "float32" for line in said[2:6]), said  # each table's dtype
    assert "note: dense layers int8 (ONNX Runtime's dynamic quantization); compute precision fp32" in said, said
    assert f"note: exported from {(tmp_path / 'm2').resolve()}" in said and "(source checkpoint)" in said[8], said


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


@pytest.mark.parametrize("value", [-5, 0, 1e13, '"100000"', 100000.0, "true", 1 << 50])
@pytest.mark.parametrize("command", [["inspect"], ["checkpoint", "--method", "int8", "-o", "OUT"]])
def test_impossible_table_rows_in_the_spec(workdir, tmp_path, value, command):
    s = workdir / "spec.json"
    spec = json.loads(s.read_text())
    spec["tables"][0]["rows"] = "@"
    s.write_text(json.dumps(spec).replace('"@"', str(value)))
    before = tree_hash(workdir)
    args = [str(tmp_path / "o") if a == "OUT" else a for a in command]
    assert_user_error(cli(args[0], workdir, *args[1:]), "rows")
    assert tree_hash(workdir) == before and not (tmp_path / "o").exists()


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


@pytest.mark.parametrize("rows", [5000, 799])  # more ids than rows (out of range), and fewer: another vocabulary
def test_a_vocabulary_that_does_not_match_the_tables_is_refused(workdir, tmp_path, rows):
    other = make_synthetic(tmp_path / "other", samples=300, table_rows=[rows, 200, 40, 7], seed=1)
    assert_user_error(cli("evaluate", workdir, "--data", other, "--no-latency"),
                      f"table C1 has 800 rows but the dataset's sparse feature 1 has a vocabulary of {rows:,}")


def test_existing_output_not_overwritten(workdir, tiny_data, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_user_error(cli("export", workdir, "-o", out), "holds files recompress did not write")
    assert (out / "keep.txt").read_text() == "mine"
    assert cli("export", workdir, "-o", tmp_path / "e").exit_code == 0
    assert_user_error(cli("export", workdir, "-o", tmp_path / "e"), "already exists")
    (tmp_path / "e" / "mynotes.txt").write_text("mine")  # added by hand to a folder recompress wrote
    assert_user_error(cli("export", workdir, "-o", tmp_path / "e", "--overwrite"), "did not write (mynotes.txt)")
    assert (tmp_path / "e" / "mynotes.txt").read_text() == "mine"
    (tmp_path / "e" / "mynotes.txt").unlink()
    assert cli("export", workdir, "-o", tmp_path / "e", "--overwrite").exit_code == 0


def test_recipe_validation(tmp_path):
    r = tmp_path / "r.toml"
    r.write_text('name = "x"\n[data]\nkind = "synthetic"\n[train]\ndimm = 4\n')
    assert_user_error(cli("run", r), "unknown key train.dimm; did you mean 'dim'?")
    r.write_text('name = "x"\n[data]\nsamples = "many"\n[train]\ndim = 4\n')
    assert_user_error(cli("run", r), "data.samples is str 'many', expected int")


@pytest.mark.slow
def test_wheel_contains_stage_packages(tmp_path):
    """Built from a copy of the tracked files, so the test writes nothing (no build/) into the source tree."""
    import shutil
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    had_build = (root / "build").exists()
    src = tmp_path / "src"
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.egg-info",
                                                             "__pycache__", "bench", "docs", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True)
    assert (root / "build").exists() == had_build
    names = zipfile.ZipFile(next(tmp_path.glob("recompress-*.whl"))).namelist()
    stages = {"recompress": "recompress", "compress": "recompress/compress", "export": "recompress/export",
              "evaluate": "recompress/evaluate", "recipes": "recompress/recipes"}
    expected = {f"{dest}/{f.relative_to(root / folder).as_posix()}" for folder, dest in stages.items()
                for f in (root / folder).rglob("*") if f.suffix in {".py", ".toml"} and "__pycache__" not in f.parts}
    assert "recompress/tables/rowwise.py" in expected and "recompress/recipes/quickstart.toml" in expected
    assert sorted(expected - set(names)) == []  # every module and recipe ships, subpackages included
    assert not any(n.split("/")[0] in {"compress", "export", "evaluate", "recipes", "tests"} for n in names)


def test_cli_tt_from_scratch_then_int8_export_and_lookup_costs(tiny_data, tmp_path):
    res = cli("train", "--data", tiny_data.path, "-o", tmp_path / "tt", "--dim", "8", "--method", "tt",
              "--tt-rank", "4", "--min-rows", "100", "--epochs", "2", "--lr", "0.003", "--batch-size", "128")
    assert res.exit_code == 0, res.output
    val = float(res.output.split("validation auc ")[1].split(",")[0])
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


def test_train_refuses_impossible_model_options_in_one_line(tmp_path):
    assert cli("data", "synthetic-sequences", "-o", tmp_path / "s", "--users", 60, "--items", 50).exit_code == 0
    for args, fragment in [(["--model", "hstu", "--attn-norm", 0], "attn_norm 0 is not a length"),
                           (["--model", "sasrec", "--dropout", 1.5], "--dropout 1.5 is impossible for sasrec")]:
        res = cli("train", "--data", tmp_path / "s", *args, "--epochs", 1, "-o", tmp_path / "m")
        assert_user_error(res, fragment)
        assert not (tmp_path / "m").exists()


def test_cli_bad_compression_parameters(workdir, tmp_path):
    for args, fragment in [(["--method", "int3"], "int3 is not a supported row-wise format"),
                           (["--method", "tt", "--tt-rank", "0"], "--tt-rank 0 is impossible"),
                           (["--method", "qr", "--collisions", "100000"], "--collisions 100000 is impossible")]:
        res = cli("checkpoint", workdir, *args, "-o", tmp_path / "out")
        assert_user_error(res, fragment)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["quickstart", "ci-smoke", "ci-smoke-dlrm", "ci-smoke-sasrec", "dlrm-criteo",
                                  "sasrec-beauty", "hstu-beauty"])
def test_shipped_recipes_validate(name):
    from recompress.pipeline import Variant
    from recompress.recipe import load_recipe, shipped
    assert name in shipped()
    if name in ("dlrm-criteo", "sasrec-beauty", "hstu-beauty"):
        shared_path("data")  # they read real data from ../shared
    r = load_recipe(name)
    assert r["name"] == name
    if name in ("sasrec-beauty", "hstu-beauty"):  # early stopping by epoch: 4 checks x patience 2 stopped at epoch 1
        assert (r["train"]["checks_per_epoch"], r["train"]["patience"]) == (1, 3)
    for part in r.get("parts", [r]):
        assert part["variants"]
        for v in part["variants"]:
            Variant.from_recipe(v)  # every variant's keys map to a method parameter or a known setting


def test_recipe_with_missing_criteo_file(tmp_path):
    r = tmp_path / "c.toml"
    r.write_text('name = "c"\n[data]\nkind = "criteo"\npath = "nope.txt"\n[train]\ndim = 4\n')
    res = cli("run", r, "-o", tmp_path / "run")
    assert_user_error(res, f"data.path {tmp_path / 'nope.txt'} does not exist")  # relative to the recipe's folder
    assert "--set data.path=" in res.stderr and res.stderr.count("nope.txt") == 1
    assert not (tmp_path / "run").exists()


# --- issue 8: outputs that never destroy data, one error style, fast help ---------------------------------

def test_overwrite_never_deletes_foreign_files(workdir, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "notes.txt").write_text("mine")
    assert_user_error(cli("export", workdir, "-o", scratch, "--overwrite"), "holds files recompress did not write")
    assert (scratch / "notes.txt").read_text() == "mine"
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert_user_error(cli("export", workdir, "-o", afile, "--overwrite"), "is a file")
    assert afile.read_text() == "keep"


@pytest.mark.parametrize("out", [".", "sub"], ids=["the input itself", "inside the input"])
def test_checkpoint_refuses_to_write_over_its_input(workdir, tmp_path, out):
    before = tree_hash(workdir)
    target = workdir if out == "." else workdir / out
    assert_user_error(cli("checkpoint", workdir, "--method", "int8", "-o", target, "--overwrite"), "input")
    assert tree_hash(workdir) == before


def test_run_overwrite_refuses_a_foreign_folder(tmp_path):
    r = tmp_path / "r.toml"
    r.write_text('name = "x"\n[data]\nsamples = 300\ntables = [50, 10]\n[train]\ndim = 4\n')
    foreign = tmp_path / "myfiles"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    assert_user_error(cli("run", r, "-o", foreign, "--overwrite"), "did not write")
    assert (foreign / "thesis.tex").read_text() == "years of work"


def test_missing_parent_folders_are_created(tiny_data, tmp_path):
    res = cli("data", "synthetic", "-o", tmp_path / "data" / "syn", "--samples", 200, "--tables", "20,5")
    assert res.exit_code == 0 and (tmp_path / "data" / "syn" / "meta.json").exists()


def test_click_usage_errors_use_the_same_one_line_style(tiny_data):
    res = cli("train", "--data", tiny_data.path, "-o", "x", "--dimm", 3)
    assert_user_error(res, "no such option '--dimm'. (Did you mean one of: '--dim', '--ffn-dim', '--qk-dim'?)")
    assert "recompress train --help" in res.stderr
    res = cli("export", "x", "-o", "y", "--target", "tflite")
    assert_user_error(res, "invalid value for '--target': 'tflite' is not one of 'onnx', 'trt', 'dlrm', 'torchrec'; hint:")  # no '.;'
    assert_user_error(cli("train", "--data", tiny_data.path, "-o", "x", "--dim", "wide"), "'wide' is not a valid integer")


def test_json_output_problems_surface_before_the_evaluation(workdir, tiny_data, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    res = cli("evaluate", workdir, "--data", tiny_data.path, "--no-latency", "--json", blocker / "r.json")
    assert_user_error(res, "is a file, not a folder")
    assert "scoring" not in res.stderr  # refused before any work


def test_messages_name_options_not_dicts(workdir, tmp_path):
    res = cli("checkpoint", workdir, "--method", "mlet", "--dim", 4, "-o", tmp_path / "o")
    assert_user_error(res, "mlet --dim 4 needs a dataset")
    assert "{" not in res.stderr


def test_dim_zero_is_impossible_not_not_below(workdir, tiny_data, tmp_path):
    res = cli("checkpoint", workdir, "--method", "mlet", "--dim", 0, "--data", tiny_data.path, "-o", tmp_path / "o")
    assert_user_error(res, "--dim 0 is impossible")


def test_bad_label_names_its_line(tmp_path):
    import numpy as np

    from .test_data import criteo_line
    rng = np.random.default_rng(0)
    lines = [criteo_line(rng) for _ in range(5)]
    lines[3] = "2" + lines[3][1:]
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n")
    assert_user_error(cli("data", "criteo", tmp_path / "t.txt", "-o", tmp_path / "d"), "line 4: label is not 0 or 1")
    lines[3] = "x" + lines[3][1:]
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n")
    assert_user_error(cli("data", "criteo", tmp_path / "t.txt", "-o", tmp_path / "d"), "line 4:")


def test_every_option_has_help_and_target_lists_choices():
    import click
    missing = []

    def walk(cmd, path):
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.help and not p.hidden:
                missing.append(f"{path} {p.opts[0]}")
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}")
    walk(main, "recompress")
    assert not missing, missing
    assert "[onnx|trt|dlrm|torchrec]" in cli("export", "--help").output
    from recompress.recipe import shipped
    listed = "".join(cli("run", "--help").output.split())  # (help text wraps at hyphens)
    assert all(name in listed for name in shipped())


def test_help_imports_no_torch():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom recompress.cli import main\n"
            "for c in ([], ['checkpoint'], ['train'], ['bench'], ['export']):\n"
            "    assert CliRunner().invoke(main, c + ['--help']).exit_code == 0\n"
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_ctrl_c_during_start_up_prints_one_line(monkeypatch, capsys):
    import builtins

    from recompress import __main__ as entry
    real = builtins.__import__

    def interrupted(name, *a, **k):
        if name in ("cli", "recompress.cli") or (a and a[2] and "cli" in a[2]):
            raise KeyboardInterrupt
        return real(name, *a, **k)
    monkeypatch.delitem(sys.modules, "recompress.cli", raising=False)
    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(SystemExit) as e:
        entry.entry()
    monkeypatch.undo()
    assert e.value.code == 130
    assert capsys.readouterr().err == "interrupted; no partial output was kept\n"


def test_finetune_shows_validation_before_and_after(workdir, tiny_data, tmp_path):
    res = cli("checkpoint", workdir, "--method", "hash", "--ratio", 4, "--finetune", "--data", tiny_data.path,
              "--steps", 10, "-o", tmp_path / "h")
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("hash: validation auc"))
    assert "before" in line and "compressed" in line and "fine-tuned" in line


def test_long_steps_report_progress_outside_a_terminal(tiny_data, tmp_path):
    res = cli("train", "--data", tiny_data.path, "-o", tmp_path / "t", "--dim", 4, "--steps", 5)
    assert "training: started" in res.stderr and "training: 100% (5/5)" in res.stderr


# --- sequential families through the CLI ---------------------------------------------------------------

def test_sequential_flow_end_to_end(tmp_path):
    src = tmp_path / "seqs.txt"
    rng = np.random.default_rng(0)
    lines = []
    for u in range(300):  # each user walks a cycle of 40 items: the next item is predictable
        start = int(rng.integers(40))
        lines.append(f"user{u} " + " ".join(f"item{(start + k) % 40}" for k in range(int(rng.integers(5, 15)))))
    src.write_text("\n".join(lines) + "\n")
    res = cli("data", "sequences", src, "-o", tmp_path / "d")
    assert res.exit_code == 0, res.output
    res = cli("train", "--model", "sasrec", "--data", tmp_path / "d", "-o", tmp_path / "s", "--dim", 16,
              "--max-len", 10, "--heads", 2, "--epochs", 15, "--lr", 0.005, "--batch-size", 64)
    assert res.exit_code == 0 and "validation ndcg@10" in res.output, res.output
    assert float(res.output.split("validation ndcg@10 ")[1].split(",")[0]) > 0.3  # random is about 0.1 here
    res = cli("checkpoint", tmp_path / "s", "--method", "int8", "-o", tmp_path / "s8")
    assert res.exit_code == 0, res.output
    info = json.loads(cli("inspect", tmp_path / "s8", "--json").output)
    assert {t["name"]: (t["role"], t["kind"]) for t in info["tables"]} == {"item": ("item", "dense+int8"),
                                                                           "position": ("position", "dense")}
    res = cli("checkpoint", tmp_path / "s", "--method", "hash", "--ratio", 4, "--finetune", "--data", tmp_path / "d",
              "--steps", 5, "-o", tmp_path / "sh")  # the fine-tune story is told in the family's metric
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("hash: validation ndcg@10"))
    assert "before" in line and "compressed" in line and "fine-tuned" in line
    res = cli("evaluate", tmp_path / "sh", "--data", tmp_path / "d", "--repeats", 5)  # default batches up to 512 > 300 users
    assert res.exit_code == 0 and "512" in res.output, res.output
    for name in ("s", "s8"):
        res = cli("evaluate", tmp_path / name, "--data", tmp_path / "d", "--protocol", "sampled", "--negatives", 20,
                  "--batch-sizes", "1,4", "--repeats", 5, "--json", tmp_path / f"{name}.json")
        assert res.exit_code == 0 and "ndcg@10 (torch, test, sampled ranking vs 20 negatives)" in res.output, res.output
    res = cli("evaluate", tmp_path / "s8", "--data", tmp_path / "d", "--protocol", "sampled", "--negatives", 20,
              "--no-latency", "--compare", tmp_path / "s.json")
    assert res.exit_code == 0 and "compared with baseline" in res.output
    r = json.loads((tmp_path / "s8.json").read_text())
    assert r["primary"] == "ndcg@10" and r["predictions"]["kind"] == "ranks" and r["data"]["rows"] == 300
    res = cli("evaluate", tmp_path / "s8", "--data", tmp_path / "d", "--no-latency", "--compare", tmp_path / "s.json")
    assert_user_error(res, "the baseline was evaluated on other rows (protocol sampled vs full)")


def test_sequential_bad_input(tmp_path, tiny_data, tiny_ckpt):
    from recompress.data.synthetic_sequences import make_synthetic_sequences
    seq = make_synthetic_sequences(tmp_path / "d", users=100, items=50, clusters=5)
    assert_user_error(cli("train", "--model", "sasrec", "--data", seq, "-o", tmp_path / "x", "--bottom", "64"),
                      "--bottom does not apply to sasrec")
    assert_user_error(cli("train", "--model", "sasrec", "--data", tiny_data.path, "-o", tmp_path / "x"),
                      "a sasrec model needs a sequences dataset")
    assert_user_error(cli("evaluate", tiny_ckpt, "--data", seq, "--no-latency"), "a dlrm model needs a ctr dataset")
    assert_user_error(cli("train", "--model", "sasrec", "--data", seq, "-o", tmp_path / "x", "--max-len", 0),
                      "--max-len 0 is impossible for sasrec")
    assert_user_error(cli("data", "sequences", tmp_path / "nope.txt", "-o", tmp_path / "y"), "does not exist")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.fixture()
def small_export(tiny_ckpt, tiny_data, tmp_path):
    out = tmp_path / "exported"
    assert cli("export", tiny_ckpt, "--data", tiny_data.path, "-o", out).exit_code == 0
    return out


def _copy_tree(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("command", [["evaluate", "EXPORT", "--data", "DATA", "--no-latency"], ["inspect", "EXPORT"]])
def test_a_damaged_export_is_refused_by_the_file_that_changed(small_export, tiny_data, tmp_path, command):
    """A truncated model.onnx gave ONNX Runtime's traceback (evaluate) or nothing at all (inspect): the manifest
    records every file's size, so the export is refused naming the file, both sizes and the fix."""
    bad = _copy_tree(small_export, tmp_path / "bad")
    size = (bad / "model.onnx").stat().st_size
    with open(bad / "model.onnx", "r+b") as f:
        f.truncate(size // 2)
    before = tree_hash(bad)
    args = [bad if a == "EXPORT" else tiny_data.path if a == "DATA" else a for a in command]
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert_user_error(res, f"model.onnx is {size // 2:,} bytes; its manifest records {size:,}")
    assert "export it again" in res.stderr and tree_hash(bad) == before


def test_a_damaged_dataset_file_is_refused_by_name(tiny_data, small_export, tmp_path):
    """A truncated .npy of a prepared dataset gave numpy's traceback ('mmap length is greater than file size')."""
    data = _copy_tree(tiny_data.path, tmp_path / "data")
    with open(data / "test.sparse.npy", "r+b") as f:
        f.truncate((data / "test.sparse.npy").stat().st_size // 2)
    res = CliRunner().invoke(main, ["evaluate", str(small_export), "--data", str(data), "--no-latency"])
    assert_user_error(res, "test.sparse.npy")
    assert "prepare the dataset again" in res.stderr


def test_an_export_passed_as_a_checkpoint_names_its_source(small_export, tiny_ckpt, tmp_path):
    """An export folder is not a checkpoint; the message says so and names the checkpoint it came from, instead
    of listing every format recompress reads."""
    res = CliRunner().invoke(main, ["export", str(small_export), "-o", str(tmp_path / "again")])
    assert_user_error(res, f"{small_export} is an export (onnx), not a checkpoint")
    assert str(tiny_ckpt.resolve()) in res.stderr and not (tmp_path / "again").exists()


def test_an_export_damaged_in_place_is_refused_by_onnx_runtime_by_name(small_export, tiny_data, tmp_path):
    """Same size, other bytes (the manifest's sizes cannot see it): ONNX Runtime's InvalidProtobuf traceback
    becomes one message naming the file."""
    bad = _copy_tree(small_export, tmp_path / "bad")
    (bad / "model.onnx").write_bytes(b"\xff" * (bad / "model.onnx").stat().st_size)
    res = CliRunner().invoke(main, ["evaluate", str(bad), "--data", str(tiny_data.path), "--no-latency"])
    assert_user_error(res, f"ONNX Runtime cannot load {bad / 'model.onnx'}")
    assert "export it again" in res.stderr


@pytest.mark.parametrize("name", ["items.npy", "offsets.npy"])
def test_a_damaged_sequence_dataset_file_is_refused_by_name(tmp_path, name):
    from recompress.data.synthetic_sequences import make_synthetic_sequences
    data = make_synthetic_sequences(tmp_path / "seq", users=30, items=20, clusters=2, mean_len=6, seed=1)
    with open(data / name, "r+b") as f:
        f.truncate((data / name).stat().st_size - 8)
    assert_user_error(cli("train", "--model", "sasrec", "--data", data, "--epochs", 1,
                          "-o", tmp_path / "never"), name)
    assert not (tmp_path / "never").exists()


def test_exports_that_are_checkpoints_and_folders_with_someone_elses_manifest_still_load(tiny_ckpt, tiny_data,
                                                                                          tmp_path):
    """Review of not_an_export: an export in an upstream layout (--target dlrm) is a checkpoint the adapters read,
    and a checkpoint folder holding an unrelated manifest.json (even one whose "files" is a list) is a
    checkpoint: both export again; only recompress's own exports to a runtime are refused."""
    assert cli("checkpoint", tiny_ckpt, "--method", "qr", "--collisions", 4, "--op", "add", "--min-rows", 100,
               "-o", tmp_path / "qr").exit_code == 0
    assert cli("export", tmp_path / "qr", "--target", "dlrm", "--data", tiny_data.path, "-o", tmp_path / "dl").exit_code == 0
    assert json.loads((tmp_path / "dl" / "manifest.json").read_text())["hp"] == {"qr_operation": "add"}
    for args in (["export", tmp_path / "dl", "--data", tiny_data.path, "-o", tmp_path / "a"],  # with the manifest's hp
                 ["checkpoint", tmp_path / "dl", "--method", "int8", "-o", tmp_path / "a8"]):
        res = CliRunner().invoke(main, [str(a) for a in args])
        assert res.exit_code == 0, res.output
    theirs = _copy_tree(tiny_ckpt, tmp_path / "theirs")
    (theirs / "manifest.json").write_text(json.dumps({"run": "exp-17", "files": ["a", "b"]}))
    for args in (["export", str(theirs), "--data", str(tiny_data.path), "-o", str(tmp_path / "b")],
                 ["evaluate", str(theirs), "--data", str(tiny_data.path), "--no-latency"], ["inspect", str(theirs)]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0 and "Traceback" not in res.output, (args, res.output)


@pytest.mark.parametrize("bad_id", [999, -7])
@pytest.mark.parametrize("command", ["evaluate", "train", "export"])
def test_an_id_outside_its_table_in_a_dataset_is_refused_by_row(tiny_ckpt, tiny_data, tmp_path, bad_id, command):
    """A prepared dataset edited or damaged afterwards: an id past its table was an IndexError traceback from the
    lookup, and a negative one was silently scored; both are refused naming the file, row and table."""
    data = _copy_tree(tiny_data.path, tmp_path / "data")
    for split in ("train", "val", "test"):
        ids = np.load(data / f"{split}.sparse.npy")
        ids[5, 1] = bad_id
        np.save(data / f"{split}.sparse.npy", ids)
    args = {"evaluate": ["evaluate", tiny_ckpt, "--data", data, "--no-latency"],
            "train": ["train", "--data", data, "--dim", 4, "--epochs", 1, "-o", tmp_path / "never"],
            "export": ["export", tiny_ckpt, "--data", data, "-o", tmp_path / "never"]}[command]
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert_user_error(res, f"row 5: id {bad_id} of table C2 is outside its 200 rows")
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("where,item", [("history", 21), ("last", 21), ("last", 0)])
def test_an_item_outside_the_catalogue_in_a_sequence_dataset_is_refused(tmp_path, where, item):
    """The same for a sequence dataset, in a history or as a user's last (test target) item: training and
    evaluation say so by name."""
    from recompress.data.synthetic_sequences import make_synthetic_sequences
    good = make_synthetic_sequences(tmp_path / "seq", users=30, items=20, clusters=2, mean_len=6, seed=1)
    assert cli("train", "--model", "sasrec", "--data", good, "--epochs", 1, "-o", tmp_path / "ck").exit_code == 0
    data = _copy_tree(good, tmp_path / "bad")
    items, offsets = np.load(data / "items.npy"), np.load(data / "offsets.npy")
    items[3 if where == "history" else offsets[1] - 1] = item  # 0 as a target: scored as padding (review)
    np.save(data / "items.npy", items)
    for args in ([["train", "--model", "sasrec", "--data", data, "--epochs", 1, "-o", tmp_path / "never"]]
                 if where == "history" else []) + [["evaluate", tmp_path / "ck", "--data", data, "--no-latency"]]:
        res = CliRunner().invoke(main, [str(a) for a in args])
        assert_user_error(res, f"item {item} is outside the catalogue's 20 items")
    assert not (tmp_path / "never").exists()


def test_a_damaged_manifest_of_an_export_is_named_as_such(small_export, tiny_data, tmp_path):
    """recompress's marker says the folder is an export, so a truncated manifest.json is said to be damaged
    (not "not a checkpoint format recompress knows" with every format listed)."""
    bad = _copy_tree(small_export, tmp_path / "bad")
    (bad / "manifest.json").write_text((small_export / "manifest.json").read_text()[:100])
    for args in (["evaluate", bad, "--data", tiny_data.path, "--no-latency"], ["inspect", bad],
                 ["export", bad, "-o", tmp_path / "never"]):
        assert_user_error(CliRunner().invoke(main, [str(a) for a in args]), "manifest.json is not valid JSON")
