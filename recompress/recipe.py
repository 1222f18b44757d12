"""Recipes: a TOML file describing data, a baseline, compressed variants, export and evaluation.

Validation is strict and helpful: an unknown key names the nearest valid one, a wrong type names the
expected type. ``run_recipe`` drives the stages in order and writes a report folder.
"""

from __future__ import annotations

import difflib
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TRAIN_KEYS = {"epochs": int, "steps": int, "lr": float, "batch_size": int, "optimizer": str, "seed": int}
SCHEMA: dict[str, Any] = {
    "name": str, "description": str,
    "data": {"kind": str, "path": str, "samples": int, "tables": list, "zipf": float, "true_dim": int,
             "seed": int, "min_count": int, "max_rows": int, "limit": int},
    "train": {"dim": int, "bottom": list, "top": list, "mlet_hidden": int, "mlet_min_rows": int, **TRAIN_KEYS},
    "variants": [{"name": str, "method": str, "tables": list, "min_rows": int, **TRAIN_KEYS}],
    "export": {"targets": list, "atol": float, "rtol": float},
    "evaluate": {"batch_sizes": list, "threads": int, "repeats": int},
}


def _variant_schema() -> dict[str, Any]:
    from .compress.registry import all_params
    return {**SCHEMA["variants"][0], **{p.name: p.type for p in all_params().values()}}


