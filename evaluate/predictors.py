"""One Predictor interface over torch eager and ONNX Runtime, so accuracy and latency are measured alike."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from recompress.export.inputs import OUTPUT_NAME, Scorer
from recompress.export.onnx import make_session


class Predictor(Protocol):
    name: str

    def __call__(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray: ...


class TorchPredictor:
    """Eager PyTorch on the CPU with ``threads`` intra-op threads."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, threads: int) -> None:
        self.scorer = Scorer(model).eval()
        self.threads = threads

    def __call__(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            return self.scorer(torch.from_numpy(dense), torch.from_numpy(sparse)).numpy()


class OrtPredictor:
    """ONNX Runtime CPU session with ``threads`` intra-op threads and all graph optimizations."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int) -> None:
        self.session = make_session(path, threads)
        self.threads = threads

    def __call__(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {"dense": dense, "sparse": sparse})[0]
