"""TensorRT target: the ONNX target's graph in the engine's precision, then an engine built from it
(``trt_builder``): one optimization profile from the model family (``--shapes`` overrides), quantized rows in
the form TensorRT keeps narrow, softmax attention as TensorRT's fused attention in 16-bit precision.

The folder holds ``model.engine``, the ``model.onnx`` it was built from, and ``build.log``. Parity runs the
engine where a supported GPU is present; elsewhere it runs ``model.onnx`` in ONNX Runtime (the engine's
exact input graph) and the manifest says so; with bf16, which ONNX Runtime's CPU kernels cannot run, it is
left to ``recompress evaluate`` on a GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from recompress.errors import UserError
from recompress.models.attention import attention_modules

from . import onnx as onnx_target
from .trt_builder import (
    FUSES,
    Range,
    build_engine,
    compute_capabilities,
    import_tensorrt,
    parse_shapes,
)

NAME = "trt"
FILE = "model.engine"
ATTENTION_FORMS = ("fused", "decomposed", "custom")  # custom: the parser inlines the node's function body
PRECISIONS = ("fp32", "fp16", "bf16")
DENSE_FORMS = ("fp32",)  # reduced precision comes from --precision (strongly typed builds)
QUANT_GRAPH = "dequant-gather"  # int8 rows stay int8 in the engine only in this form (docs/benchmarks.md)
ENGINE_FP32_TOLERANCE = (1e-4, 1e-3)  # TensorRT may run fp32 matrix products in TF32


def default_precision(model: torch.nn.Module) -> str:
    """fp16 where the model has softmax attention (TensorRT's fused attention has no fp32 kernel), else fp32."""
    return "fp16" if any("fused" in m.attention_forms for m in attention_modules(model)) else "fp32"


def parity_runtime(precision: str) -> str | None:
    from .trt_runtime import unsupported_here
    if unsupported_here() is None:
        return "tensorrt"
    return "onnxruntime" if precision in onnx_target.PRECISIONS else None


def check(family: Any, ckpt: Any, opts: dict[str, Any]) -> dict[str, Range]:
    """Refuse bad options before anything is exported; returns the engine's shape ranges."""
    ranges = family.profile(ckpt.spec, opts.get("layout"))
    given = parse_shapes(opts.get("shapes"))
    unknown = set(given) - set(ranges)
    if unknown:
        raise UserError(f"--shapes names {', '.join(sorted(unknown))}, which this {family.name} model has no axis for",
                        f"name one of {', '.join(ranges)}")
    trt, _ = import_tensorrt()
    compute_capabilities(trt, list(opts.get("compute_capability") or []))
    return {**ranges, **given}


def build(family: Any, ckpt: Any, folder: Path, inputs: dict[str, torch.Tensor], opts: dict[str, Any]) -> dict[str, Any]:
    precision = opts.get("precision") or default_precision(ckpt.model)
    layout = opts.get("layout")
    ranges = check(family, ckpt, opts)
    cache = opts.get("timing_cache")

    def engine(form: str | None) -> tuple[dict[str, Any], Any]:
        graph = onnx_target.build(family, ckpt, folder, inputs, {**opts, "precision": precision, "attention": form})
        return graph, build_engine(folder / onnx_target.FILE, folder / FILE, folder / "build.log",
                                   axes=family.input_axes(ckpt.spec.hparams, layout), ranges=ranges,
                                   decompose_attention=precision == "fp32",
                                   capabilities=list(opts.get("compute_capability") or []),
                                   timing_cache=Path(cache) if cache else None)

    try:
        graph, b = engine(opts.get("attention"))
    except UserError as e:
        mods = attention_modules(ckpt.model)
        if opts.get("attention") or not mods or not all("decomposed" in m.attention_forms for m in mods):
            raise
        graph, b = engine("decomposed")  # TensorRT's attention layer did not build even when decomposable
        b.summary["attention_fallback"] = (f"TensorRT could not build its attention layer for this model ({e.message}); "
                                           f"exported with --attention decomposed instead (MatMul/Softmax: correct, "
                                           f"not fused); {FUSES}")
    runtime = parity_runtime(precision)
    tolerance = ENGINE_FP32_TOLERANCE if runtime == "tensorrt" and precision == "fp32" else graph.get("tolerance")
    return {**graph, "file": FILE, "onnx": onnx_target.FILE, "precision": precision,
            "parity_runtime": runtime, **({"tolerance": tolerance} if tolerance else {}),
            "engine": {"flavor": b.flavor, "version": b.version, "build_seconds": b.seconds, "bytes": b.engine_bytes,
                       "compute_capabilities": b.compute_capabilities, "profile": b.profile,
                       "shape_ranges": {k: list(v) for k, v in ranges.items()}, "timing_cache": b.timing_cache,
                       "strongly_typed": True, "layers": b.summary, "log": "build.log"}}


def run(folder: Path, manifest: dict[str, Any], inputs: dict[str, torch.Tensor]) -> np.ndarray:
    """The engine on the batch (parity), or, where no engine can run, the ONNX graph it was built from."""
    if manifest.get("parity_runtime") == "tensorrt":
        from .trt_runtime import EngineRunner
        runner = EngineRunner(folder / FILE, manifest["outputs"][0]["name"])
        fixed = onnx_target.one_row_inputs({i["name"]: i["shape"] for i in manifest["inputs"]})
        return onnx_target.run_fitted(runner, fixed, {k: v.numpy() for k, v in inputs.items()})
    return onnx_target.run(folder, {**manifest, "file": manifest["onnx"]}, inputs)
