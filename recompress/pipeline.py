"""Run a recipe: data -> baseline -> variants -> exports -> accuracy, each step cached by content hash.

A step's key hashes its own settings, the keys of the steps it reads, and the code that runs it: every
source file of recompress and the versions of torch, numpy, onnx and onnxruntime. So a re-run skips
every finished step, an edited setting re-runs exactly what depends on it, and a code change or an
upgrade never reuses a stale export or evaluation. Every step writes atomically, so an interrupted run
resumes cleanly.

Every variant whose methods train (a fine-tune, post-training MLET) is reported next to a control: the
baseline fine-tuned with the same budget, so compression and extra training are not confused. Accuracy
differences carry a paired-bootstrap interval on the same test rows. Latency is measured afresh on every
run, all variants interleaved call by call, and reported as a ratio to the reference variant measured
alongside, with its interval: that ratio, not an absolute time, is what reports and the gate compare.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import UserError
from .outputs import output_file
from .progress import say
from .recipe import TRAIN_KEYS

REFERENCE = "baseline"
TORCH = "torch"  # the target of a run that evaluates checkpoints as they are (no export)
EXPORT_KEYS = ("materialize", "quant_graph", "dense")
CODE_PACKAGES = ("recompress", "recompress.compress", "recompress.export", "recompress.evaluate")
LIBRARIES = ("torch", "numpy", "onnx", "onnxruntime", "safetensors")


@functools.cache
def code_fingerprint() -> str:
    """sha256 over every source file of recompress and the versions of the libraries that compute results."""
    h = hashlib.sha256()
    for pkg in CODE_PACKAGES:
        for folder in importlib.util.find_spec(pkg).submodule_search_locations:
            for f in sorted(Path(folder).rglob("*.py")):  # every module, however deep (data/sequence_layouts/)
                h.update(f"{pkg}:{f.relative_to(folder)}".encode())
                h.update(f.read_bytes())
    for lib in LIBRARIES:
        try:
            h.update(f"{lib}={metadata.version(lib)}".encode())
        except metadata.PackageNotFoundError:
            continue
    return h.hexdigest()


SAMPLE = 1 << 20  # bytes hashed from each end of a checkpoint file for the cache key


def files_key(path: Path, skip: Path | None = None) -> list[tuple[str, int, int, str]]:
    """What identifies a checkpoint on disk for the cache: each file's name, size, modification time and a
    sha256 of its first and last MiB (whole, when smaller): a copy that kept the times (``cp -p``, ``rsync -a``)
    of other weights of the same size is told apart, while gigabytes of tables are not read on every run.
    ``skip``: a folder inside it whose files do not count (the run's own)."""
    path = path.resolve()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    if skip is not None:
        files = [f for f in files if skip.resolve() not in f.parents]
    out = []
    for f in files:
        st = f.stat()
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            h.update(fh.read(SAMPLE))
            if st.st_size > 2 * SAMPLE:
                fh.seek(-SAMPLE, os.SEEK_END)
                h.update(fh.read(SAMPLE))
            elif st.st_size > SAMPLE:
                h.update(fh.read())
        out.append((str(f), st.st_size, st.st_mtime_ns, h.hexdigest()[:16]))
    return out


def key(step: str, /, **settings: Any) -> str:
    blob = json.dumps({"step": step, "code": code_fingerprint(), "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Variant:
    """One row of a sweep: a method composition with its parameters (``method`` None = the baseline)."""

    name: str
    method: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    tables: tuple[str, ...] = ()
    min_rows: int = 0
    train: dict[str, Any] = field(default_factory=dict)
    from_scratch: bool = False
    export: dict[str, Any] = field(default_factory=dict)
    control: str | None = None  # the same-budget fine-tuned baseline this variant is compared with

    @classmethod
    def from_recipe(cls, v: dict[str, Any]) -> Variant:
        from .compress.registry import all_params
        params = {k: v[k] for k in all_params() if k in v}
        return cls(name=v.get("name") or v["method"], method=v["method"], params=params,
                   tables=tuple(v.get("tables", ())), min_rows=v.get("min_rows", 0),
                   train={k: v[k] for k in TRAIN_KEYS if k in v}, from_scratch=v.get("from_scratch", False),
                   export={k: v[k] for k in EXPORT_KEYS if k in v})

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "params": self.params, "tables": list(self.tables), "min_rows": self.min_rows,
                "train": self.train, "from_scratch": self.from_scratch}

    def trains(self) -> bool:
        """Whether this variant's methods run the training loop on top of the trained baseline."""
        from .compress.registry import parse_methods, trains
        return self.method is not None and not self.from_scratch and trains(parse_methods(self.method, self.params))


def with_controls(variants: list[Variant]) -> list[Variant]:
    """``variants`` plus, for each distinct fine-tune budget they use, the baseline fine-tuned with it."""
    out, controls = list(variants), {}
    for v in variants:
        if not v.trains():
            continue
        budget = json.dumps(v.train, sort_keys=True)
        if budget not in controls:
            label = ", ".join(f"{k}={x}" for k, x in sorted(v.train.items()))
            name = f"{REFERENCE} +finetune" + (f" ({label})" if label else "")
            controls[budget] = Variant(name=name, method="finetune", train=dict(v.train))
            out.append(controls[budget])
        v.control = controls[budget].name
    return out


def parse_sweep(text: str) -> list[Variant]:
    """``hash:ratio=4,16,64`` -> three variants; ``int8`` -> one; ``tt,int8:tt_rank=8,16`` -> two."""
    from .compress.registry import all_params, parse_methods
    method, _, grid = text.partition(":")
    parse_methods(method)  # validates the names
    if not grid:
        return [Variant(name=method, method=method)]
    pname, _, values = grid.partition("=")
    params = all_params()
    if pname not in params:
        import difflib
        close = difflib.get_close_matches(pname, params, n=1)
        raise UserError(f"--sweep {text!r}: unknown parameter {pname!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
                        "write METHOD:PARAM=V1,V2,...")
    p = params[pname]
    try:
        vals = [p.type(x) for x in values.split(",") if x]
    except ValueError:
        raise UserError(f"--sweep {text!r}: values must be {p.type.__name__}", "e.g. hash:ratio=4,16") from None
    return [Variant(name=f"{method} {pname}={v}", method=method, params={pname: v}) for v in vals]


class Pipeline:
    """The cached steps of one run folder."""

    def __init__(self, recipe: dict[str, Any], out: Path) -> None:
        from .families import get_family
        self.recipe, self.out = recipe, out
        self.cache = out / "cache"
        self.log: list[dict[str, Any]] = []
        self.source = self._source(recipe)
        self.family = get_family(self.source["family"] if self.source else recipe["train"].get("model", "dlrm"))

    @staticmethod
    def _source(recipe: dict[str, Any]) -> dict[str, Any] | None:
        """``[baseline] checkpoint``: the trained model a run starts from instead of training one (its format
        read without building it, so what it lacks is named before any step runs)."""
        from .adapters import describe, parse_hp
        from .families import FAMILIES, all_hparams
        base = recipe.get("baseline", {})
        if "checkpoint" not in base:
            return None
        hp = parse_hp(base.get("hp", []))
        found = describe(base["checkpoint"], hp)
        if found.family not in FAMILIES:  # described, not rebuilt: the adapter's own refusal says why
            found.build(dict(found.hparams))
            raise UserError(f"baseline.checkpoint {base['checkpoint']} holds no model recompress rebuilds",
                            "'recompress inspect' describes it")
        shape = sorted(k for k in recipe["train"] if k in all_hparams() or k in ("mlet_hidden", "mlet_min_rows"))
        if shape:
            raise UserError(f"train.{shape[0]} shapes a model trained here, and this run starts from "
                            f"baseline.checkpoint, whose shapes are its own", f"drop {', '.join(shape)} from [train]")
        if found.missing:
            need = ", ".join(f'"{k}={"|".join(v) if v else "VALUE"}"' for k, v in found.missing.items())
            raise UserError(f"baseline.checkpoint {base['checkpoint']} does not say {', '.join(found.missing)} "
                            f"({'; '.join(found.why_missing.values())})", f"add hp = [{need}] to [baseline]")
        model = recipe["train"].get("model")
        if model is not None and model != found.family:
            raise UserError(f"train.model is {model!r} and baseline.checkpoint holds a {found.family} model",
                            "drop train.model: the checkpoint decides the family")
        scratch = [v.get("name") or v["method"] for v in recipe.get("variants", []) if v.get("from_scratch")]
        if scratch:
            raise UserError(f"variant {scratch[0]!r} trains from scratch, and this run starts from a trained "
                            "checkpoint (baseline.checkpoint)", "compress the trained model (drop from_scratch), or "
                            "train the baseline here with [train] instead of [baseline]")
        return {"path": Path(base["checkpoint"]), "hp": hp, "family": found.family,
                "read": {k: [v, found.sources.get(k)] for k, v in found.hparams.items()}}  # sidecars (args.txt) too

    def baseline_text(self) -> str:
        if self.source is None:
            return "trained here ([train])"
        hp = " ".join(f"{k}={v}" for k, v in self.source["hp"].items())
        return f"the trained checkpoint {self.source['path']}" + (f" (read with {hp})" if hp else "")

    def _step(self, kind: str, k: str, label: str) -> tuple[Path, bool]:
        self.cache.mkdir(exist_ok=True)
        path = self.cache / f"{kind}-{k}"
        done = path.exists()
        self.log.append({"step": kind, "label": label, "key": k, "cached": done})
        say(f"{'[dim]cached[/dim]' if done else '[bold]run[/bold]   '} {kind:<8} {label}")
        return path, done

    def data(self) -> tuple[Any, str]:
        from .data import open_dataset
        d = dict(self.recipe["data"])
        kind = d.pop("kind", "synthetic")
        if kind == "prepared":
            ds = open_dataset(d["path"])
            return ds, key("data", fingerprint=ds.fingerprint)
        k = key("data", kind=kind, **d)
        path, done = self._step("data", k, kind)
        if not done:
            if kind == "synthetic":
                from .data.synthetic import make_synthetic
                if "tables" in d:
                    d["table_rows"] = d.pop("tables")
                make_synthetic(path, **d)
            elif kind == "criteo":
                from .data.criteo import prepare_criteo
                prepare_criteo(d.pop("path"), str(path), **d)
            elif kind == "sequences":
                from .data.sequences import prepare_sequences
                prepare_sequences(d.pop("path"), path, fmt=d.pop("format", None), **d)
            else:
                from .data.synthetic_sequences import make_synthetic_sequences
                make_synthetic_sequences(path, **d)
        return open_dataset(path), k

    def checkpoint(self, v: Variant, data: Any, data_key: str, base_key: str | None) -> tuple[Path, str]:
        from .adapters import load_any
        from .checkpoint import save_checkpoint
        from .compress.registry import (
            Context,
            Selection,
            compress,
            fresh_tables,
            parse_methods,
        )
        from .training import TrainConfig, train_model
        t = self.recipe["train"]
        base_cfg = TrainConfig(**{k: t[k] for k in TRAIN_KEYS if k in t})
        hparams = {p.name: t[p.name] for p in self.family.info.hparams if p.name in t}
        scratch = v.method is None or v.from_scratch
        if v.method is None and self.source is not None:  # [train] still budgets the fine-tunes built on it
            k = key("ckpt", data=data_key, source=files_key(self.source["path"], skip=self.out),
                    read=self.source["read"], train=t)
        elif scratch:
            k = key("ckpt", data=data_key, train=t, variant=v.describe())
        else:
            k = key("ckpt", base=base_key, variant=v.describe())
        path, done = self._step("ckpt", k, v.name)
        if done:
            return path, k
        if v.method is None and self.source is not None:  # read once into a native checkpoint
            ckpt = load_any(self.source["path"], self.source["hp"])
            self.family.check(ckpt.spec, data)
        elif v.method is None:
            ckpt = train_model(self.family, data, base_cfg, hparams, mlet_hidden=t.get("mlet_hidden"),
                               mlet_min_rows=t.get("mlet_min_rows", 0))
        elif v.from_scratch:
            first, *rest = v.method.split(",")
            cfg = TrainConfig(**{**base_cfg.__dict__, **v.train})
            history = [{"method": first, "params": v.params, "min_rows": v.min_rows, "from_scratch": True}]
            ckpt = train_model(self.family, data, cfg, hparams, history=history,
                               make_table=fresh_tables(first, v.params, v.min_rows, cfg.seed))
            if rest:
                ckpt = compress(ckpt, parse_methods(",".join(rest), v.params), Context(data, cfg))
        else:
            ckpt = load_any(self.cache / f"ckpt-{base_key}")
            tune = TrainConfig(**{**base_cfg.__dict__, "keep_best": True, **v.train})  # fine-tunes keep their best
            ctx = Context(data, tune, Selection(v.tables, v.min_rows))
            ckpt = compress(ckpt, parse_methods(v.method, v.params), ctx)
        save_checkpoint(ckpt, path)
        return path, k

    def export(self, v: Variant, ckpt_path: Path, ckpt_key: str, target: str, data: Any) -> tuple[Path, str]:
        from .adapters import load_any
        from .export import export_checkpoint
        if target == TORCH:
            return ckpt_path, ckpt_key
        ex = self.recipe.get("export", {})
        opts = {**{k: ex[k] for k in EXPORT_KEYS if k in ex}, **v.export}
        k = key("export", ckpt=ckpt_key, target=target, atol=ex.get("atol"), rtol=ex.get("rtol"), opts=opts)
        path, done = self._step("export", k, f"{v.name} -> {target}")
        if not done:
            ckpt = load_any(ckpt_path)
            ckpt.path = ckpt_path.resolve()
            export_checkpoint(ckpt, target, path, data=data, atol=ex.get("atol"), rtol=ex.get("rtol"), opts=opts)
        return path, k

    def accuracy(self, v: Variant, artifact: Path, artifact_key: str, data: Any) -> dict[str, Any]:
        from .evaluate import evaluate
        ev = {k: self.recipe.get("evaluate", {}).get(k) for k in EVAL_KEYS}
        k = key("eval", artifact=artifact_key, **ev)
        path, done = self._step("eval", k, v.name)
        if not done:
            with output_file(path, owner=self.out) as tmp:
                r = evaluate(artifact, data, latency=False, **{k: x for k, x in ev.items() if x is not None})
                tmp.write_text(json.dumps(r, default=str))
        return json.loads(path.read_text())

    def targets(self) -> list[str]:
        return self.recipe.get("export", {}).get("targets", ["onnx"]) or [TORCH]


EVAL_KEYS = ("protocol", "negatives", "users")


def run_recipe(recipe: dict[str, Any], out: Path, extra: list[Variant] = ()) -> dict[str, Any]:
    """A recipe's run summary; a recipe with ``parts`` runs each part as a study in ``out/<part name>``."""
    if "parts" not in recipe:
        return run_pipeline(recipe, out, extra)
    names = [p["name"] for p in recipe["parts"]]
    if len(set(names)) != len(names):
        raise UserError(f"recipe {recipe['name']} has parts with the same name", "give each part a unique name")
    for part in recipe["parts"]:  # every part's trained checkpoint checked before any part runs
        Pipeline._source(part)
    studies = []
    for part in recipe["parts"]:
        sub = out / part["name"]
        sub.mkdir(exist_ok=True)
        studies.append(run_pipeline(part, sub, extra))
    for s in studies:
        s["data"] = str(Path(s["study"]) / s["data"]) if not Path(s["data"]).is_absolute() else s["data"]
    return {"recipe": recipe["name"], "reference": REFERENCE, "studies": studies,
            "rows": [r for s in studies for r in s["rows"]], "steps": [x for s in studies for x in s["steps"]],
            "synthetic": all(s["synthetic"] for s in studies), "threads": studies[0]["threads"]}


def run_pipeline(recipe: dict[str, Any], out: Path, extra: list[Variant] = ()) -> dict[str, Any]:
    """Every variant of ``recipe`` (plus ``extra`` and the same-budget controls) through every target;
    returns the run summary."""
    from .adapters import load_any
    from .evaluate.latency import ROTATE, measure
    from .evaluate.predictors import OrtPredictor, TorchPredictor
    from .evaluate.report import paired_delta
    from .evaluate.run import test_truth

    variants = with_controls([Variant(REFERENCE)] + [Variant.from_recipe(v) for v in recipe.get("variants", [])]
                             + list(extra))
    names = [v.name for v in variants]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UserError(f"variant name(s) {', '.join(sorted(dup))} appear more than once", "give each variant a unique name")
    pipe = Pipeline(recipe, out)
    family = pipe.family
    data, data_key = pipe.data()
    base_path, base_key = pipe.checkpoint(variants[0], data, data_key, None)
    ev = recipe.get("evaluate", {})
    if ev.get("latency", True):  # a latency batch the machine cannot run is refused before the variants run
        base_hp = load_any(base_path).spec.hparams
        for b in ev.get("batch_sizes", family.latency_batch_sizes):
            family.check_latency(base_hp, data, int(b))
    targets = pipe.targets()
    rows: list[dict[str, Any]] = []
    evals: dict[tuple[str, str], dict[str, Any]] = {}
    artifacts: list[tuple[dict[str, Any], Path, Path]] = []
    for v in variants:
        ckpt_path, ckpt_key = (base_path, base_key) if v.method is None else pipe.checkpoint(v, data, data_key, base_key)
        for target in targets:
            path, akey = pipe.export(v, ckpt_path, ckpt_key, target, data)
            r = pipe.accuracy(v, path, akey, data)
            evals[v.name, target] = r
            rows.append(result_row(recipe["name"], v, target, r))
            artifacts.append((rows[-1], path, ckpt_path))
    truth = test_truth(evals[REFERENCE, targets[0]], data)
    for row in rows:
        mine = evals[row["variant"], row["target"]]
        row["delta"] = (None if row["variant"] == REFERENCE else
                        paired_delta(mine, evals[REFERENCE, row["target"]], truth))
        row["delta_control"] = (paired_delta(mine, evals[row["control"], row["target"]], truth)
                                if row["control"] else None)
    if ev.get("latency", True):
        threads = ev.get("threads", 2)
        batches = [int(b) for b in ev.get("batch_sizes", family.latency_batch_sizes)]
        preds: dict[str, Any] = {}
        pairs = []
        for row, path, ckpt_path in artifacts:
            tag = f"{row['variant']}|{row['target']}"
            torch_tag = f"{row['variant']}|{TORCH}"
            if row["target"] != TORCH:
                preds[tag] = OrtPredictor(path / "model.onnx", threads, tag)
                pairs.append((torch_tag, tag))
            if torch_tag not in preds:
                preds[torch_tag] = TorchPredictor(load_any(ckpt_path).model, threads, torch_tag, family=family)
            pairs.append((tag, f"{REFERENCE}|{row['target']}"))
        say(f"latency: {len(preds)} backends x {len(batches)} batch sizes, in turns, {ev.get('repeats', 100)} calls each")
        lat = measure(list(preds.values()), lambda b: family.latency_inputs(base_hp, data, b, ROTATE), batches, ev.get("repeats", 100),
                      [p for p in pairs if p[0] != p[1]])
        for row in rows:
            tag = f"{row['variant']}|{row['target']}"
            row["p50_ms"] = {b: round(x["p50_ms"], 4) for b, x in lat["backends"][tag].items()}
            ref = f"{tag}/{REFERENCE}|{row['target']}"
            row["latency_ratio"] = lat["ratios"].get(ref) or {b: {"ratio": 1.0, "lo": 1.0, "hi": 1.0, "noisy": False}
                                                              for b in row["p50_ms"]}
            row["speedup_vs_torch"] = lat["ratios"].get(f"{row['variant']}|{TORCH}/{tag}")
    shown = Path(os.path.relpath(data.path, out)) if out.resolve() in data.path.resolve().parents else data.path
    return {"recipe": recipe["name"], "study": recipe["name"], "family": family.name, "reference": REFERENCE,
            "primary": family.primary, "data": str(shown), "fingerprint": data.fingerprint,
            "test_rows": int(evals[REFERENCE, targets[0]]["data"]["rows"]),
            "synthetic": bool(data.meta.get("synthetic")), "threads": ev.get("threads", 2), "rows": rows,
            "baseline": pipe.baseline_text(), "steps": pipe.log}


def result_row(study: str, v: Variant, target: str, r: dict[str, Any]) -> dict[str, Any]:
    from .metrics import METRICS
    acc = r["accuracy"].get("onnxruntime") or next(iter(r["accuracy"].values()))
    lk = (r.get("lookup") or {}).get("per_sample", {})
    return {"study": study, "variant": v.name, "target": target, "method": v.method or "dense", "params": v.params,
            "trained": v.trains(), "control": v.control, "primary": r["primary"],
            "metrics": {k: round(x, 6) for k, x in acc.items() if k in METRICS},
            "emb_bytes": r["bytes"]["embeddings"], "file_bytes": r["bytes"]["file"],
            "bytes_read_gpu": lk.get("bytes_read_gpu"), "lookup_flops": lk.get("flops"),
            "emb_dim": r["model"]["emb_dim"], "predictions": r["predictions"]}
