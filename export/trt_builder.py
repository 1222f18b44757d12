"""ONNX -> TensorRT engine over the API that full TensorRT and TensorRT-RTX share.

``tensorrt`` is used when it imports, else ``tensorrt_rtx`` (which builds ahead of time on a machine
without a GPU). Every build is strongly typed: precision is what the ONNX graph says (casts, Q/DQ), so the
same graph gives the same engine types in both flavors. The network is summarized before it is built
(which layers are fused attention, what each table Gather reads and in which type), because the engine
inspector needs a CUDA device and the build machine may have none.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from recompress.errors import UserError

FLAVORS = ("tensorrt", "tensorrt_rtx")
Range = tuple[int, int, int]  # min, opt, max
FUSES = ("TensorRT-RTX 1.7 fused head sizes 16, 32, 64 and 128 but not 8 or 50, and one head only at L = 200 of 10, "
         "50 and 200 (docs/benchmarks.md); for fused attention train with --heads 2 or more and dim / heads a "
         "multiple of 16")
PORTABLE = {"tensorrt_rtx": "portable: TensorRT-RTX's default (SM80, SM86, SM89, SM120 and later; not Turing)",
            "tensorrt": "the GPU it was built on"}


def import_tensorrt() -> tuple[ModuleType, str]:
    """The TensorRT module and its flavor (``tensorrt`` first, then ``tensorrt_rtx``)."""
    for name in FLAVORS:
        try:
            return import_module(name), name
        except ImportError:
            continue
    raise UserError("TensorRT is not installed", "pip install -e \".[trt]\" (TensorRT-RTX, which builds engines "
                                                 "on a machine without a GPU), or install full TensorRT")


def parse_shapes(text: str | None) -> dict[str, Range]:
    """``"batch=1:64:512,candidates=1:100:2000"`` -> {symbol: (min, opt, max)}."""
    out: dict[str, Range] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, _, spec = part.partition("=")
        try:
            lo, opt, hi = (int(x) for x in spec.split(":"))
        except ValueError:
            raise UserError(f"--shapes entry {part.strip()!r} is not NAME=MIN:OPT:MAX",
                            "write e.g. --shapes batch=1:64:512") from None
        if not 1 <= lo <= opt <= hi:
            raise UserError(f"--shapes {name.strip()}: need 1 <= min <= opt <= max, got {lo}:{opt}:{hi}",
                            "write the range as MIN:OPT:MAX")
        out[name.strip()] = (lo, opt, hi)
    return out


def compute_capabilities(trt: ModuleType, names: list[str]) -> list[Any]:
    """``["SM80", "sm89"]`` -> the flavor's ComputeCapability values (TensorRT-RTX only)."""
    if not names:
        return []
    known = getattr(trt, "ComputeCapability", None)
    if known is None:
        raise UserError("--compute-capability is a TensorRT-RTX option; full TensorRT builds for the GPU it runs on",
                        "leave --compute-capability out")
    members = {k: v for k, v in known.__members__.items() if k.startswith("SM")}
    out = []
    for n in names:
        key = n.strip().upper()
        key = key if key.startswith("SM") else "SM" + key.replace(".", "")
        if key not in members:
            raise UserError(f"{trt.__name__} {trt.__version__} cannot build for compute capability {n!r}",
                            f"choose from {', '.join(members)}")
        out.append(members[key])
    return out


class _Log:
    """A TensorRT logger that keeps every message (the build log) and the errors."""

    def __init__(self, trt: ModuleType) -> None:
        outer = self
        self.lines: list[str] = []
        self.errors: list[str] = []

        class Logger(trt.ILogger):
            def log(self, severity: Any, msg: str) -> None:
                if severity == trt.ILogger.VERBOSE:
                    return
                outer.lines.append(f"[{str(severity).split('.')[-1]}] {msg}")
                if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                    outer.errors.append(msg)

        self.logger = Logger()


@dataclass
class Build:
    """What a build wrote and what its network held."""

    flavor: str
    version: str
    seconds: float
    engine_bytes: int
    profile: dict[str, dict[str, list[int]]]
    compute_capabilities: list[str]
    summary: dict[str, Any]
    timing_cache: dict[str, Any] = field(default_factory=dict)


