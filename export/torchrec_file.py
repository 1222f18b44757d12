"""``--target torchrec``: a DLRM as the state dict of TorchRec's ``torchrec.models.dlrm.DLRM`` (``sparse_arch.
embedding_bag_collection.embedding_bags.{table}.weight``, ``dense_arch``, ``over_arch``), so its users keep
their serving stack. Plain tables are float; int8 and int4 rows are written in FBGEMM's fused TBE row layout
that TorchRec's quantized inference collection (``torchrec.quant.EmbeddingBagCollection``) holds
(``recompress.tables.tbe_rows``: its scale and bias are fp16, so int8 rows, whose scale and bias are fp32
here, round them); every other kind (TT, QR, hashed, low-rank, two-layer, fp16/bf16 rows) becomes the dense
table it computes. The over-arch's pairwise-dot columns go back to TorchRec's ``triu_indices`` order.
Load it into a DLRM (float tables) or a DLRM whose collection is quantized (``quantize_embeddings``, int8
rows) built with the tables' names in this order, ``load_state_dict(strict=True)``.

Parity reads the written file back through recompress's TorchRec reader (``adapters/torchrec.py``) and
compares its scores with the checkpoint's; bench/upstream_torchrec.py loads it into real TorchRec.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from recompress.errors import UserError
from recompress.tables import DenseTable, tbe_rows

from .dlrm_file import check as check_dlrm
from .readback import run  # noqa: F401  (the target's runtime for parity)

NAME = "torchrec"
FILE = "model.pt"
BAGS = "sparse_arch.embedding_bag_collection.embedding_bags"
INT8_TOLERANCE = (5e-3, 5e-3)  # int8 rows with their scale and bias rounded to fp16 (measured: 1e-3 on a Criteo DLRM)


def check(family: Any, ckpt: Any, opts: dict[str, Any]) -> None:
    if family.name != "dlrm":
        raise UserError(f"--target torchrec writes torchrec.models.dlrm.DLRM state dicts; this is a {family.name} model",
                        "export it with --target onnx (or trt)")
    check_dlrm(family, ckpt, opts)
    if ckpt.model.hparams.get("interaction_itself"):
        raise UserError("this DLRM's interaction includes each feature's dot with itself, which TorchRec's DLRM has "
                        "not", "export it with --target onnx or --target dlrm")


def _table(name: str, t: Any, materialize: bool) -> tuple[torch.Tensor, str]:
    store = t.stores["weight"] if type(t) is DenseTable and "weight" in t.stores else None
    if not materialize and store is not None and store.fmt in ("int8", "int4"):
        return tbe_rows.pack(store), f"{store.fmt} rows (TBE, fp16 scale and bias)"
    kind = "float" if type(t) is DenseTable and not t.stores else f"float (computed from {t.form})"
    return t.dense_weight().detach().contiguous(), kind


def build(family: Any, ckpt: Any, folder: Path, inputs: dict[str, torch.Tensor], opts: dict[str, Any]) -> dict[str, Any]:
    from recompress.adapters.torchrec import triu_permutation
    model = ckpt.model
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    stored = {}
    for name, t in model.tables.items():
        state[f"{BAGS}.{name}.weight"], stored[name] = _table(name, t, bool(opts.get("materialize")))
    linears = lambda seq: [m for m in seq if isinstance(m, torch.nn.Linear)]
    for j, lin in enumerate(linears(model.bottom)):
        state[f"dense_arch.model._mlp.{j}._linear.weight"], state[f"dense_arch.model._mlp.{j}._linear.bias"] = \
            lin.weight.detach(), lin.bias.detach()
    top = linears(model.top)
    d, perm = model.hparams["emb_dim"], triu_permutation(len(model.tables))
    w0 = top[0].weight.detach()[:, :d + len(perm)]  # NVIDIA's padding columns only ever meet zeros
    inverse = torch.empty(len(perm), dtype=torch.long)
    inverse[torch.tensor(perm)] = torch.arange(len(perm))
    weights = [torch.cat([w0[:, :d], w0[:, d:][:, inverse]], 1), *(lin.weight.detach() for lin in top[1:])]
    for j, (w, lin) in enumerate(zip(weights[:-1], top[:-1])):
        state[f"over_arch.model.0._mlp.{j}._linear.weight"], state[f"over_arch.model.0._mlp.{j}._linear.bias"] = \
            w.contiguous(), lin.bias.detach()
    state["over_arch.model.1.weight"], state["over_arch.model.1.bias"] = weights[-1].contiguous(), top[-1].bias.detach()
    torch.save(state, folder / FILE)
    quantized = any(k.startswith("int8") for k in stored.values())
    widths = {name: state[f"{BAGS}.{name}.weight"] for name in model.tables}
    ambiguous = {stored[n].split()[0] for n, w in widths.items() if w.dtype == torch.uint8
                 and len(tbe_rows.formats_of(int(w.shape[1]), model.hparams["emb_dim"])) > 1}
    if len(ambiguous) > 1:
        raise UserError("int8 and int4 tables of this width have rows of the same bytes, and a reader can be told "
                        "only one type", "export them with one of the two, or with --materialize")
    written = {n: state[f"{BAGS}.{n}.weight"].numel() * state[f"{BAGS}.{n}.weight"].element_size() for n in stored}
    out = {"file": FILE, "layout": "torchrec.models.dlrm.DLRM state dict", "tables_stored": stored,
           "exported_table_bytes": written,
           "table_order": list(model.tables), "artifact_is_checkpoint": True,
           "hp": {"quantized_rows": ambiguous.pop()} if ambiguous else {},
           "parity_runtime": "recompress's reader of TorchRec state dicts"}
    if quantized:
        out["tolerance"] = INT8_TOLERANCE
    return out
