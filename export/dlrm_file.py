"""``--target dlrm``: a DLRM back in facebookresearch/dlrm's ``--save-model`` layout, so its users keep their
serving stack: ``emb_l.{i}.weight`` for plain tables, ``emb_l.{i}.weight_q``/``weight_r`` for QR tables
(dlrm's ``QREmbeddingBag``; pass dlrm the same ``--qr-operation``), ``emb_l.{i}.embs.weight`` and
``proj.weight`` for factorized tables of width k < d (dlrm's mixed-dimension ``PrEmbeddingBag``); anything
dlrm cannot hold (quantized rows, TT, hashed tables, a two-layer table wider than d) is written as the
dense table it computes. ``bot_l``/``top_l`` keep dlrm's Sequential indices (Linear at even positions);
NVIDIA's interaction padding is dropped (zero columns). The file also holds the counters dlrm's
``--load-model`` reads (the source's, when it came from dlrm), so ``dlrm_s_pytorch.py --load-model model.pt
--inference-only`` takes it, and a ``recompress`` entry saying how it was made.

Parity reads the written file back through recompress's dlrm reader (``adapters/dlrm_ref.py``, tested
against dlrm's forward) and compares its scores with the checkpoint's.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from recompress.errors import UserError
from recompress.tables import DenseTable, FactorizedTable
from recompress.tables.hashed import QRTable

from .readback import run  # noqa: F401  (the target's runtime for parity)

NAME = "dlrm"
FILE = "model.pt"
COUNTERS = {"iter": 0, "epoch": 0, "nepochs": 0, "nbatches": 0, "nbatches_test": 0, "train_loss": 0.0,
            "total_loss": 0.0, "test_acc": 0.0}


def check(family: Any, ckpt: Any, opts: dict[str, Any]) -> None:
    if family.name != "dlrm":
        raise UserError(f"--target dlrm writes facebookresearch/dlrm files; this is a {family.name} model",
                        "export it with --target onnx (or trt)")
    if ckpt.model.bottom_proj is not None:
        raise UserError("this DLRM has a projection after its bottom MLP (a width cut), which dlrm's layout cannot "
                        "hold", "export it with --target onnx, or compress without cutting the width")


def _table(i: int, t: Any, materialize: bool) -> tuple[dict[str, torch.Tensor], str]:
    p = f"emb_l.{i}."
    if not materialize and type(t) is QRTable and not t.stores:
        return {p + "weight_q": t.q.detach(), p + "weight_r": t.r.detach()}, f"qr ({t.op}, {t.collisions} collisions)"
    if not materialize and type(t) is FactorizedTable and not t.stores and t.inner < t.dim:
        return {p + "embs.weight": t.left.detach(), p + "proj.weight": t.right.detach().T.contiguous()}, \
            f"mixed-dimension (width {t.inner} projected to {t.dim})"
    kind = "dense" if type(t) is DenseTable and not t.stores else f"dense (computed from {t.form})"
    return {p + "weight": t.dense_weight().detach().contiguous()}, kind


def build(family: Any, ckpt: Any, folder: Path, inputs: dict[str, torch.Tensor], opts: dict[str, Any]) -> dict[str, Any]:
    model = ckpt.model
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    stored = {}
    qr_ops = set()
    written = {}
    for i, (name, t) in enumerate(model.tables.items()):
        tensors, stored[name] = _table(i, t, bool(opts.get("materialize")))
        state.update(tensors)
        written[name] = sum(v.numel() * v.element_size() for v in tensors.values())
        if any(k.endswith("weight_q") for k in tensors):
            qr_ops.add(t.op)
    if len(qr_ops) > 1:
        raise UserError(f"the QR tables use different operations ({', '.join(sorted(qr_ops))}); dlrm takes one "
                        "--qr-operation for all", "export with --materialize, or use one operation")
    for prefix, seq in (("bot_l", model.bottom), ("top_l", model.top)):
        linears = [(j, layer) for j, layer in enumerate(seq) if isinstance(layer, torch.nn.Linear)]
        for n, (j, layer) in enumerate(linears):
            w = layer.weight.detach()
            if prefix == "top_l" and n == 0 and model.pad:
                w = w[:, :w.shape[1] - model.pad]  # the padding columns only ever meet zeros
            state[f"{prefix}.{j}.weight"], state[f"{prefix}.{j}.bias"] = w.contiguous(), layer.bias.detach()
    upstream = {k: type(COUNTERS[k])(v) for k, v in ckpt.spec.provenance.get("upstream_metrics", {}).items()
                if k in COUNTERS}  # dlrm formats the counters with {:d}
    written_by = {"tool": "recompress export --target dlrm", "history": [h.get("method") for h in ckpt.spec.history],
                  "tables": stored}
    torch.save({"state_dict": state, **COUNTERS, **upstream, "recompress": written_by}, folder / FILE)
    hp = {"qr_operation": qr_ops.pop()} if qr_ops and "concat" not in qr_ops else {}
    return {"file": FILE, "layout": "facebookresearch/dlrm --save-model", "tables_stored": stored, "hp": hp,
            "exported_table_bytes": written,
            "artifact_is_checkpoint": True, "parity_runtime": "recompress's reader of dlrm files"}