def _producer(net: Any) -> dict[str, Any]:
    return {layer.get_output(j).name: layer for layer in (net.get_layer(i) for i in range(net.num_layers))
            for j in range(layer.num_outputs)}


def _bytes(trt: ModuleType, t: Any) -> int:
    return int(np.dtype(trt.nptype(t.dtype)).itemsize) * int(np.prod(list(t.shape)))


def _name(dtype: Any) -> str:
    return str(dtype).split(".")[-1].lower()


def _origin(trt: ModuleType, name: str, made_by: dict[str, Any]) -> str:
    """The tensor ``name`` is a cast or identity of (the same indices, however the parser retyped them)."""
    src = made_by.get(name)
    while src is not None and src.type in (trt.LayerType.CAST, trt.LayerType.IDENTITY):
        name = src.get_input(0).name
        src = made_by.get(name)
    return name


def _table_source(trt: ModuleType, layer: Any, made_by: dict[str, Any]) -> dict[str, Any] | None:
    """What a Gather's data input is made of: a constant (stored as is), a DQ of a constant (stored narrow,
    dequantized on the fly, plus its per-row scales), or a Cast of a constant (folded into a wider table by
    the build). A 1-D constant gathered (a per-row bias) is returned with ``vector`` set."""
    src = made_by.get(layer.get_input(0).name)
    chain = []
    while src is not None and src.type in (trt.LayerType.DEQUANTIZE, trt.LayerType.CAST, trt.LayerType.SHUFFLE,
                                           trt.LayerType.SLICE):
        chain.append(src)
        src = made_by.get(src.get_input(0).name)
    if src is None or src.type != trt.LayerType.CONSTANT:
        return None
    stored = src.get_output(0)
    shape = list(stored.shape)
    if not shape or shape[0] < 2 or len(shape) > 2:
        return None  # a small constant (shapes, scalars), not a table
    entry = {"gather": layer.name, "index": _origin(trt, layer.get_input(1).name, made_by), "constant": src.name, "shape": shape,
             "dtype": _name(stored.dtype), "bytes": _bytes(trt, stored), "read_as": _name(layer.get_output(0).dtype)}
    if len(shape) == 1:
        return {**entry, "vector": True}
    scales = [made_by.get(c.get_input(1).name) for c in chain if c.type == trt.LayerType.DEQUANTIZE]
    scale_bytes = sum(_bytes(trt, c.get_output(0)) for c in scales if c is not None and c.type == trt.LayerType.CONSTANT)
    casts = any(c.type == trt.LayerType.CAST for c in chain)
    return {**entry, "value_bytes": entry["bytes"], "scale_bytes": scale_bytes, "bias_bytes": 0,
            "bytes": entry["bytes"] + scale_bytes,
            "stored": "widened: a Cast before the Gather is folded into a wider table" if casts and not scales else
                      "narrow, dequantized after the Gather (DequantizeLinear)" if scales else "as stored"}


def summarize(trt: ModuleType, net: Any) -> dict[str, Any]:
    """Layers by type, attention (fused or decomposable), and every table's storage in the network."""
    layers = [net.get_layer(i) for i in range(net.num_layers)]
    attention = [{"name": a.name, "normalization": _name(a.norm_op), "decomposable": bool(a.decomposable),
                  "dtype": _name(a.get_input(0).dtype), **_heads(a.get_input(0).shape)} for a in _attentions(trt, net)]
    made_by = _producer(net)
    tables: dict[str, dict[str, Any]] = {}
    found = [t for t in (_table_source(trt, lay, made_by) for lay in layers if lay.type == trt.LayerType.GATHER) if t]
    by_index = {t["index"]: t["constant"] for t in found if not t.get("vector")}
    for t in found:
        if not t.get("vector"):
            gather, _ = t.pop("gather"), t.pop("index")
            tables.setdefault(t["constant"], {**t, "gathers": []})["gathers"].append(gather)
    for t in found:  # a per-row bias gathered with a table's own indices belongs to that table
        table = tables.get(by_index.get(t["index"], "")) if t.get("vector") else None
        if table is not None and t["shape"][0] == table["shape"][0]:
            table.setdefault("bias_constants", set()).add((t["constant"], t["bytes"]))
    for table in tables.values():
        biases = table.pop("bias_constants", set())
        table["bias_bytes"] = sum(b for _, b in biases)
        table["bytes"] += table["bias_bytes"]
    matmuls = Counter(_name(lay.get_input(0).dtype) for lay in layers if lay.type == trt.LayerType.MATRIX_MULTIPLY)
    return {"layers": len(layers),
            "by_type": dict(Counter(str(lay.type).split(".")[-1].lower() for lay in layers).most_common()),
            "attention": attention,
            "fused_attention": sum(not a["decomposable"] for a in attention),
            "matmul_input_dtypes": dict(matmuls), "tables": list(tables.values()),
            "table_bytes": sum(t["bytes"] for t in tables.values()),
            "source": "network definition (the engine inspector needs a CUDA device)"}


