"""Recipes: a TOML file describing data, a baseline, compressed variants, export and evaluation.

Validation is strict and helpful: an unknown key names the nearest valid one, a wrong type names the
expected type. ``[train] model`` names the family (default dlrm) and takes its hyper-parameters; or
``[baseline] checkpoint`` names a trained checkpoint in any format ``recompress inspect`` reads (``hp``: what it
does not say, ``["heads=2"]``), which is the baseline instead, and ``[train]`` then only budgets fine-tunes. A recipe
with ``parts = [...]`` instead runs several recipes (shipped names, or paths relative to it) as the
studies of one run. ``recompress.pipeline`` runs a recipe; ``recompress.sweep_report`` writes its report.
"""

from __future__ import annotations

import difflib
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TRAIN_KEYS = {"epochs": int, "steps": int, "lr": float, "batch_size": int, "optimizer": str, "seed": int,
              "keep_best": bool, "patience": int, "checks_per_epoch": int}
DATA_KINDS = ("synthetic", "criteo", "prepared", "sequences", "synthetic-sequences")
SCHEMA: dict[str, Any] = {
    "name": str, "description": str, "parts": list,
    "data": {"kind": str, "path": str, "samples": int, "tables": list, "zipf": float, "true_dim": int,
             "seed": int, "min_count": int, "max_rows": int, "limit": int, "format": str, "max_len": int,
             "min_items": int, "users": int, "items": int, "mean_len": int, "clusters": int, "layout": str},
    "train": {"model": str, "mlet_hidden": int, "mlet_min_rows": int, **TRAIN_KEYS},
    "baseline": {"checkpoint": str, "hp": list},
    "variants": [{"name": str, "method": str, "tables": list, "min_rows": int, "from_scratch": bool,
                  "materialize": bool, "quant_graph": str, "dense": str, **TRAIN_KEYS}],
    "export": {"targets": list, "atol": float, "rtol": float, "materialize": bool, "quant_graph": str, "dense": str},
    "evaluate": {"batch_sizes": list, "threads": int, "repeats": int, "latency": bool, "protocol": str,
                 "negatives": int, "users": int},
    "gate": {"metric_drop": float, "bytes_growth": float, "latency_growth": float},
}


def _variant_schema() -> dict[str, Any]:
    from .compress.registry import all_params
    return {**SCHEMA["variants"][0], **{p.name: p.type for p in all_params().values()}}


def _train_schema() -> dict[str, Any]:
    """[train]: the family, its hyper-parameters (comma lists may be TOML arrays) and the budget."""
    from .families import all_hparams
    fam = {name: (owners[0][1].type, list) if owners[0][1].type is str else owners[0][1].type
           for name, owners in all_hparams().items()}
    return {**fam, **SCHEMA["train"]}


def _check(obj: Any, schema: Any, where: str) -> None:
    if isinstance(schema, dict):
        if not isinstance(obj, dict):
            raise UserError(f"{where} must be a table", f"write [{where}]")
        if where == "train":
            schema = _train_schema()
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
        types = schema if isinstance(schema, tuple) else (schema,)
        ok = isinstance(obj, types) or (float in types and isinstance(obj, int) and not isinstance(obj, bool))
        if not ok or (int in types and bool not in types and isinstance(obj, bool)):
            raise UserError(f"{where} is {type(obj).__name__} {obj!r}, expected "
                            f"{' or '.join(t.__name__ for t in types)}", "fix the recipe")


def shipped() -> list[str]:
    """Names of the recipes that come with recompress."""
    return sorted(f.name[:-5] for f in resources.files("recompress.recipes").iterdir() if f.name.endswith(".toml"))


def _override(recipe: dict[str, Any], assignment: str) -> None:
    """``data.path=FILE`` or ``train.epochs=3``: set one value (parsed as TOML, else taken as a string)."""
    dotted, sep, raw = assignment.partition("=")
    parts = dotted.strip().split(".")
    if not sep or not all(parts) or len(parts) > 2:
        raise UserError(f"--set {assignment!r} is not SECTION.KEY=VALUE", "e.g. --set data.path=train.txt.gz")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    node = recipe
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {assignment!r}: {part} is not a table", "set a key inside a [section]")
    node[parts[-1]] = value