def _check(obj: Any, schema: Any, where: str) -> None:
    if isinstance(schema, dict):
        if not isinstance(obj, dict):
            raise UserError(f"{where} must be a table", f"write [{where}]")
        for k, v in obj.items():
            if k not in schema:
                close = difflib.get_close_matches(k, schema, n=1)
                raise UserError(f"unknown key {where + '.' if where else ''}{k}"
                                + (f"; did you mean {close[0]!r}?" if close else ""),
                                f"valid keys: {', '.join(sorted(schema))}")
            _check(v, schema[k], f"{where}.{k}" if where else k)
    elif isinstance(schema, list):
        if not isinstance(obj, list):
            raise UserError(f"{where} must be an array of tables", f"write [[{where}]]")
        item = _variant_schema() if where == "variants" else schema[0]
        for i, o in enumerate(obj):
            _check(o, item, f"{where}[{i}]")
    else:
        ok = isinstance(obj, schema) or (schema is float and isinstance(obj, int) and not isinstance(obj, bool))
        if not ok or (schema is int and isinstance(obj, bool)):
            raise UserError(f"{where} is {type(obj).__name__} {obj!r}, expected {schema.__name__}", "fix the recipe")


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read and validate a recipe; a bare name (``quickstart``) means a recipe shipped with recompress."""
    p = Path(path)
    if not p.exists() and p.suffix == "" and resources.files("recompress.recipes").joinpath(f"{p}.toml").is_file():
        text = resources.files("recompress.recipes").joinpath(f"{p}.toml").read_text()
    elif p.is_file():
        text = p.read_text()
    else:
        raise UserError(f"recipe {path} not found", "pass a .toml path or a shipped recipe name such as quickstart")
    try:
        recipe = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML ({e})", "fix the recipe syntax") from None
    _check(recipe, SCHEMA, "")
    for k in ("name", "data", "train"):
        if k not in recipe:
            raise UserError(f"recipe {path} has no {k!r}", "see recipes/quickstart.toml")
    kinds = ("synthetic", "criteo", "prepared")
    if recipe["data"].get("kind", "synthetic") not in kinds:
        raise UserError(f"data.kind {recipe['data']['kind']!r} is unknown", f"use one of {', '.join(kinds)}")
    return recipe


def _train_config(section: dict[str, Any], base: Any = None) -> Any:
    from .training import TrainConfig
    fields = {k: section[k] for k in TRAIN_KEYS if k in section}
    return TrainConfig(**{**(base.__dict__ if base else {}), **fields})


def _data(recipe: dict[str, Any], out: Path) -> Any:
    from .data import open_dataset
    d = dict(recipe["data"])
    kind = d.pop("kind", "synthetic")
    if kind == "prepared":
        return open_dataset(d["path"])
    target = out / "data"
    if not target.exists():
        if kind == "synthetic":
            from .data.synthetic import make_synthetic
            if "tables" in d:
                d["table_rows"] = d.pop("tables")
            make_synthetic(target, **d)
        else:
            from .data.criteo import prepare_criteo
            prepare_criteo(d.pop("path"), target, **d)
    return open_dataset(target)


def run_recipe(recipe: dict[str, Any], out: Path, overwrite: bool = False) -> list[dict[str, Any]]:
    """Data -> baseline -> variants -> export -> evaluate -> report folder ``out``."""
    from .adapters import load_any
    from .checkpoint import checkpoint_hash, save_checkpoint
    from .compress.registry import Context, Selection, all_params, compress, parse_methods
    from .evaluate import evaluate
    from .evaluate.plots import pareto_plot
    from .evaluate.report import fmt_bytes
    from .export import export_checkpoint
    from .progress import say
    from .training import train_dlrm

    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"run folder {out} is not empty", "pass --overwrite or choose another -o")
    out.mkdir(parents=True, exist_ok=True)
    data = _data(recipe, out)
    t = recipe["train"]
    cfg = _train_config(t)
    ckdir = out / "checkpoints"
    ckdir.mkdir(exist_ok=True)
    say("[bold]baseline[/bold]: training")
    base = train_dlrm(data, cfg, dim=t.get("dim", 16), bottom=tuple(t.get("bottom", [64])),
                      top=tuple(t.get("top", [64])), mlet_hidden=t.get("mlet_hidden"),
                      mlet_min_rows=t.get("mlet_min_rows", 0))
    save_checkpoint(base, ckdir / "baseline", overwrite=True)
    paths = {"baseline": ckdir / "baseline"}
    params = set(all_params())
    for v in recipe.get("variants", []):
        name = v.get("name") or v["method"]
        say(f"[bold]{name}[/bold]: {v['method']}")
        ckpt = load_any(paths["baseline"])
        ctx = Context(data, _train_config(v, cfg), Selection(tuple(v.get("tables", ())), v.get("min_rows", 0)))
        ckpt = compress(ckpt, parse_methods(v["method"], {k: v[k] for k in params if k in v}), ctx)
        save_checkpoint(ckpt, ckdir / name, overwrite=True)
        paths[name] = ckdir / name
    ex, ev = recipe.get("export", {}), recipe.get("evaluate", {})
    results = []
    for name, path in paths.items():
        for target in ex.get("targets", ["onnx"]):
            ckpt = load_any(path)
            ckpt.path = path.resolve()
            edir = out / "exports" / f"{name}.{target}"
            edir.parent.mkdir(exist_ok=True)
            export_checkpoint(ckpt, target, edir, data=data, source_hash=checkpoint_hash(path),
                              atol=ex.get("atol", 1e-5), rtol=ex.get("rtol", 1e-4), overwrite=True)
            say(f"evaluating {name} ({target})")
            r = evaluate(edir, data, batch_sizes=ev.get("batch_sizes", [1, 64, 512]),
                         threads=ev.get("threads", 2), repeats=ev.get("repeats", 100))
            results.append({"variant": name, "target": target, **r})
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_report(recipe, results, out, pareto_plot, fmt_bytes)
    return results


def summary_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base = next((r for r in results if r["variant"] == "baseline"), results[0])
    b_acc = base["accuracy"]["onnxruntime"]
    rows = []
    for r in results:
        a = r["accuracy"]["onnxruntime"]
        lat = r["latency"]["backends"]
        sizes = sorted(lat["onnxruntime"], key=int)
        rows.append({"variant": r["variant"], "dim": r["model"]["emb_dim"], "auc": a["auc"],
                     "d_auc": a["auc"] - b_acc["auc"], "logloss": a["logloss"],
                     "emb_bytes": r["bytes"]["embeddings"],
                     "shrink": base["bytes"]["embeddings"] / r["bytes"]["embeddings"],
                     "ort_p50_ms": {b: lat["onnxruntime"][b]["p50_ms"] for b in sizes},
                     "speedup_vs_torch": r["latency"]["speedup_vs_torch"].get("onnxruntime", {})})
    return rows


def write_report(recipe: dict[str, Any], results: list[dict[str, Any]], out: Path, pareto_plot: Any,
                 fmt_bytes: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = summary_rows(results)
    synthetic = results[0]["data"]["synthetic"]
    table = Table(title=f"{recipe['name']}: test split" + (" [SYNTHETIC data]" if synthetic else ""))
    cols = ["variant", "d", "AUC", "ΔAUC", "logloss", "emb bytes", "smaller", "ORT p50 (ms) by batch", "ORT/torch"]
    for c in cols:
        table.add_column(c, justify="left" if c == "variant" else "right")
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["variant"], str(r["dim"]), f"{r['auc']:.4f}", f"{r['d_auc']:+.4f}", f"{r['logloss']:.4f}",
                 fmt_bytes(r["emb_bytes"]), f"{r['shrink']:.1f}x",
                 " / ".join(f"{v:.3f}" for v in r["ort_p50_ms"].values()),
                 " / ".join(f"{v:.1f}x" for v in r["speedup_vs_torch"].values())]
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    Console(width=140).print(table)
    plot = pareto_plot([r["variant"] for r in rows], [r["emb_bytes"] for r in rows], [r["auc"] for r in rows],
                       out / "pareto_auc_vs_bytes.png", xlabel="embedding bytes (stored)",
                       title=f"{recipe['name']}: AUC vs embedding bytes")
    batches = " / ".join(rows[0]["ort_p50_ms"])
    text = [f"# {recipe['name']}", "", recipe.get("description", ""), "",
            f"Data: {results[0]['data']['path']}" + (" (**SYNTHETIC**)" if synthetic else ""),
            f"Latency columns: batch sizes {batches}, {results[0]['latency']['threads']} threads, "
            "ORT/torch = torch eager p50 / ONNX Runtime p50 in the same run.", "", *md, "",
            f"![AUC vs bytes]({plot.name})", ""]
    (out / "report.md").write_text("\n".join(text))
    Console(stderr=True).print(f"report: {out / 'report.md'}, plot: {plot}, results: {out / 'results.json'}")