def _heads(query_shape: Any) -> dict[str, int]:
    """Heads and head size of an attention's [batch, heads, length, head size] query."""
    shape = list(query_shape)
    return {"heads": int(shape[1]), "head_size": int(shape[3])} if len(shape) == 4 else {}


def _attentions(trt: ModuleType, net: Any) -> list[Any]:
    """The network's IAttention objects (reached through their input boundary layers)."""
    out = []
    for layer in (net.get_layer(i) for i in range(net.num_layers)):
        if layer.type == trt.LayerType.ATTENTION_INPUT:
            layer.__class__ = trt.IAttentionBoundaryLayer  # the bindings' downcast
            out.append(layer.attention)
    return out


def _set_decomposable(trt: ModuleType, net: Any) -> None:
    for a in _attentions(trt, net):
        a.decomposable = True


def _parse(trt: ModuleType, net: Any, log: _Log, onnx_path: Path) -> None:
    parser = trt.OnnxParser(net, log.logger)
    if parser.parse_from_file(str(onnx_path)):  # parsing copies no external weights (measured: RssAnon)
        return
    errs = [parser.get_error(i) for i in range(parser.num_errors)]
    first = errs[0] if errs else None
    where = f"node {first.node_name()!r} ({first.node_operator()})" if first is not None else "the graph"
    desc = first.desc().splitlines()[0] if first is not None else (log.errors or ["unknown error"])[-1]
    raise UserError(f"TensorRT refuses {where}: {desc}; nothing was written",
                    "export with --materialize (every table dense), choose another compression method, or "
                    "another --attention/--quant-graph form")


def _profile(trt: ModuleType, builder: Any, net: Any, axes: dict[str, dict[int, str]],
             ranges: dict[str, Range]) -> tuple[Any, dict[str, dict[str, list[int]]]]:
    prof = builder.create_optimization_profile()
    shown: dict[str, dict[str, list[int]]] = {}
    for i in range(net.num_inputs):
        t = net.get_input(i)
        shape = list(t.shape)
        sym = axes.get(t.name, {})
        picks = []
        for k in range(3):
            dims = []
            for ax, d in enumerate(shape):
                if d >= 0:
                    dims.append(d)
                elif ax in sym and sym[ax] in ranges:
                    dims.append(ranges[sym[ax]][k])
                else:
                    raise UserError(f"input {t.name!r} axis {ax} has no shape range",
                                    f"give it with --shapes {sym.get(ax, 'NAME')}=MIN:OPT:MAX")
            picks.append(dims)
        prof.set_shape(t.name, *picks)
        shown[t.name] = {"min": picks[0], "opt": picks[1], "max": picks[2]}
    return prof, shown


