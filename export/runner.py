"""What every export target shares: atomic output folder, sample inputs, parity against torch, manifest.

Everything model-specific comes from the model's family: its serving module (the parity reference),
its input names and dynamic axes, and the batches parity runs on.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recompress import checkpoint as checkpoints
from recompress.checkpoint import Checkpoint
from recompress.errors import UserError
from recompress.models import family_of
from recompress.models.attention import check_attention
from recompress.outputs import check_output, output_dir
from recompress.progress import say
from recompress.tables import DenseTable
from recompress.tables.rowwise import QuantizedRows

from .graph import copy_sharing_tables
from .manifest import MANIFEST, versions
from .targets import load_target

QUANT_GRAPHS = ("gather-dequant", "dequant-gather")
DENSE_FORMS = {"fp32": (1e-5, 1e-4), "int8": (0.1, 0.0)}  # dense-layer form -> default parity (atol, rtol)


def deployable(ckpt: Checkpoint, materialize: bool, quant_graph: str) -> Checkpoint:
    """The checkpoint as it will be exported (every table dense if ``materialize``), after checking that
    ``quant_graph`` can express its quantized rows. The original checkpoint is left as it is."""
    if quant_graph not in QUANT_GRAPHS:
        raise UserError(f"unknown quantized graph form {quant_graph!r}", f"choose from {', '.join(QUANT_GRAPHS)}")
    model = ckpt.model
    if materialize:
        model = copy_sharing_tables(model)
        for name, t in model.tables.items():
            if not (type(t) is DenseTable and not t.stores):
                model.tables[name] = DenseTable(t.rows, t.dim, t.dense_weight())
    if quant_graph == "dequant-gather" and any(isinstance(m, QuantizedRows) and m.fmt == "int4" for m in model.modules()):
        raise UserError("the dequant-gather graph form cannot hold int4 rows at opset 18",
                        "export int4 tables with --quant-graph gather-dequant")
    return Checkpoint(model, ckpt.spec, ckpt.path)


def inputs_of(ckpt: Checkpoint, data: Any | None) -> list[Path]:
    """What an export reads (the checkpoint folder and the dataset), which it must never write over."""
    return [p for p in (ckpt.path, data.path if data is not None else None) if p is not None]


def parity(expected: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    diff = np.abs(expected.astype(np.float64) - got.astype(np.float64))
    allowed = atol + rtol * np.abs(expected)
    return {"samples": len(expected), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "atol": atol, "rtol": rtol, "passed": bool((diff <= allowed).all())}


def run_checked(mod: Any, folder: Path, manifest: dict[str, Any], label: str, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """The artifact's output on a parity batch; a runtime that fails on it is a failed export, said in one line."""
    try:
        return mod.run(folder, manifest, batch)
    except UserError as e:  # a refusal that names its cause
        raise UserError(f"{e.message}; nothing was written", e.hint) from None
    except Exception as e:  # noqa: BLE001  (ONNX Runtime's error types are not exported as classes)
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(f"the exported {manifest['target']} graph fails on the parity batch '{label}' ({first}); "
                        "nothing was written", "try --materialize or another --attention form, and report it "
                                               "with 'recompress inspect CKPT'") from None


