"""ONNX target: the family's serving inputs with their dynamic axes, the deployment graph (fused lookups,
attention in the requested form; opset 23 when an ``Attention`` node is written, else 18), custom nodes
with their function bodies, no Loop/Sequence ops."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from recompress.blockfile import can_map_privately, writable_map_limit
from recompress.errors import UserError
from recompress.models.attention import attention_modules

from .functions import attach_functions
from .graph import deploy

NAME = "onnx"
FILE = "model.onnx"
OPSET = 18
ATTENTION_OPSET = 23  # the first opset with the Attention op
ATTENTION_FORMS = ("fused", "decomposed", "custom")  # what ONNX Runtime runs (custom: through its function body)
PREFERRED_ATTENTION = "fused"  # ORT CPU ran SASRec 1.07-1.23x faster fused than decomposed
                               # (bench/results/seq_export.json); HSTU has no fused form
FORBIDDEN_OPS = {"Loop", "Scan", "If", "SequenceConstruct", "SequenceAt", "SequenceInsert",
                 "SplitToSequence", "ConcatFromSequence"}
EXTERNAL_DATA_BYTES = 1 << 28  # weights above 256 MB go to model.onnx.data (protobuf caps a file at 2 GiB):
                                # written tensor by tensor instead of held twice in one message (a 720 MB int8
                                # table's export peaked at 4.0 GB), and mapped, not copied, by ONNX Runtime
COMPUTE = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}  # --precision -> autocast dtype
PRECISIONS = ("fp32", "fp16")  # what ONNX Runtime's CPU kernels run (none for a bf16 MatMul)
TOLERANCE = {"fp16": (2e-2, 2e-2), "bf16": (1e-1, 5e-2)}  # default parity (atol, rtol) against the fp32 checkpoint


class Autocast(nn.Module):
    """``scorer`` under ``torch.autocast(dtype)``, its output back in float32: the exported graph carries the
    reduced precision as casts (matrix products and attention in ``dtype``; tables, norms and softmax
    statistics as autocast keeps them), which a strongly typed TensorRT build follows."""

    def __init__(self, scorer: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.scorer, self.dtype = scorer, dtype

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=self.dtype):
            return self.scorer(*inputs).float()


def require_map(what: str, nbytes: int) -> None:
    """Refuse an initializer of ``nbytes`` ONNX Runtime could not map, before the graph is written."""
    if not can_map_privately(nbytes):
        raise unmappable(FILE, what, nbytes)


def mappable(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """``require_map`` for a stacked table, before it is written (``Scratch``'s ``admit``)."""
    require_map(f"stacked table of {shape[0]:,} rows", math.prod(shape) * dtype.itemsize)


def build(family: Any, ckpt: Any, folder: Path, inputs: dict[str, torch.Tensor], opts: dict[str, Any]) -> dict[str, Any]:
    scorer = deploy(family.scorer(ckpt.model, opts.get("scoring")), opts.get("quant_graph") or "gather-dequant",
                    opts.get("attention"), PREFERRED_ATTENTION, scratch=folder, admit=mappable).eval()
    forms = sorted({m.attention for m in attention_modules(scorer)})
    precision = opts.get("precision") or "fp32"
    if COMPUTE[precision] is not None:
        scorer = Autocast(scorer, COMPUTE[precision])
    opset = opts.get("opset") or (ATTENTION_OPSET if "fused" in forms else OPSET)
    state = scorer.state_dict()
    param_bytes = sum(t.numel() * t.element_size() for t in state.values())
    if param_bytes > EXTERNAL_DATA_BYTES and state:  # external: ONNX Runtime will map the biggest privately
        name, big = max(state.items(), key=lambda kv: kv[1].numel() * kv[1].element_size())
        require_map(f"initializer {name}", big.numel() * big.element_size())
    axes = family.input_axes(ckpt.spec.hparams, opts.get("layout"))
    names = list(axes)
    dims: dict[str, Any] = {}
    shapes = tuple({axis: dims.setdefault(sym, torch.export.Dim(sym, min=1)) for axis, sym in axes[n].items()}
                   for n in names)
    example = tuple(inputs[n][:2] if 0 in axes[n] else inputs[n][:1] for n in names)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(scorer, example, str(folder / FILE), input_names=names,
                          output_names=[family.output],
                          dynamic_shapes=(shapes,) if isinstance(scorer, Autocast) else shapes,
                          opset_version=opset, dynamo=True, verbose=False,
                          external_data=param_bytes > EXTERNAL_DATA_BYTES)
    model = onnx.load(str(folder / FILE), load_external_data=False)
    for node in model.graph.node:  # exporter debug metadata (stack traces): a third of a small file
        del node.metadata_props[:]
    custom = attach_functions(model)
    onnx.save(model, str(folder / FILE))
    if opts.get("dense", "fp32") == "int8":
        model = quantize_dense(folder / FILE, external=param_bytes > EXTERNAL_DATA_BYTES)
    graph = model.graph
    ops = sorted({n.op_type for n in graph.node})
    bad = FORBIDDEN_OPS.intersection(ops)
    if bad:
        raise RuntimeError(f"exported graph contains {sorted(bad)}, which TensorRT rejects")
    return {"file": FILE, "opset": opset, "ops": ops, "dense": opts.get("dense", "fp32"), "precision": precision,
            **({"tolerance": TOLERANCE[precision]} if precision in TOLERANCE else {}), "attention": forms,
            "custom_ops": {c: "function body in standard ops (ONNX Runtime inlines it)" for c in custom},
            "inputs": [{"name": i.name, "dtype": onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type).lower(),
                        "shape": [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]}
                       for i in graph.input],
            "outputs": [{"name": o.name, "shape": [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]}
                        for o in graph.output]}


