"""Benchmark (not a test): the ONNX Runtime CPU kernels behind the deployment graph's layout choices.

    python bench/ort_ops.py --out bench/results/ort_ops.json

Each pair computes the same result two ways on Criteo-like shapes (batch 512, 26 tables, 27 interaction
features), timed in one run with the measurement every benchmark uses (``evaluate/latency.py``):
- summing bags: ReduceSum over the bag axis of [B, T, L, d] (a middle axis) vs one MatMul of [B, T, L*d]
  with L stacked identities (what export/graph.py writes);
- picking the interaction's lower triangle: Gather on axis 1 of [B, F*F] vs Transpose, Gather on axis 0,
  Transpose (what export/graph.py writes).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from recompress.evaluate.latency import measure
from recompress.evaluate.predictors import OrtPredictor

B, T, L, D, F = 512, 26, 1, 16, 27


def graph(name: str, nodes: list, inp: tuple[str, list[int]], inits: dict[str, np.ndarray], out: str) -> onnx.ModelProto:
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info(inp[0], TensorProto.FLOAT, inp[1])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def models() -> dict[str, tuple[onnx.ModelProto, str, list[int]]]:
    tri = np.array([i * F + j for i in range(F) for j in range(i)], dtype=np.int64)
    eye = np.tile(np.eye(D, dtype=np.float32), (L, 1))
    return {
        "bag sum: ReduceSum over the bag axis": (graph("rs", [helper.make_node("ReduceSum", ["x", "ax"], ["y"], keepdims=0)],
                                                       ("x", [B, T, L, D]), {"ax": np.array([2])}, "y"), "x", [B, T, L, D]),
        "bag sum: MatMul with stacked identities": (graph("mm", [
            helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "eye"], ["y"])],
            ("x", [B, T, L, D]), {"shape": np.array([B, T, L * D]), "eye": eye}, "y"), "x", [B, T, L, D]),
        "triangle: Gather on axis 1": (graph("g1", [helper.make_node("Gather", ["z", "tri"], ["y"], axis=1)],
                                              ("z", [B, F * F]), {"tri": tri}, "y"), "z", [B, F * F]),
        "triangle: Transpose, Gather on axis 0, Transpose": (graph("g0", [
            helper.make_node("Transpose", ["z"], ["t"], perm=[1, 0]), helper.make_node("Gather", ["t", "tri"], ["g"], axis=0),
            helper.make_node("Transpose", ["g"], ["y"], perm=[1, 0])], ("z", [B, F * F]), {"tri": tri}, "y"), "z", [B, F * F]),
    }


class Fixed(OrtPredictor):
    """An ORT predictor whose one input has a fixed name (ignores the pool's DLRM input names)."""

    def __init__(self, path: Path, name: str, inp: str, shape: list[int]) -> None:
        super().__init__(path, 2, name)
        self.x = {inp: np.random.default_rng(0).random(shape, dtype=np.float32)}

    def __call__(self, inputs) -> np.ndarray:
        return self.session.run(None, self.x)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=400)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ortops-"))
    preds = []
    for name, (m, inp, shape) in models().items():
        path = tmp / f"{len(preds)}.onnx"
        onnx.save(m, str(path))
        preds.append(Fixed(path, name, inp, shape))
    names = [p.name for p in preds]
    res = measure(preds, lambda b: [{}] * 16, [B], a.repeats, [(names[0], names[1]), (names[2], names[3])])
    out = {"shapes": {"B": B, "T": T, "L": L, "d": D, "F": F},
           "p50_ms": {n: res["backends"][n][str(B)]["p50_ms"] for n in names}, "ratios": res["ratios"]}
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
