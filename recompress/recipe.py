"""Recipes: a TOML file describing data, a baseline, compressed variants, export and evaluation.

Validation is strict and helpful: an unknown key names the nearest valid one, a wrong type names the
expected type. ``recompress.pipeline`` runs a recipe; ``recompress.sweep_report`` writes its report.
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
              "keep_best": bool}
SCHEMA: dict[str, Any] = {
    "name": str, "description": str,
    "data": {"kind": str, "path": str, "samples": int, "tables": list, "zipf": float, "true_dim": int,
             "seed": int, "min_count": int, "max_rows": int, "limit": int},
    "train": {"dim": int, "bottom": list, "top": list, "mlet_hidden": int, "mlet_min_rows": int, **TRAIN_KEYS},
    "variants": [{"name": str, "method": str, "tables": list, "min_rows": int, "from_scratch": bool,
                  "materialize": bool, "quant_graph": str, **TRAIN_KEYS}],
    "export": {"targets": list, "atol": float, "rtol": float, "materialize": bool, "quant_graph": str},
    "evaluate": {"batch_sizes": list, "threads": int, "repeats": int, "latency": bool},
    "gate": {"metric_drop": float, "bytes_growth": float, "latency_growth": float},
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


def load_recipe(path: str | Path, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read and validate a recipe; a bare name (``quickstart``) means a recipe shipped with recompress.

    A relative ``data.path`` is read relative to the recipe file's folder (not the working directory);
    ``overrides`` (``SECTION.KEY=VALUE``) replace values after reading, relative paths there meaning the cwd.
    """
    p = Path(path)
    packaged = resources.files("recompress.recipes").joinpath(f"{p}.toml")
    if not p.exists() and p.suffix == "" and packaged.is_file():
        text, folder = packaged.read_text(), Path(str(packaged)).parent
    elif p.is_file():
        text, folder = p.read_text(), p.resolve().parent
    else:
        raise UserError(f"recipe {path} not found",
                        f"pass a .toml path or a shipped recipe: {', '.join(shipped())}")
    try:
        recipe = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML ({e})", "fix the recipe syntax") from None
    data = recipe.get("data")
    if isinstance(data, dict) and isinstance(data.get("path"), str) and not Path(data["path"]).is_absolute():
        data["path"] = str((folder / data["path"]).resolve())
    for o in overrides:
        _override(recipe, o)
    _check(recipe, SCHEMA, "")
    for k in ("name", "data", "train"):
        if k not in recipe:
            raise UserError(f"recipe {path} has no {k!r}", "see recipes/quickstart.toml")
    kinds = ("synthetic", "criteo", "prepared")
    kind = recipe["data"].get("kind", "synthetic")
    if kind not in kinds:
        raise UserError(f"data.kind {kind!r} is unknown", f"use one of {', '.join(kinds)}")
    if kind != "synthetic":
        where = recipe["data"].get("path")
        if not where or not Path(where).exists():
            raise UserError(f"recipe {recipe['name']}: data.path {where} does not exist",
                            "point data.path at your data (relative paths are read from the recipe's folder), "
                            "or pass --set data.path=FILE")
    return recipe