def quantize_dense(path: Path, external: bool = False) -> Any:
    """Dense layers (MatMul/Gemm with constant weights) to int8 with ONNX Runtime's dynamic quantization:
    int8 weights per tensor, activations quantized per batch at run time (u8 x s8, the VNNI path). The
    embedding tables and the interaction are left alone; ``evaluate`` reports the accuracy this costs.
    ``external``: the weights are in ``<file>.data`` beside it. The quantizer reads a whole model into memory,
    so it is given the graph without the initializers no MatMul/Gemm reads (the tables) as graph inputs;
    they come back as they were, their bytes never read, and the quantized weights are appended to the data file
    (which keeps the float ones it held: the dense layers' size)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's advice to pre-process goes to the root logger
    work = path.with_name("dense-int8")
    work.mkdir()
    model = onnx.load(str(path), load_external_data=False)
    aside = _set_aside(model, path.parent) if external else []
    quantize_dynamic(model, str(work / path.name), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=external)
    model = onnx.load(str(work / path.name))
    shutil.rmtree(work)
    names = {t.name for t in aside}
    kept = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    model.graph.initializer.extend(aside)
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=f"{path.name}.data")  # appended to the data file: the tables' offsets hold
    return onnx.load(str(path), load_external_data=False)


def _set_aside(model: onnx.ModelProto, folder: Path) -> list[onnx.TensorProto]:
    """Take the external initializers no MatMul/Gemm reads out of ``model``, each left as a graph input of its
    type and shape; read the others' bytes from ``folder``."""
    from onnx.external_data_helper import load_external_data_for_tensor
    weights = {i for n in model.graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input}
    aside = [t for t in model.graph.initializer
             if t.data_location == onnx.TensorProto.EXTERNAL and t.name not in weights]
    kept = [t for t in model.graph.initializer if t not in aside]
    for t in kept:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            load_external_data_for_tensor(t, str(folder))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in aside)
    return aside


def _stored_bytes(t: onnx.TensorProto) -> int:
    """An external initializer's bytes: its recorded length, else its shape times its element size."""
    length = dict((e.key, e.value) for e in t.external_data).get("length")
    if length is not None:
        return int(length)
    return math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def unmappable(graph: str, what: str, nbytes: int) -> UserError:
    """ONNX Runtime cannot open ``graph``: the kernel grants no private writable map of ``what``, one of its
    initializers (how ONNX Runtime maps one), said with the limit's policy where it is known."""
    limit = writable_map_limit()
    grants = f"up to {limit[1]}: {limit[0] / 1e9:.1f} GB" if limit else "of that size now"
    return UserError(f"ONNX Runtime maps {graph}'s {what} ({nbytes / 1e9:.1f} GB) private and writable, "
                     f"and this machine grants one such map {grants}", NO_MAP_FIX)


