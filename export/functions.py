"""Function bodies for recompress's custom ONNX nodes, so that runtimes without a plugin run them.

An ONNX model may define a node type as a function of standard ops (``ModelProto.functions``); a
runtime that has a kernel (a TensorRT plugin, say) for ``recompress.HSTUAttention`` may use it, and one
that has none inlines the body (ONNX Runtime does). The body reads the node's integer attributes
(``ref_attr_name``), so one function serves every model.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from recompress.models.hstu_node import DOMAIN, OP


def _attr_int(name: str, out: str) -> list[onnx.NodeProto]:
    """Nodes making ``out``, a 1-D int64 tensor holding the calling node's integer attribute ``name``."""
    node = helper.make_node("Constant", [], [out + "_scalar"])
    attr = onnx.AttributeProto()
    attr.name, attr.ref_attr_name, attr.type = "value_int", name, onnx.AttributeProto.INT
    node.attribute.append(attr)
    return [node, helper.make_node("Unsqueeze", [out + "_scalar", "zero_axis"], [out])]


def hstu_attention(opset: int) -> onnx.FunctionProto:
    """``recompress.HSTUAttention(q, k, v, bias, allowed) -> y`` (see ``recompress/models/hstu_node.py``)."""
    n = helper.make_node
    nodes = [
        n("Constant", [], ["zero_axis"], value=helper.make_tensor("zero_axis", TensorProto.INT64, [1], [0])),
        *_attr_int("num_heads", "H"), *_attr_int("attn_dim", "A"), *_attr_int("linear_dim", "DV"),
        n("Shape", ["q"], ["BL"], start=0, end=2),
        n("Shape", ["q"], ["L"], start=1, end=2),
        n("Constant", [], ["minus1"], value=helper.make_tensor("minus1", TensorProto.INT64, [1], [-1])),
        n("Constant", [], ["one_axis"], value=helper.make_tensor("one_axis", TensorProto.INT64, [1], [1])),
        n("Concat", ["BL", "H", "A"], ["qk_shape"], axis=0),
        n("Concat", ["BL", "H", "DV"], ["v_shape"], axis=0),
        n("Concat", ["BL", "minus1"], ["y_shape"], axis=0),
        n("Reshape", ["q", "qk_shape"], ["q4"]), n("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        n("Reshape", ["k", "qk_shape"], ["k4"]), n("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        n("Reshape", ["v", "v_shape"], ["v4"]), n("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        n("MatMul", ["qt", "kt"], ["s0"]),                      # [B, H, L, L]
        n("Unsqueeze", ["bias", "one_axis"], ["bias4"]),
        n("Add", ["s0", "bias4"], ["s"]),
        n("Sigmoid", ["s"], ["sig"]), n("Mul", ["s", "sig"], ["silu"]),
        n("Cast", ["L"], ["Lf"], to=TensorProto.FLOAT), n("Div", ["silu", "Lf"], ["normed"]),
        n("Unsqueeze", ["allowed", "one_axis"], ["allowed4"]), n("Cast", ["allowed4"], ["maskf"], to=TensorProto.FLOAT),
        n("Mul", ["normed", "maskf"], ["p"]),
        n("MatMul", ["p", "vt"], ["y4"]),                       # [B, H, L, DV]
        n("Transpose", ["y4"], ["y3"], perm=[0, 2, 1, 3]),
        n("Reshape", ["y3", "y_shape"], ["y"]),
    ]
    return helper.make_function(DOMAIN, OP, ["q", "k", "v", "bias", "allowed"], ["y"], nodes,
                                [helper.make_opsetid("", opset)],
                                ["num_heads", "attn_dim", "linear_dim", "scale", "normalization", "mask", "bias_layout"])


FUNCTIONS = {(DOMAIN, OP): hstu_attention}


def attach_functions(model: onnx.ModelProto) -> list[str]:
    """Add the body of every recompress node type the graph uses; returns their names (domain.op)."""
    used = sorted({(nd.domain, nd.op_type) for nd in model.graph.node if nd.domain == DOMAIN})
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    have = {(f.domain, f.name) for f in model.functions}
    for key in used:
        if key not in FUNCTIONS:
            raise RuntimeError(f"no function body for custom node {'.'.join(key)}")
        if key not in have:
            model.functions.append(FUNCTIONS[key](opset))
    if used and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return [".".join(k) for k in used]