def export_checkpoint(ckpt: Checkpoint, target: str, out: str | Path, *, data: Any | None = None,
                      samples: int = 2048, atol: float | None = None, rtol: float | None = None,
                      overwrite: bool = False, opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export ``ckpt`` to folder ``out``; raises (and writes nothing) if parity fails.

    Parity compares the artifact with the *stored* checkpoint's default serving module (not a
    materialized or rewritten copy, not another attention form or scoring graph) on the family's parity
    batches (DLRM: real rows with one id per bag, and multi-id bags with -1 padding and empty bags).
    """
    mod = load_target(target)
    family = family_of(ckpt.spec)
    if data is not None:
        family.check(ckpt.spec, data)
    check_output(out, overwrite=overwrite, inputs=inputs_of(ckpt, data))
    opts = dict(opts or {})
    opts["dense"] = opts.get("dense") or "fp32"
    dense_forms = getattr(mod, "DENSE_FORMS", tuple(DENSE_FORMS))
    if opts["dense"] not in dense_forms:
        raise UserError(f"the {target} target has no {opts['dense']!r} dense-layer form",
                        f"choose --dense from {', '.join(dense_forms)}"
                        + (" (set the engine's precision with --precision)" if target == "trt" else ""))
    precisions = getattr(mod, "PRECISIONS", ("fp32",))
    if opts.get("precision") and opts["precision"] not in precisions:
        raise UserError(f"the {target} target has no {opts['precision']} precision",
                        f"choose --precision from {', '.join(precisions)}")
    given_tolerance = atol is not None or rtol is not None
    atol = DENSE_FORMS[opts["dense"]][0] if atol is None else atol
    rtol = DENSE_FORMS[opts["dense"]][1] if rtol is None else rtol
    stored = ckpt
    opts["quant_graph"] = opts.get("quant_graph") or getattr(mod, "QUANT_GRAPH", QUANT_GRAPHS[0])
    forms = getattr(mod, "ATTENTION_FORMS", ())
    if opts.get("attention") and opts["attention"] not in forms:
        raise UserError(f"the {target} target has no kernel for {opts['attention']} attention",
                        f"choose --attention from {', '.join(forms)}" if forms else "leave --attention out")
    check_attention(ckpt.model, opts.get("attention"))
    if opts.get("layout") and opts["layout"] not in family.layouts:
        raise UserError(f"{family.name} models have no {opts['layout']!r} candidates layout",
                        f"choose from {', '.join(family.layouts)}" if family.layouts else "leave --candidates-layout out")
    scorings = family.scorings_of(ckpt.spec.hparams)
    if opts.get("scoring") and opts["scoring"] not in scorings:
        raise UserError(f"this {family.name} model has no {opts['scoring']!r} scoring graph",
                        f"choose from {', '.join(scorings)}" if scorings else "leave --scoring out")
    if hasattr(mod, "check"):
        mod.check(family, ckpt, opts)  # the target's own options, before any work
    ckpt = deployable(ckpt, bool(opts.get("materialize")), opts["quant_graph"])
    batches = family.parity_batches(stored.model, samples, data)
    single = next(iter(batches.values()))
    reference = family.scorer(stored.model).eval()
    with torch.no_grad():
        expected = {k: reference(**b).numpy() for k, b in batches.items()}
    with output_dir(out, kind="export", overwrite=overwrite, inputs=inputs_of(stored, data)) as tmp:
        t0 = time.perf_counter()
        say(f"exporting to {target} ...")
        manifest: dict[str, Any] = {"target": target, "family": family.name, **mod.build(family, ckpt, tmp, single, opts)}
        manifest["export_seconds"] = round(time.perf_counter() - t0, 2)
        if manifest.get("tolerance") and not given_tolerance:
            atol, rtol = manifest["tolerance"]
        runtime = manifest.get("parity_runtime", target)
        if runtime is None:
            manifest["parity"] = {"passed": None, "max_abs_diff": None, "samples": 0,
                                  "skipped": f"no runtime here runs {manifest.get('precision')} graphs; "
                                             "'recompress evaluate' on a GPU checks the engine"}
        else:
            checks = {k: parity(expected[k], run_checked(mod, tmp, manifest, k, b), atol, rtol) for k, b in batches.items()}
            worst = max(checks.values(), key=lambda c: c["max_abs_diff"])
            manifest["parity"] = {**worst, "samples": sum(c["samples"] for c in checks.values()),
                                  "passed": all(c["passed"] for c in checks.values()), "batches": checks,
                                  "inputs": "test split" if data is not None else "random valid ids",
                                  "reference": "stored checkpoint (torch)", "runtime": runtime}
        if manifest["parity"]["passed"] is False:
            bad = [k for k, c in checks.items() if not c["passed"]]
            p = manifest["parity"]
            raise UserError(f"{target} output differs from the checkpoint by up to {p['max_abs_diff']:.3g} "
                            f"(allowed {atol} + {rtol}*|y|) on {', '.join(bad)}; nothing was written",
                            "loosen --atol/--rtol if this precision is acceptable")
        source = stored.path if not stored.modified else None  # a model changed in memory is no file's
        manifest["source"] = {"path": str(source) if source else None,
                              "relative": os.path.relpath(source, Path(out).absolute()) if source else None,
                              "sha256": checkpoints.checkpoint_hash(source) if source else None,
                              "format": stored.spec.provenance.get("source_format", "recompress")}
        manifest["model_spec"] = json.loads(stored.spec.to_json())
        manifest["table_bytes"] = {n: t.stored_bytes() for n, t in stored.model.tables.items()}
        manifest.setdefault("exported_table_bytes", {n: t.stored_bytes() for n, t in ckpt.model.tables.items()})
        manifest["lookup_cost"] = {n: t.lookup_cost() for n, t in ckpt.model.tables.items()}
        manifest["options"] = {"materialize": bool(opts.get("materialize")), "quant_graph": opts["quant_graph"],
                               "dense": opts["dense"], "attention": opts.get("attention"),
                               "precision": manifest.get("precision", "fp32"), "shapes": opts.get("shapes"),
                               "compute_capability": list(opts.get("compute_capability") or []) or None,
                               "scoring": opts.get("scoring") or (scorings[0] if scorings else None),
                               "layout": opts.get("layout") or (family.layouts[0] if family.layouts else None)}
        manifest["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        manifest["versions"] = versions()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    p = manifest["parity"]
    say(f"parity max |diff| {p['max_abs_diff']:.2e} on {p['samples']} samples ({p.get('runtime', target)}) -> {out}"
        if p["passed"] else f"[yellow]parity not checked:[/yellow] {p['skipped']} -> {out}")
    return manifest