NO_MAP_FIX = ("run it where RAM + swap is larger than that initializer, or let the kernel grant the map: "
              "sysctl -w vm.overcommit_memory=1 (ONNX Runtime maps the file; it does not copy it)")


def no_memory(path: Path, error: Exception) -> UserError:
    """ONNX Runtime's bare std::bad_alloc on opening ``path``, explained: it maps each external initializer
    private and writable, and the kernel grants such a map only up to a limit (``writable_map_limit``)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    sizes = {t.name: _stored_bytes(t) for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    name = max(sizes, key=sizes.get, default=None)
    if name is not None and not can_map_privately(sizes[name]):
        return unmappable(path.name, f"initializer {name}", sizes[name])
    first = str(error).strip().splitlines()[0][:200]
    return UserError(f"ONNX Runtime ran out of memory opening {path.name} ({first})" + (
        f"; its largest initializer, {name}, holds {sizes[name] / 1e9:.1f} GB" if name is not None else ""), NO_MAP_FIX)


def make_session(path: Path, threads: int = 1, providers: list[str] | None = None) -> Any:
    """An ONNX Runtime session with all graph optimizations and a fixed thread count; running out of memory
    opening it, or a file it cannot parse, is said by name (:func:`no_memory`)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  (ONNX Runtime's error types are not exported as classes)
        if type(e).__name__ in ("InvalidProtobuf", "NoSuchFile"):  # the file, not the graph
            first = str(e).strip().splitlines()[0][:200]
            raise UserError(f"ONNX Runtime cannot load {path} ({first})",
                            "the export is damaged: export it again") from None
        if "bad_alloc" not in str(e):
            raise
        raise no_memory(path, e) from None


def one_row_inputs(shapes: dict[str, list[Any]]) -> set[str]:
    """Inputs whose graph fixes the batch axis to one row (candidates shared by the batch), from
    {name: shape} with symbolic axes as names."""
    return {n for n, shape in shapes.items() if shape and shape[0] == 1}


def session_shapes(sess: Any) -> dict[str, list[Any]]:
    return {i.name: list(i.shape) for i in sess.get_inputs()}


def loops_rows(fixed: set[str], inputs: dict[str, np.ndarray]) -> bool:
    """Whether :func:`run_fitted` runs these inputs one row at a time (per-row inputs, shared-row graph)."""
    return any(len(inputs[k]) > 1 for k in fixed if k in inputs)


def run_fitted(call: Callable[[dict[str, np.ndarray]], np.ndarray], fixed: set[str],
               inputs: dict[str, np.ndarray]) -> np.ndarray:
    """``call`` on ``inputs``, fitted to the graph's input layout (``fixed``: inputs it fixes to one row): when
    the graph fixes an input to one row (candidates shared by the batch) and several came, the rows run one
    at a time; when the graph gives an input the batch axis and one row came for a larger batch, that row
    is broadcast to the batch."""
    rows = max(len(v) for v in inputs.values())
    if loops_rows(fixed, inputs):
        return np.concatenate([call({k: v[r:r + 1] if len(v) > 1 else v for k, v in inputs.items()})
                               for r in range(rows)])
    fitted = {k: v if k in fixed or len(v) == rows else np.broadcast_to(v, (rows, *v.shape[1:])) for k, v in inputs.items()}
    return call({k: np.ascontiguousarray(v) for k, v in fitted.items()})


def session_call(sess: Any, output: str) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    return lambda inputs: sess.run([output], inputs)[0]


def run(folder: Path, manifest: dict[str, Any], inputs: dict[str, torch.Tensor]) -> np.ndarray:
    sess = make_session(folder / manifest["file"])
    return run_fitted(session_call(sess, manifest["outputs"][0]["name"]), one_row_inputs(session_shapes(sess)),
                      {k: v.numpy() for k, v in inputs.items()})
