"""Recipes, caching, reports and the regression gate: caches and gates that cannot lie."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from recompress.cli import main
from recompress.gate import Tolerances, compare

from .test_cli import assert_user_error

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


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def rows_of(folder):
    return [json.loads(x) for x in (folder / "results.jsonl").read_text().splitlines()]


def test_recipe_end_to_end_with_same_budget_control_and_cache(tmp_path):
    r = tmp_path / "tiny.toml"
    r.write_text(TINY_RECIPE)
    res = cli("run", r, "-o", tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert "(0 of 10 steps reused from cache)" in res.output
    said = res.output.split("steps reused from cache) -> ")[1]  # every file the report wrote, named
    assert all(f.name in said for f in (tmp_path / "run").iterdir() if f.is_file() and not f.name.startswith(".")), said
    rows = rows_of(tmp_path / "run")
    assert [x["variant"] for x in rows] == ["baseline", "mlet-d2", "baseline +finetune (steps=20)"]
    base, mlet, control = rows
    assert mlet["trained"] and mlet["control"] == control["variant"] and base["control"] is None
    assert mlet["emb_bytes"] * 4 == base["emb_bytes"] == control["emb_bytes"]
    for x in (mlet, control):
        d = x["delta"]
        assert d["lo"] <= d["delta"] <= d["hi"] and d["delta"] == pytest.approx(
            x["metrics"]["auc"] - base["metrics"]["auc"], abs=1e-6)
    assert mlet["delta_control"]["delta"] == pytest.approx(mlet["metrics"]["auc"] - control["metrics"]["auc"], abs=1e-6)
    assert base["latency_ratio"]["1"]["ratio"] == 1.0
    for f in ("pareto_auc_vs_bytes.png", "pareto_auc_vs_latency.png"):
        assert (tmp_path / "run" / f).stat().st_size > 10_000
    md = (tmp_path / "run" / "report.md").read_text()
    assert "same-budget control" in md and "mlet-d2 †" in md
    page = (tmp_path / "run" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "mlet-d2" in page and "**" not in page
    assert (tmp_path / "run" / "results.csv").read_text().splitlines()[0].startswith("study,variant,target,method")
    # unchanged re-run: everything cached; an edited budget re-runs the variant and its control only
    res = cli("run", r, "-o", tmp_path / "run")
    assert "(10 of 10 steps reused from cache)" in res.output
    assert [x["metrics"] for x in rows_of(tmp_path / "run")] == [x["metrics"] for x in rows]
    r.write_text(TINY_RECIPE.replace("steps = 20", "steps = 21"))
    res = cli("run", r, "-o", tmp_path / "run")
    assert "(4 of 10 steps reused from cache)" in res.output


def test_cache_key_covers_the_code(monkeypatch):
    from recompress import pipeline
    k = pipeline.key("export", ckpt="abc")
    monkeypatch.setattr(pipeline, "code_fingerprint", lambda: "another version of the code")
    assert pipeline.key("export", ckpt="abc") != k


def test_code_fingerprint_changes_with_any_source_file(tmp_path, monkeypatch):
    import importlib.util

    from recompress import pipeline
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("x = 1\n")
    spec = importlib.util.spec_from_file_location("fakepkg", pkg / "__init__.py", submodule_search_locations=[str(pkg)])
    monkeypatch.setattr(pipeline, "CODE_PACKAGES", ("fakepkg",))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    pipeline.code_fingerprint.cache_clear()
    first = pipeline.code_fingerprint()
    (pkg / "a.py").write_text("x = 2\n")
    pipeline.code_fingerprint.cache_clear()
    assert pipeline.code_fingerprint() != first
    (pkg / "sub" / "deeper").mkdir(parents=True)  # a module two folders down (data/sequence_layouts/*.py) counts too
    (pkg / "sub" / "deeper" / "b.py").write_text("y = 1\n")
    pipeline.code_fingerprint.cache_clear()
    second = pipeline.code_fingerprint()
    (pkg / "sub" / "deeper" / "b.py").write_text("y = 2\n")
    pipeline.code_fingerprint.cache_clear()
    assert pipeline.code_fingerprint() != second
    pipeline.code_fingerprint.cache_clear()


BENCH = TINY_RECIPE.split("[[variants]]")[0] + "[evaluate]\nbatch_sizes = [256]\nrepeats = 40\n"
SWEEP = ("--sweep", "hash:ratio=2,4", "--sweep", "int8")


def test_bench_gate_passes_on_a_repeat_and_catches_each_regression(tmp_path):
    r = tmp_path / "tiny.toml"
    r.write_text(BENCH)
    res = cli("bench", r, "-o", tmp_path / "b", *SWEEP, "--save-baseline", tmp_path / "base.json")
    assert res.exit_code == 0, res.output
    assert [x["variant"] for x in rows_of(tmp_path / "b")] == ["baseline", "hash ratio=2.0", "hash ratio=4.0", "int8"]
    res = cli("bench", r, "-o", tmp_path / "b", *SWEEP, "--baseline", tmp_path / "base.json", "--fail-on-regression",
              "--max-latency-growth", 3)  # latency is checked: a 3x slower variant would fail
    assert res.exit_code == 0 and "gate passed" in res.output, res.output + res.stderr
    gate = json.loads((tmp_path / "b" / "gate.json").read_text())
    assert sum(c["metric"].startswith("latency") for c in gate["checks"]) == 4
    assert all("Δ +0.0000" in c["note"] for c in gate["checks"] if c["metric"] == "auc")  # paired, same rows

    base = json.loads((tmp_path / "base.json").read_text())
    base["rows"][3]["metrics"]["auc"] += 0.01      # the baseline claims int8 was more accurate
    base["rows"][1]["emb_bytes"] //= 2             # ... hash 2x smaller than it is
    base["rows"][2]["latency_ratio"]["256"]["ratio"] /= 100  # ... and hash 4x 100x faster
    (tmp_path / "worse.json").write_text(json.dumps(base))
    res = cli("bench", r, "-o", tmp_path / "b", *SWEEP, "--baseline", tmp_path / "worse.json", "--fail-on-regression")
    assert res.exit_code == 1 and "GATE FAILED: 3 of" in res.stderr
    gate = json.loads((tmp_path / "b" / "gate.json").read_text())
    assert {(c["variant"], c["metric"]) for c in gate["checks"] if not c["ok"]} == {
        ("int8", "auc"), ("hash ratio=2.0", "emb_bytes"), ("hash ratio=4.0", "latency ratio b=256")}
    assert_user_error(cli("bench", r, "--sweep", "hash:ration=2"), "unknown parameter 'ration'; did you mean 'ratio'?")
    assert_user_error(cli("bench", r, "--fail-on-regression"), "--fail-on-regression needs --baseline")


def test_bench_fails_when_the_new_run_measured_no_latency(tmp_path):
    r = tmp_path / "tiny.toml"
    r.write_text(BENCH)
    assert cli("bench", r, "-o", tmp_path / "b", "--save-baseline", tmp_path / "base.json").exit_code == 0
    r.write_text(BENCH + "latency = false\n")
    res = cli("bench", r, "-o", tmp_path / "b", "--baseline", tmp_path / "base.json", "--fail-on-regression")
    assert res.exit_code == 1 and "missing" in res.stderr


def row(variant, auc=0.7, nbytes=100, ratio=None):
    r = {"variant": variant, "target": "onnx", "metrics": {"auc": auc}, "emb_bytes": nbytes}
    if ratio is not None:
        lo, hi = ratio if isinstance(ratio, tuple) else (ratio, ratio)
        r["latency_ratio"] = {"512": {"ratio": (lo + hi) / 2, "lo": lo, "hi": hi, "noisy": hi / lo > 1.3}}
    return r


def states(new_rows, base_rows, **tol):
    checks = compare({"rows": new_rows}, {"rows": base_rows}, Tolerances(**tol))
    return {(c["variant"], c["metric"]): c["state"] for c in checks}


def test_gate_states_for_latency():
    base = [row("baseline", ratio=1.0), row("tt", ratio=2.0)]
    got = states([row("baseline", ratio=1.0), row("tt", ratio=(3.1, 3.2))], base, latency_growth=1.5)
    assert got["tt", "latency ratio b=512"] == "regression"
    got = states([row("baseline", ratio=1.0), row("tt", ratio=(2.8, 3.1))], base, latency_growth=1.5)
    assert got["tt", "latency ratio b=512"] == "unchecked"  # straddles the 3.0 limit
    got = states([row("baseline", ratio=1.0), row("tt", ratio=(1.0, 3.5))], base, latency_growth=1.5)
    assert got["tt", "latency ratio b=512"] == "unchecked"  # too noisy to tell, though its estimate is under
    got = states([row("baseline", ratio=1.0), row("tt", ratio=(1.0, 2.0))], base, latency_growth=1.5)
    assert got["tt", "latency ratio b=512"] == "ok"  # noisy, but all of the interval is within the limit
    got = states([row("baseline", ratio=1.0), row("tt")], base)
    assert got["tt", "latency ratio b=512"] == "missing"    # no latency at all must not pass
    got = states([row("baseline", ratio=1.0), row("tt", ratio=(2.0, 2.1))], base, latency_growth=1.5)
    assert got["tt", "latency ratio b=512"] == "ok"


def test_gate_missing_variant_metric_and_explicit_zero_tolerances():
    base = [row("baseline"), row("int8", auc=0.7, nbytes=100)]
    got = states([row("baseline")], base)
    assert got["int8", "present"] == "missing"
    no_metric = row("int8")
    del no_metric["metrics"]["auc"]
    assert states([row("baseline"), no_metric], base)["int8", "auc"] == "missing"
    slightly = [row("baseline"), row("int8", auc=0.6999, nbytes=101)]
    assert states(slightly, base)["int8", "auc"] == "ok"                      # within the default 0.002
    t = Tolerances.resolve({"metric_drop": 0.0, "bytes_growth": None, "latency_growth": None}, {"bytes_growth": 1.0})
    assert t.metric_drop == 0.0 and t.bytes_growth == 1.0 and t.latency_growth == 1.5
    got = states(slightly, base, metric_drop=0.0, bytes_growth=1.0)
    assert got["int8", "auc"] == "regression" and got["int8", "emb_bytes"] == "regression"
    t = Tolerances.resolve({"metric_drop": None, "bytes_growth": None, "latency_growth": 0.0}, {"latency_growth": 2})
    assert t.latency_growth == 0.0


def test_shipped_ci_baseline_is_current():
    """The committed CI baseline was written by this version's summary format (gate refuses old ones)."""
    from pathlib import Path

    from recompress.gate import read_summary, studies
    s = read_summary(Path(__file__).resolve().parents[1] / ".ci" / "baseline-smoke.json")
    assert {n: st["primary"] for n, st in studies(s).items()} == {"ci-smoke-dlrm": "auc", "ci-smoke-sasrec": "ndcg@10"}
    assert all("predictions" in r and r["primary"] for r in s["rows"])
    assert np.isclose(s["rows"][0]["latency_ratio"]["1"]["ratio"], 1.0)


def test_gate_and_frontier_read_a_lower_is_better_metric_the_right_way():
    """MSE (dlrm_hstu's primary) is better lower: a rise beyond metric_drop is the regression, a fall is not; and
    the Pareto frontier keeps the lowest-MSE point at each cost (both treated every metric as higher-is-better)."""
    def mse_row(variant, mse):
        return {"variant": variant, "target": "onnx", "primary": "mse", "metrics": {"mse": mse}, "emb_bytes": 100}
    base = [mse_row("baseline", 1.0), mse_row("int8", 1.0)]
    got = states([mse_row("baseline", 1.0), mse_row("int8", 1.01)], base)
    assert got["int8", "mse"] == "regression"
    got = states([mse_row("baseline", 1.0), mse_row("int8", 0.9)], base)
    assert got["int8", "mse"] == "ok"
    from recompress.evaluate.plots import frontier
    points = [(1.0, 0.5), (2.0, 0.4), (3.0, 0.6)]  # (bytes, mse)
    assert frontier(points, higher_is_better=False) == [0, 1]
    assert frontier(points) == [0, 2]
