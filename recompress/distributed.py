"""Data-parallel training over torch.distributed, for ``torchrun --nproc-per-node N -m recompress train|checkpoint``.

Every rank holds the whole model (tables replicated, unless ``--shard-tables`` hands the plain ones to
TorchRec: ``recompress.sharding``) and reads only its part of each global batch (``Family.batches(shard=...)``). After each backward pass the ranks sum their gradients:
dense gradients in one all-reduce per dtype (DDP's bucket, without its overlap), the row gradients of
sparse tables by all-gathering their (row, value) pairs, because an all-reduce of a sparse tensor is not
portable across backends and DDP cannot reduce gradients for SparseAdam. DDP itself is not used because it
reduces only when the loss goes through its wrapper's ``forward``, and family losses call other entry
points (e.g. ``train_logits``). Each rank's loss is weighted by its share of the global batch's loss terms
(``Family.loss_units``), so N ranks compute the gradient of exactly the loss one process computes on the
whole global batch. Validation runs on rank 0 and its metrics are broadcast (with sharded tables every rank
scores its part of each batch: ``split_predict``); only rank 0 writes.

The rank is read from torchrun's environment (``RANK``/``WORLD_SIZE``), so this module imports no torch
until a process group is joined. Training tensors live on the CPU, so the backend is gloo.
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from .errors import UserError

T = TypeVar("T")
_joined = False  # whether this process joined a process group (see exit_process)
TIMEOUT = datetime.timedelta(minutes=30)  # a rank waits this long for a slow peer (e.g. rank 0 validating)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM (torchrun stopping the other ranks when one fails, or anyone stopping a run): unwind once, as
    Ctrl-C does, so that staged output is removed; keep nothing."""
    stopping()
    raise KeyboardInterrupt


