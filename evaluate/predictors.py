"""One Predictor interface over torch eager and ONNX Runtime, so accuracy and latency are measured alike.

A predictor takes the model's named inputs (numpy arrays, named as the family's serving inputs) and
returns its output; ``runtime`` groups predictors for the latency turns.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from recompress.export.graph import copy_sharing_tables
from recompress.export.onnx import (
    loops_rows,
    make_session,
    one_row_inputs,
    run_fitted,
    session_call,
    session_shapes,
)

from recompress.errors import UserError

Inputs = dict[str, np.ndarray]


class Predictor(Protocol):
    name: str
    runtime: str

    def __call__(self, inputs: Inputs) -> np.ndarray: ...


class TorchPredictor:
    """Eager PyTorch with ``threads`` intra-op threads: the family's serving module, in its ``scoring``
    graph and ``attention`` form (None: the defaults)."""

    runtime = "torch"

    def __init__(self, model: torch.nn.Module, threads: int, name: str = "torch", family: Any = None,
                 scoring: str | None = None, attention: str | None = None) -> None:
        from recompress.models.attention import set_attention
        from recompress.training import family_of_model
        self.device = "cpu"
        if attention is not None:  # on a copy sharing the tables: the caller's model keeps its form
            model = copy_sharing_tables(model)
            set_attention(model, attention)
            if attention == "triton":
                self.device = triton_device()
                model = model.to(self.device)
        self.scorer = (family or family_of_model(model)).scorer(model, scoring).eval()
        self.threads, self.name = threads, name

    def __call__(self, inputs: Inputs) -> np.ndarray:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            out = self.scorer(**{k: torch.from_numpy(v).to(self.device) for k, v in inputs.items()})
            return out.cpu().numpy()


def triton_device() -> str:
    """Where the Triton kernels run: CUDA, or the CPU under Triton's interpreter (TRITON_INTERPRET=1)."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    raise UserError("the triton attention form runs on a CUDA GPU, and this machine has none",
                    "leave --attention out (or set TRITON_INTERPRET=1 to run the kernel, slowly, in Triton's "
                    "interpreter)")


class OrtPredictor:
    """ONNX Runtime CPU session with ``threads`` intra-op threads and all graph optimizations."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int, name: str = "onnxruntime") -> None:
        self.session = make_session(path, threads)
        self.call = session_call(self.session, self.session.get_outputs()[0].name)
        self.fixed = one_row_inputs(session_shapes(self.session))
        self.threads, self.name = threads, name

    def __call__(self, inputs: Inputs) -> np.ndarray:
        return run_fitted(self.call, self.fixed, inputs)

    def loops_rows(self, inputs: Inputs) -> bool:
        return loops_rows(self.fixed, inputs)


class TrtPredictor:
    """A TensorRT engine on the current CUDA device (refused with the reason where none can run it)."""

    runtime = "tensorrt"

    def __init__(self, path: Path, manifest: dict[str, Any], name: str = "tensorrt") -> None:
        from recompress.export.trt_runtime import EngineRunner
        self.runner = EngineRunner(path, manifest["outputs"][0]["name"])
        self.fixed = one_row_inputs({i["name"]: i["shape"] for i in manifest["inputs"]})
        self.name = name

    def __call__(self, inputs: Inputs) -> np.ndarray:
        return run_fitted(self.runner, self.fixed, inputs)

    def loops_rows(self, inputs: Inputs) -> bool:
        return loops_rows(self.fixed, inputs)
