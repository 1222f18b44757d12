"""Running a TensorRT engine on CUDA (torch tensors hold the buffers), with clear refusals: no GPU, a GPU
whose compute capability the installed TensorRT cannot run, an engine this runtime cannot load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from recompress.errors import UserError

from .trt_builder import import_tensorrt


def unsupported_here() -> str | None:
    """Why no engine can run on this machine (None: one can)."""
    import torch
    if not torch.cuda.is_available():
        return "this machine has no CUDA GPU"
    trt, flavor = import_tensorrt()
    known = getattr(trt, "ComputeCapability", None)
    if known is not None:
        major, minor = torch.cuda.get_device_capability()
        sm = f"SM{major}{minor}"
        if sm not in known.__members__:
            have = ", ".join(k for k in known.__members__ if k.startswith("SM"))
            return (f"{flavor} {trt.__version__} has no kernels for this GPU ({torch.cuda.get_device_name()}, "
                    f"compute capability {major}.{minor}); it supports {have}")
    return None


class EngineRunner:
    """``runner(inputs) -> output``: one engine, one execution context, on the current CUDA device."""

    def __init__(self, path: Path, output: str) -> None:
        reason = unsupported_here()
        if reason is not None:
            raise UserError(f"cannot run the TensorRT engine {path}: {reason}",
                            "run it on a supported NVIDIA GPU; on this machine, export the checkpoint with "
                            "--target onnx (the same graph, run by ONNX Runtime) and evaluate that")
        import torch
        trt, _ = import_tensorrt()
        self.trt, self.torch = trt, torch
        self.logger = trt.Logger(trt.Logger.ERROR)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise UserError(f"{path} is not an engine this {trt.__name__} {trt.__version__} can load",
                            "rebuild it with 'recompress export --target trt' and this TensorRT")
        self.context = self.engine.create_execution_context()
        self.output = output
        self.stream = torch.cuda.Stream()

    def layer_info(self) -> Any:
        """The engine inspector's JSON (which layers fused into which kernels)."""
        import json
        insp = self.engine.create_engine_inspector()
        return json.loads(insp.get_engine_information(self.trt.LayerInformationFormat.JSON))

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        torch = self.torch
        held = []
        with torch.cuda.stream(self.stream):
            for name, value in inputs.items():
                t = torch.from_numpy(np.ascontiguousarray(value)).cuda(non_blocking=True)
                held.append(t)
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
            shape = tuple(self.context.get_tensor_shape(self.output))
            out = torch.empty(shape, dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(self.output, out.data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return out.cpu().numpy()