def build_engine(onnx_path: Path, engine_path: Path, log_path: Path, *, axes: dict[str, dict[int, str]],
                 ranges: dict[str, Range], decompose_attention: bool, capabilities: list[str],
                 timing_cache: Path | None) -> Build:
    """Parse ``onnx_path`` (strongly typed), build an engine with one profile from ``ranges`` (symbol ->
    min/opt/max, the symbols of ``axes``), write it and the build log. Raises UserError naming what
    TensorRT refused."""
    trt, flavor = import_tensorrt()
    log = _Log(trt)
    builder = trt.Builder(log.logger)
    net = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    _parse(trt, net, log, onnx_path)
    if decompose_attention:
        _set_decomposable(trt, net)
    built, shown, caps, cache_info, seconds = _build(trt, flavor, builder, net, axes, ranges, capabilities,
                                                     timing_cache, engine_path)
    fallback = None
    if not built and not decompose_attention and _attentions(trt, net):
        shapes = sorted({(h["heads"], h["head_size"]) for h in (_heads(a.get_input(0).shape) for a in _attentions(trt, net))
                         if h})
        which = ", ".join(f"{h} head{'s' if h > 1 else ''} of size {d}" for h, d in shapes) or "this shape"
        first = (log.errors or ["no error message"])[0].splitlines()[0][:300]
        fallback = (f"{flavor} {trt.__version__} could not build fused attention for {which} at these shape "
                    f"ranges, so attention was rebuilt decomposable (correct, not fused); {FUSES} (first error: "
                    f"{first})")
        _set_decomposable(trt, net)
        log.errors.clear()
        built, shown, caps, cache_info, seconds = _build(trt, flavor, builder, net, axes, ranges, capabilities,
                                                         timing_cache, engine_path)
    summary = {**summarize(trt, net), "attention_fallback": fallback}
    log_path.write_text("\n".join(log.lines) + "\n")
    if not built:
        detail = (log.errors or ["no error message"])[0].splitlines()[0][:400]  # the first: later ones follow from it
        hint = ("build with --precision fp16 or bf16 (fused attention has kernels for 16-bit types only), or "
                "--attention decomposed" if "Attention" in detail else
                "build with --precision fp16, or for another --compute-capability" if "FP32 GEMM" in detail else
                "export with --materialize (every table dense) or another compression method")
        raise UserError(f"TensorRT could not build the engine: {detail}; nothing was written", hint)
    return Build(flavor=flavor, version=trt.__version__, seconds=round(seconds, 2), engine_bytes=engine_path.stat().st_size,
                 profile=shown, compute_capabilities=[str(c).split(".")[-1] for c in caps] or [PORTABLE[flavor]],
                 summary=summary, timing_cache=cache_info)


def _build(trt: ModuleType, flavor: str, builder: Any, net: Any, axes: dict[str, dict[int, str]],
           ranges: dict[str, Range], capabilities: list[str], timing_cache: Path | None,
           engine_path: Path) -> tuple[Any, ...]:
    """One build of ``net`` into ``engine_path``: (built, profile shown, capabilities, cache info, seconds)."""
    config = builder.create_builder_config()
    prof, shown = _profile(trt, builder, net, axes, ranges)
    config.add_optimization_profile(prof)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    caps = compute_capabilities(trt, capabilities)
    if caps:
        config.num_compute_capabilities = len(caps)
        for i, c in enumerate(caps):
            config.set_compute_capability(c, i)
    cache_info: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TensorRT-RTX: timing-cache calls are no-ops
        if timing_cache is not None:
            blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
            config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=True)
            cache_info = {"path": str(timing_cache), "reused": bool(blob),
                          "note": "a no-op in TensorRT-RTX (its kernels are compiled on the GPU at load time)"
                          if flavor == "tensorrt_rtx" else "timings reused across builds"}
        t0 = time.perf_counter()
        built = _serialize(trt, builder, net, config, engine_path)
        seconds = time.perf_counter() - t0
        if built and timing_cache is not None and flavor == "tensorrt":
            timing_cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = timing_cache.with_suffix(".tmp")
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
            tmp.replace(timing_cache)
    return built, shown, caps, cache_info, seconds


def _serialize(trt: ModuleType, builder: Any, net: Any, config: Any, engine_path: Path) -> bool:
    """Build and write the engine to ``engine_path`` as TensorRT serializes it (where the API can: else the
    whole serialized engine is held in memory first); whether it was built."""
    if not hasattr(builder, "build_serialized_network_to_stream"):
        blob = builder.build_serialized_network(net, config)
        if blob is not None:
            engine_path.write_bytes(blob)
        return blob is not None

    class EngineFile(trt.IStreamWriter):
        def __init__(self, fh: Any) -> None:
            trt.IStreamWriter.__init__(self)
            self.fh = fh

        def write(self, data: bytes) -> int:
            return self.fh.write(data)

    built = False
    try:
        with open(engine_path, "wb") as fh:
            built = bool(builder.build_serialized_network_to_stream(net, config, EngineFile(fh)))
    finally:
        if not built:
            engine_path.unlink(missing_ok=True)  # what a failed (or interrupted) build wrote
    return built
