"""What the DLRM-format adapters share: upstream tables (plain, QR, mixed-dimension) and MLP weights ->
a :class:`Found` whose hyper-parameters all come from shapes, except QR's operation where shapes cannot
tell mult from add."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from recompress.checkpoint import Checkpoint, refresh_tables
from recompress.errors import UserError
from recompress.models.dlrm import DLRM, default_hparams
from recompress.spec import ModelSpec
from recompress.tables import DenseTable, FactorizedTable, Table
from recompress.tables.hashed import QRTable

from .found import Found, FoundTable
from .stored import as_float32, check, rows_of, unshared

Linear = tuple[Tensor, Tensor]  # (weight [out, in], bias [out])


@dataclass
class UpTable:
    """One upstream table: ``dense`` {weight}, ``qr`` {q, r} (rows of id // c and id % c), ``md``
    {embs [rows, k], proj [dim, k]} (dlrm's mixed-dimension table: rows of width k projected to dim), or
    ``int8``/``int4`` {data, scale, bias} (quantized rows, e.g. TorchRec's fused TBE rows unpacked)."""

    name: str
    kind: str
    tensors: dict[str, Tensor]
    parts: tuple[str, ...]
    dim: int | None = None  # quantized rows: the width they decode to

    @property
    def rows(self) -> int:
        if self.kind == "qr":  # dlrm keeps ceil(n / c) quotient rows: n itself is not stored
            return self.tensors["q"].shape[0] * self.tensors["r"].shape[0]
        return self.tensors[{"md": "embs", "int8": "data", "int4": "data"}.get(self.kind, "weight")].shape[0]

    def out_dim(self, concat: bool) -> int:
        if self.kind == "qr":
            return self.tensors["q"].shape[1] * (2 if concat else 1)
        if self.kind in ("int8", "int4"):
            return int(self.dim)
        return self.tensors["proj" if self.kind == "md" else "weight"].shape[0 if self.kind == "md" else 1]

    def found(self, concat: bool) -> FoundTable:
        t = next(iter(self.tensors.values()))
        nbytes = sum(v.numel() * v.element_size() for v in self.tensors.values())
        kind = {"dense": "dense", "qr": "qr", "md": "factorized", "int8": "dense+int8", "int4": "dense+int4"}[self.kind]
        return FoundTable(self.name, self.rows, self.out_dim(concat), str(t.dtype).removeprefix("torch."), nbytes,
                          kind, parts=self.parts, stored=rows_of(t) if self.kind == "dense" else None)


def dlrm_found(fmt: str, tables: list[UpTable], bottom: list[Linear], top: list[Linear], *, where: str,
               pad: int | None = None, top_columns: list[int] | None = None) -> Found:
    """Tables and MLP layers of a DLRM; ``pad``: zero columns after the interaction (NVIDIA's padded dot),
    found from the top MLP's input width when None; ``top_columns``: the top MLP's first-layer columns in
    recompress's order, taken at build time (describing reads shapes only)."""
    if not tables or not bottom or not top:
        raise UserError(f"{where}: no embedding tables or MLP layers found", "is this a DLRM checkpoint?")
    dim = int(bottom[-1][0].shape[0])
    qr = [t for t in tables if t.kind == "qr"]
    concat = bool(qr) and all(t.tensors["q"].shape[1] * 2 == dim for t in qr)
    for t in tables:
        if t.rows < 1:
            raise UserError(f"{where}: table {t.name} has no rows", "a table needs at least one row; drop it from the "
                            "checkpoint, or train it with its vocabulary")
        if t.out_dim(concat) != dim:
            raise UserError(f"{where}: table {t.name} gives rows of width {t.out_dim(concat)}, but the bottom MLP "
                            f"ends at {dim}", "the checkpoint is inconsistent (or uses an interaction recompress "
                            "does not support)")
    f = len(tables) + 1
    got = int(top[0][0].shape[1])
    widths = {False: dim + f * (f - 1) // 2, True: dim + f * (f + 1) // 2}
    itself = next((k for k, w in widths.items() if got - (pad or 0) == w), None)
    if itself is None and pad is None:
        itself = next((k for k, w in widths.items() if 0 <= got - w < 8), None)
    if itself is None:
        raise UserError(f"{where}: top MLP input width {got} matches no dot interaction of {len(tables)} tables "
                        f"at width {dim} (dot: {widths[False]}, dot with itself: {widths[True]})",
                        "only the 'dot' interaction is supported ('cat' is not)")
    found = Found(fmt, "dlrm", [t.found(concat) for t in tables], build=lambda hp: _build(hp, tables, bottom, _reordered(top, top_columns), where))
    found.set("num_dense", int(bottom[0][0].shape[1]), "shapes")
    found.set("emb_dim", dim, "shapes")
    found.set("bottom", [int(w.shape[0]) for w, _ in bottom], "shapes")
    found.set("top", [int(w.shape[0]) for w, _ in top], "shapes")
    found.set("interaction_itself", itself, "shapes")
    found.set("interaction_pad", got - widths[itself], "shapes" if pad is None else "checkpoint")
    if concat:
        found.set("qr_operation", "concat", "shapes")
    elif qr:
        found.need("qr_operation", ("mult", "add"), "dlrm keeps --qr-operation only on its command line; "
                   "shapes cannot tell mult from add")
    if qr:
        found.notes.append(f"QR tables ({', '.join(t.name for t in qr)}): rows = quotient rows x collisions, an upper "
                           "bound (dlrm stores ceil(n / c) quotient rows, not n)")
    return found


def _reordered(top: list[Linear], columns: list[int] | None) -> list[Linear]:
    return top if columns is None else [(top[0][0][:, columns], top[0][1]), *top[1:]]


def _build(hp: dict[str, Any], up: list[UpTable], bottom: list[Linear], top: list[Linear], where: str) -> Checkpoint:
    for t in up:
        for name, tensor in t.tensors.items():
            check(f"{t.name}.{name}", tensor, where)
    for i, (w, b) in enumerate(bottom + top):
        check(f"mlp layer {i} weight", w, where)
        check(f"mlp layer {i} bias", b, where)
    dim = hp["emb_dim"]
    tables: dict[str, Table] = {}
    states: dict[str, dict[str, Tensor]] = {}  # per table built as shapes only: the tensors it will hold
    for t in up:
        if t.kind in ("int8", "int4"):
            table = DenseTable(t.rows, dim)
            table.quantize(t.kind, fill=False)
            store = table.stores["weight"]
            store.data[:, :t.tensors["data"].shape[1]] = t.tensors["data"]
            store.scale.copy_(t.tensors["scale"])
            store.bias.copy_(t.tensors["bias"])
            tables[t.name] = table
            continue
        x = {k: as_float32(f"{t.name}.{k}", v, where) for k, v in t.tensors.items()}
        with torch.device("meta"):  # shapes only: the table holds the tensors read (a big one mapped), not a copy
            if t.kind == "dense":
                table, state = DenseTable(t.rows, dim), {"weight": x["weight"]}
            elif t.kind == "md":
                table = FactorizedTable(t.rows, dim, x["embs"].shape[1])
                state = {"left": x["embs"], "right": x["proj"].T.contiguous()}
            else:
                table, state = QRTable(t.rows, dim, x["r"].shape[0], hp["qr_operation"]), {"q": x["q"], "r": x["r"]}
        tables[t.name], states[t.name] = table, state
    own = unshared({f"{n}.{k}": v for n, state in states.items() for k, v in state.items()})
    for n, state in states.items():
        tables[n].load_state_dict({k: own[f"{n}.{k}"] for k in state}, assign=True)
    params = default_hparams(hp["num_dense"], dim, hp["bottom"], hp["top"])
    params.update(interaction_itself=hp["interaction_itself"], interaction_pad=hp["interaction_pad"])
    model = DLRM(params, tables)
    linears = [m for m in [*model.bottom, *model.top] if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for lin, (w, b) in zip(linears, bottom + top):
            if tuple(w.shape) != tuple(lin.weight.shape):
                raise UserError(f"{where}: layer shape {list(w.shape)} breaks the MLP chain", "the checkpoint is inconsistent")
            lin.weight.copy_(w)
            lin.bias.copy_(b)
    spec = ModelSpec(family="dlrm", hparams=params, tables=[])
    refresh_tables(model, spec)
    return Checkpoint(model.eval(), spec)