def _locate(path: str | Path, base: Path | None = None) -> tuple[str, Path]:
    """(text, folder) of a recipe path or shipped name (relative paths first against ``base``)."""
    p = Path(path)
    packaged = resources.files("recompress.recipes").joinpath(f"{p}.toml")
    if base is not None and not p.is_absolute() and (base / p).is_file():
        p = base / p
    if not p.exists() and p.suffix == "" and packaged.is_file():
        return packaged.read_text(), Path(str(packaged)).parent
    if p.is_file():
        return p.read_text(), p.resolve().parent
    raise UserError(f"recipe {path} not found", f"pass a .toml path or a shipped recipe: {', '.join(shipped())}")


def load_recipe(path: str | Path, overrides: tuple[str, ...] = (), base: Path | None = None) -> dict[str, Any]:
    """Read and validate a recipe; a bare name (``quickstart``) means a recipe shipped with recompress.

    A relative ``data.path`` is read relative to the recipe file's folder (not the working directory);
    ``overrides`` (``SECTION.KEY=VALUE``) replace values after reading, relative paths there meaning the cwd.
    """
    text, folder = _locate(path, base)
    try:
        recipe = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML ({e})", "fix the recipe syntax") from None
    for section, k in (("data", "path"), ("baseline", "checkpoint")):  # relative to the recipe's folder
        node = recipe.get(section)
        if isinstance(node, dict) and isinstance(node.get(k), str) and not Path(node[k]).is_absolute():
            node[k] = str((folder / node[k]).resolve())
    for o in overrides:
        _override(recipe, o)
    _check(recipe, SCHEMA, "")
    if "parts" in recipe:
        if "baseline" in recipe:
            raise UserError(f"recipe {path} has parts and a [baseline]", "give each part its own [baseline]")
        if "name" not in recipe or not recipe["parts"]:
            raise UserError(f"recipe {path} has parts but no name (or an empty parts list)", "see recipes/ci-smoke.toml")
        recipe["parts"] = [load_recipe(part, overrides, folder) for part in recipe["parts"]]
        return recipe
    if "baseline" in recipe and "checkpoint" not in recipe["baseline"]:
        raise UserError(f"recipe {path}: [baseline] without a checkpoint", 'name it: checkpoint = "model.pth"')
    baseline = recipe.get("baseline", {}).get("checkpoint")
    if baseline == "" or (baseline is not None and Path(baseline) == folder):
        raise UserError(f"recipe {path}: baseline.checkpoint is empty", "name the trained checkpoint's file or folder")
    for k in ("name", "data") if baseline else ("name", "data", "train"):
        if k not in recipe:
            raise UserError(f"recipe {path} has no {k!r}", "see recipes/quickstart.toml")
    recipe.setdefault("train", {})
    if baseline and not Path(baseline).exists():
        raise UserError(f"recipe {recipe['name']}: baseline.checkpoint {baseline} does not exist",
                        "point it at a trained checkpoint (in the recipe, relative to its folder; in --set, to the "
                        "working directory)")
    bad = [h for h in recipe.get("baseline", {}).get("hp", []) if not isinstance(h, str) or "=" not in h]
    if bad:
        raise UserError(f"baseline.hp {bad[0]!r} is not 'KEY=VALUE'", 'e.g. hp = ["heads=2"]')
    from .families import FAMILIES
    model = recipe["train"].get("model", "dlrm")
    if model not in FAMILIES:
        raise UserError(f"train.model {model!r} is unknown", f"use one of {', '.join(FAMILIES)}")
    kind = recipe["data"].get("kind", "synthetic")
    if kind not in DATA_KINDS:
        raise UserError(f"data.kind {kind!r} is unknown", f"use one of {', '.join(DATA_KINDS)}")
    if "layout" in recipe["data"] and kind != "sequences":
        raise UserError(f"data.layout is for kind = \"sequences\" (whose ids and rules a file is prepared with), "
                        f"and this data is {kind}", "drop data.layout, or prepare the data yourself and use "
                        'kind = "prepared"')
    if kind not in ("synthetic", "synthetic-sequences"):
        where = recipe["data"].get("path")
        if not where or not Path(where).exists():
            raise UserError(f"recipe {recipe['name']}: data.path {where} does not exist",
                            "point data.path at your data (relative paths are read from the recipe's folder), "
                            "or pass --set data.path=FILE")
    return recipe