def stopping() -> None:
    """This process is on its way out: a further SIGTERM may no longer interrupt its clean-up (removing staged
    output) or print a traceback while it exits."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def join(command: str, allowed: Sequence[str]) -> None:
    """Join the process group torchrun set up for ``command`` (in one process: only SIGTERM is taken over)."""
    if size() <= 1:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminated)
        return
    if command not in allowed:
        raise UserError(f"'recompress {command}' does not run on several processes (WORLD_SIZE={size()})",
                        f"run it in one process; under torchrun only {' and '.join(allowed)} are distributed")
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=TIMEOUT)
    global _joined
    _joined = True
    signal.signal(signal.SIGTERM, _terminated)


def leave() -> None:
    """End a run that succeeded on every rank: wait for the others (rank 0 may still be writing), then
    close the process group, so that no rank exits while gloo's threads still talk to its peers (which
    aborts the process: "terminate called without an active exception")."""
    if size() <= 1:
        return
    import torch.distributed as dist
    if dist.is_initialized():
        collective(dist.barrier)
        dist.destroy_process_group()


def finished() -> None:
    """Wait until every rank has done its part of the run, so that rank 0 writes only a run every rank
    completed (a rank that failed makes this one clear error on the others, and nothing is written)."""
    if size() <= 1:
        return
    import torch.distributed as dist
    collective(dist.barrier)


def exit_process(code: Any) -> None:
    """Under torchrun, end this rank's process now with ``code`` (SystemExit's), its output flushed and
    written files closed, skipping the interpreter's finalization: gloo's threads can still hold tensors
    then, and destroying them aborts the process ("terminate called without an active exception",
    pytorch/pytorch#190489) even after the process group was closed. No-op unless this process joined one."""
    if not _joined:
        return
    import sys
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


def lost_peer(e: RuntimeError) -> bool:
    """Whether a collective failed because a peer is gone or silent: torch's DistError family, or gloo's
    transport (plain RuntimeErrors from ``gloo/transport``: "Connection closed by peer", "Timed out waiting"),
    not because of the computation it ran (a sharded lookup, a backward pass)."""
    import torch.distributed as dist
    return isinstance(e, dist.DistError) or "gloo/transport/" in str(e)


def collective(fn: Callable[[], T]) -> T:
    """Run one collective; a peer that died (or timed out) becomes one clear error on every surviving rank (any
    other error is raised as it is: this rank's own failure)."""
    try:
        return fn()
    except RuntimeError as e:
        if not lost_peer(e):
            raise
        first = (str(e).strip().splitlines() or ["?"])[0]
        first = first.split("] ", 1)[-1].split(". ")[0][:160]  # gloo: "[file:line] Read error ...: Connection reset"
        stopping()
        raise UserError(f"rank {rank()} of {size()} lost contact with another rank ({first})",
                        "that rank's own log names its failure; nothing was written") from None


Part = tuple[int, int]  # (this rank, number of ranks)


def part() -> Part:
    return rank(), size()


def shard(n: int, part: Part) -> slice:
    """Rank ``part[0]``'s rows of a global batch of ``n`` rows, of ``part[1]`` ranks (np.array_split's split)."""
    k, ranks = part
    q, r = divmod(n, ranks)
    start = k * q + min(k, r)
    return slice(start, start + q + (k < r))


def sum_scalars(values: Sequence[float]) -> list[float]:
    """The element-wise sum of ``values`` over the ranks (float64)."""
    if size() <= 1:
        return list(values)
    import torch
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64)
    collective(lambda: dist.all_reduce(t))
    return t.tolist()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (a small picklable value, sent within this job's own process group)."""
    if size() <= 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    collective(lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def broadcast_module(module: Any) -> None:
    """Copy rank 0's parameters and buffers into ``module`` on every rank (so all ranks start equal), except
    those every rank already holds bit for bit (``differing``): receiving a table writes every page of it,
    which makes a mapped checkpoint's table a private copy on each rank."""
    if size() <= 1:
        return
    import torch
    import torch.distributed as dist
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.dtype != torch.bool]  # masks come from
    for t, send in zip(tensors, differing(tensors)):                                            # shapes; gloo
        if send:                                                                                # sends no bool
            collective(lambda t=t: dist.broadcast(t.data, src=0))


def differing(tensors: Sequence[Any]) -> list[bool]:
    """For each of ``tensors`` (the same list on every rank), whether some rank holds other bytes than rank 0
    (all loaded the same checkpoint, or initialized it with the same seed, hold the same), by a SHA-256 of each
    tensor gathered from every rank; the same answer on every rank."""
    if size() <= 1:
        return [False] * len(tensors)
    import torch
    import torch.distributed as dist
    digests = torch.tensor([_digest(t) for t in tensors], dtype=torch.int64).reshape(-1, 4)
    every = [torch.empty_like(digests) for _ in range(size())]
    collective(lambda: dist.all_gather(every, digests))
    return torch.stack(every).ne(every[0]).any(2).any(0).tolist()


def move_rows(source: Any, target: Any, src: int, dst: int) -> None:
    """Copy rank ``src``'s 2-D tensor ``source`` into rank ``dst``'s ``target`` (the same shape, any float
    dtypes; sent as float32, 16 MB of rows at a time); every rank calls it, the others with None."""
    me = rank()
    if me not in (src, dst):
        return
    if src == dst:
        target.copy_(source)
        return
    import torch
    import torch.distributed as dist

    from .blockfile import CHECK_BYTES
    shape = (source if me == src else target).shape
    step = max(1, CHECK_BYTES // max(1, 4 * shape[1]))
    for start in range(0, shape[0], step):
        if me == src:
            block = source[start:start + step].to(torch.float32).contiguous()
            collective(lambda: dist.send(block, dst))
        else:
            buffer = torch.empty(min(step, shape[0] - start), shape[1], dtype=torch.float32)
            collective(lambda: dist.recv(buffer, src))
            target[start:start + step].copy_(buffer)


def gather_rows(local: Any) -> Any:
    """Every rank's numpy array (any number of rows, the same trailing shape and dtype), joined in rank order,
    on every rank."""
    if size() <= 1:
        return local
    import numpy as np
    import torch
    import torch.distributed as dist
    mine = torch.from_numpy(np.ascontiguousarray(local))
    counts = torch.tensor([len(mine)], dtype=torch.int64)
    every = [torch.empty_like(counts) for _ in range(size())]
    collective(lambda: dist.all_gather(every, counts))
    width = int(np.prod(mine.shape[1:]))
    pieces = _gathered(mine.reshape(-1), every, [width])
    return torch.cat([p[0] for p in pieces]).reshape(-1, *mine.shape[1:]).numpy()


def split_predict(predict: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    """``predict`` run on this rank's rows of every batch (inputs batch-first), with every rank's outputs joined
    in batch order on every rank: how a model whose forward pass is itself collective (sharded tables) scores,
    every rank calling it on the same batches."""
    def run(inputs: dict[str, Any]) -> Any:
        rows = shard(len(next(iter(inputs.values()))), part())
        return gather_rows(predict({k: v[rows] for k, v in inputs.items()}))
    return run


def _digest(t: Any) -> list[int]:
    """SHA-256 of a tensor's bytes (and its dtype and shape), as four int64 words."""
    import hashlib

    import torch

    from .blockfile import row_blocks
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}{' meta' if t.is_meta else ''}".encode())
    if not t.is_meta:  # meta: no values (a sharded table on a rank other than 0), unlike any real tensor
        for _, block in row_blocks(t.detach().contiguous().reshape(-1)):  # 16 MB at a time, from its own memory
            h.update(memoryview(block.view(torch.uint8).numpy()))
    return [int.from_bytes(h.digest()[i:i + 8], "little", signed=True) for i in range(0, 32, 8)]


def sum_gradients(dense: Sequence[Any], sparse: Sequence[Any]) -> None:
    """Sum ``.grad`` of every parameter over the ranks, in place. ``sparse``: parameters whose gradients are
    sparse row gradients (embedding rows). A parameter keeps ``grad = None`` only if it has none on every
    rank, as in one process (an optimizer then leaves it, and its state, alone)."""
    if size() <= 1:
        return
    import torch
    import torch.distributed as dist
    params = [*dense, *sparse]
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int64)
    collective(lambda: dist.all_reduce(has))
    for group in _by_dtype(dense):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
        collective(lambda flat=flat: dist.all_reduce(flat))
        for p, g in zip(group, flat.split([p.numel() for p in group])):
            p.grad = g.view_as(p)
    if sparse:
        _gather_rows(list(sparse))
    for p, n in zip(params, has.tolist()):
        if n == 0:
            p.grad = None


def _by_dtype(params: Sequence[Any]) -> Iterator[list[Any]]:
    groups: dict[Any, list[Any]] = {}
    for p in params:
        groups.setdefault(p.dtype, []).append(p)
    yield from groups.values()


def _gather_rows(params: list[Any]) -> None:
    """All-gather every rank's (row, value) pairs of each sparse gradient; the sum is the coalesced union."""
    import torch
    import torch.distributed as dist
    local = [p.grad.coalesce() if p.grad is not None else None for p in params]
    rows = [g.indices()[0] if g is not None else torch.zeros(0, dtype=torch.int64) for g in local]
    vals = [g.values().reshape(-1) if g is not None else torch.zeros(0, dtype=p.dtype) for g, p in zip(local, params)]
    counts = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    all_counts = [torch.zeros_like(counts) for _ in range(size())]
    collective(lambda: dist.all_gather(all_counts, counts))
    width = [int(torch.tensor(p.shape[1:]).prod()) for p in params]
    flat_rows = _gathered(torch.cat(rows), all_counts, [1] * len(params))
    flat_vals = _gathered(torch.cat(vals), all_counts, width)
    for i, p in enumerate(params):
        idx = torch.cat([r[i] for r in flat_rows])
        val = torch.cat([v[i] for v in flat_vals]).reshape(-1, *p.shape[1:])
        p.grad = torch.sparse_coo_tensor(idx.unsqueeze(0), val, p.shape, check_invariants=True).coalesce()


def _gathered(local: Any, all_counts: list[Any], width: list[int]) -> list[list[Any]]:
    """All-gather ``local`` (this rank's pieces, piece i holding counts[i] x width[i] values, concatenated),
    padded to the longest rank; returns, per rank, its pieces."""
    import torch
    import torch.distributed as dist
    lengths = [int((c * torch.tensor(width)).sum()) for c in all_counts]
    longest = max(max(lengths), 1)  # gloo gathers no empty tensors
    padded = torch.cat([local, local.new_zeros(longest - len(local))])
    out = [torch.empty_like(padded) for _ in all_counts]
    collective(lambda: dist.all_gather(out, padded))
    return [list(o[:n].split((c * torch.tensor(width)).tolist())) for o, n, c in zip(out, lengths, all_counts)]

