"""One Predictor interface over torch eager and ONNX Runtime, so accuracy and latency are measured alike.

A predictor takes the model's named inputs (numpy arrays, as the export's graph names them) and returns
its scores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from recompress.export.inputs import OUTPUT_NAME, Scorer
from recompress.export.onnx import make_session

Inputs = dict[str, np.ndarray]


class Predictor(Protocol):
    name: str

    def __call__(self, inputs: Inputs) -> np.ndarray: ...


class TorchPredictor:
    """Eager PyTorch on the CPU with ``threads`` intra-op threads."""

    runtime = "torch"

    def __init__(self, model: torch.nn.Module, threads: int, name: str = "torch") -> None:
        self.scorer = Scorer(model).eval()
        self.threads, self.name = threads, name

    def __call__(self, inputs: Inputs) -> np.ndarray:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self.scorer(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()


class OrtPredictor:
    """ONNX Runtime CPU session with ``threads`` intra-op threads and all graph optimizations."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int, name: str = "onnxruntime") -> None:
        self.session = make_session(path, threads)
        self.threads, self.name = threads, name

    def __call__(self, inputs: Inputs) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], inputs)[0]
