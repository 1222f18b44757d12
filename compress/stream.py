"""Data-free compression that never loads a dense table: its rows are read from the checkpoint file in
blocks and the compressed table is written in blocks, so peak memory does not grow with the table.

Used when every method of the composition declares ``stream`` (the row-wise formats, TT-SVD, lowrank, hash
and qr) and nothing trains, for a native checkpoint and for upstream files whose plain tables are stored
row by row (torch files, per-rank shard files, DCP folders: ``adapters.load_streamed``). The source is a
model whose plain tables are on the meta device (never allocated), every other tensor loaded and checked,
with a :class:`~recompress.blockfile.Rows` reader of each such table. For each step the method's ``stream``
gets those readers; it returns the new tables, in memory when they are small (TT cores, hashed and QR rows,
a low-rank table's right factor) or empty on the meta device with a block generator (quantized rows, a
low-rank table's left factor). The new weights file is laid out from the model's state dict and filled from
those generators, from the untouched tables' rows in the source, and from tensors in memory. A composition
runs step by step through intermediate checkpoints inside the staged output folder."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from recompress.blockfile import FileRows, Rows, TensorWriter
from recompress.checkpoint import (
    SPEC_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    model_shell,
    open_weights,
    read_spec,
    read_tensor,
    refresh_tables,
)
from recompress.outputs import output_dir
from recompress.progress import progress

from .registry import Context, Step, check_step

COPY_BLOCK_BYTES = 1 << 24


def streams(steps: list[Step], ctx: Context) -> bool:
    """Whether ``steps`` can run streamed: every method streams, none trains, no data is needed."""
    return ctx.data is None and all(s.method.stream is not None and not s.method.trains(s.own_params()) for s in steps)


Source = tuple[Checkpoint, dict[str, Rows]]  # a model whose plain tables may be on the meta device; their rows


def native_source(src: Path) -> Source:
    """The native checkpoint at ``src`` with its dense tables' weights left in the file (on the meta device:
    no memory, not even virtual, so a table larger than RAM streams too), each read by row blocks."""
    spec, weights = read_spec(src)
    model = model_shell(spec)
    expected = model.state_dict()
    f = open_weights(weights, expected)
    in_file = _table_keys(model, [n for n, t in model.tables.items() if t.kind == "dense" and not t.stores])
    state = {k: read_tensor(f, k, expected[k]) for k in f.keys() if k not in in_file.values()}
    model.load_state_dict(state, strict=False, assign=True)  # the dense tables stay shapes only
    return Checkpoint(model.eval(), spec, src), {name: FileRows(f, key) for name, key in in_file.items()}


def _table_keys(model: torch.nn.Module, names: list[str]) -> dict[str, str]:
    """The state-dict key of each named dense table's weight."""
    where = {id(m): p for p, m in model.named_modules()}
    return {name: f"{where[id(model.tables[name])]}.weight" for name in names}


def _step(source: Source, step: Step, ctx: Context, dst: Path, provenance: dict[str, Any], label: str) -> Checkpoint:
    ckpt, sources = source
    model = ckpt.model
    untouched = dict(model.tables.items())
    in_file = _table_keys(model, list(sources))
    ckpt, blocks = step.method.stream(ckpt, step.own_params(), check_step(step, ckpt, ctx), sources)
    refresh_tables(model, ckpt.spec)
    state = model.state_dict()
    layout = {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}
    where = {id(m): p for p, m in model.named_modules()}
    done: set[str] = set()
    total = sum(v.numel() * v.element_size() for v in state.values())
    with progress(f"writing {label}", total) as advance, \
            TensorWriter(dst / WEIGHTS_FILE, layout, {"format": "recompress"}) as out:
        def put(key: str, start: int, t: torch.Tensor) -> None:
            out.write(key, start, t.to(layout[key][0]))
            done.add(key)
            advance(t.numel() * t.element_size())
        for name, gen in blocks.items():
            prefix = where[id(model.tables[name])]
            for key, start, t in gen():
                put(f"{prefix}.{key}", start, t)
        for name, key in in_file.items():
            if model.tables[name] is untouched[name]:  # not compressed by this step: copy its rows
                rows = sources[name]
                step_rows = max(1, COPY_BLOCK_BYTES // max(1, rows.shape[1] * 4))
                for s in range(0, rows.shape[0], step_rows):
                    put(key, s, rows[s:s + step_rows])
        for key, t in state.items():
            if key not in done:
                put(key, 0, t)
        for rows in sources.values():  # before the output is kept: the source's checksums, where it has them
            rows.verify()
    for k, v in provenance.items():
        ckpt.spec.provenance.setdefault(k, v)
    (dst / SPEC_FILE).write_text(ckpt.spec.to_json() + "\n")
    return ckpt


def stream_compress(source: Source, steps: list[Step], ctx: Context, out: str | Path, *, overwrite: bool = False,
                    inputs: tuple[Any, ...] = (), provenance: dict[str, Any] | None = None) -> tuple[Checkpoint, int]:
    """Apply ``steps`` streamed from ``source`` (``native_source``, or ``adapters.load_streamed`` for an
    upstream file) into the folder ``out`` (atomic), with ``provenance`` entries added to the spec where it
    has none of that name. Returns the written checkpoint (its compressed tables on the meta device when
    written in blocks) and the source's embedding bytes."""
    before = sum(t.stored_bytes() for t in source[0].model.tables.values())
    with output_dir(out, kind="checkpoint", overwrite=overwrite, inputs=inputs) as tmp:
        previous: Path | None = None
        for i, step in enumerate(steps):
            dst = tmp if i == len(steps) - 1 else tmp / f".step{i}"
            dst.mkdir(exist_ok=True)
            label = Path(out).name + (f" (step {i + 1} of {len(steps)})" if len(steps) > 1 else "")
            ckpt = _step(source, step, ctx, dst, provenance or {}, label)
            if previous is not None:  # an intermediate checkpoint this command wrote inside its staged folder
                shutil.rmtree(previous)
            if dst != tmp:
                source, previous = native_source(dst), dst
    return ckpt, before
