"""Plain tables sharded across ranks by TorchRec, for ``--shard-tables table-wise|column-wise`` under torchrun.

Every plain (dense) table of a model whose family looks its tables up as pooled bags, one per feature
(``Family.route_lookup``), becomes a table of one TorchRec ``EmbeddingBagCollection``, sharded by
``torchrec.distributed.shard`` with a plan from TorchRec's ``construct_module_sharding_plan``:

- table-wise: each table whole on one rank, placed largest first on the rank holding the fewest bytes;
- column-wise: each table cut into column blocks, one per rank (a multiple of 4 wide, as FBGEMM's kernels need).

Ranks exchange ids and pooled rows by all-to-all, and the table rows are updated inside the backward pass by
FBGEMM's fused optimizer: ``EXACT_SGD``, ``EXACT_ADAGRAD`` or ``EXACT_ROWWISE_ADAGRAD``, the updates the
unsharded path makes with ``--optimizer sgd|adagrad|rowwise-adagrad`` (FBGEMM's CPU kernels have no Adam). A
rank holds its shards and their optimizer state, never a whole table. Column-wise with row-wise Adagrad keeps
one accumulator per row of each column block (TorchRec's behaviour), so it is not the unsharded update.
Tables of other kinds stay replicated and train as before.

``gather`` sends every shard to rank 0 in 16 MB row blocks, and rank 0 puts the whole tables back into its
model, which is then an ordinary model again (rank 0 writes the checkpoint). A table of 16 MB or more is
gathered into the pages of an unlinked file in the temporary folder (``TMPDIR``; ``blockfile.Scratch``), so
that rank 0 does not hold its shards and every whole table in its own memory at once. On the other ranks those tables
stay on the meta device (shapes, no values): a later sharded run in the same command loads them from rank 0.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from . import distributed
from .blockfile import Scratch
from .errors import UserError
from .models.family import Family
from .tables import DenseTable, pool
from .trainconfig import TrainConfig

FUSED = {"sgd": ("EXACT_SGD", {}), "adagrad": ("EXACT_ADAGRAD", {"eps": 1e-10}),  # torch.optim.Adagrad's eps
         "rowwise-adagrad": ("EXACT_ROWWISE_ADAGRAD", {"eps": 1e-8})}  # recompress.rowwise_adagrad's
COLUMN_UNIT = 4  # FBGEMM's kernels need every shard's width to be a multiple of this


def feature(names: list[str], name: str) -> str:
    """The collection's feature key of table ``name`` (its position among the model's tables)."""
    return f"f{names.index(name)}"


class ShardedLookup:
    """``[B, T, L]`` ids (-1 padding) -> ``[B, T, d]`` bag sums: the sharded tables through TorchRec's collection
    (a collective: every rank calls it once per batch, with its own rows), the others through their own lookup."""

    def __init__(self, tables: nn.ModuleDict, sharded: list[str], collection: nn.Module) -> None:
        self.tables, self.collection = tables, collection
        names = list(tables)
        self.index = torch.tensor([names.index(n) for n in sharded], dtype=torch.int64)
        self.keys = {n: feature(names, n) for n in sharded}

    def __call__(self, sparse: Tensor) -> Tensor:
        ids = sparse.index_select(1, self.index).transpose(0, 1)  # [S, B, L], a feature's bags together
        present = ids >= 0
        from torchrec import KeyedJaggedTensor
        kjt = KeyedJaggedTensor(keys=list(self.keys.values()), values=ids[present],
                                lengths=present.sum(-1).reshape(-1))
        out = distributed.collective(lambda: self.collection(kjt))
        pooled = distributed.collective(lambda: out.wait() if hasattr(out, "wait") else out).to_dict()
        plain = sparse.clamp(min=0)
        return torch.stack([pooled[self.keys[n]] if n in self.keys else pool(t.lookup(plain[:, i]), sparse[:, i])
                            for i, (n, t) in enumerate(self.tables.items())], dim=1)


class ShardedTables:
    """The model's plain tables sharded across the ranks for the length of a training run (see the module)."""

    def __init__(self, model: nn.Module, family: Family, cfg: TrainConfig) -> None:
        self.model, self.family = model, family
        self.names = [n for n, t in model.tables.items() if type(t) is DenseTable and not t.quant]  # float rows
        if not self.names:
            raise UserError("--shard-tables shards plain tables, and this model has none (its tables are "
                            f"{', '.join(sorted({t.kind for t in model.tables.values()}))})",
                            "drop --shard-tables: compressed tables are small and stay replicated")
        narrow = [f"{n} ({model.tables[n].dim})" for n in self.names if model.tables[n].dim % COLUMN_UNIT]
        if narrow:
            raise UserError(f"TorchRec's kernels need table widths that are multiples of {COLUMN_UNIT}: "
                            f"{', '.join(narrow)}", "drop --shard-tables for this model")
        family.route_lookup(model, None)  # refuses families that cannot route their lookups
        from torchrec.distributed import comm_ops
        self.division = comm_ops.get_gradient_division()  # TorchRec divides table gradients by the ranks, as DDP
        comm_ops.set_gradient_division(False)  # averages; here each rank's loss is already weighted by its share
        with _quiet():                         # (set back by ``gather``)
            self.collection = self._shard(cfg)
        self.local: dict[tuple[str, int, int], Tensor] = {}  # (table, first row, first column) -> this rank's shard
        self.shards: dict[str, list[tuple[int, int, int, int, int]]] = {}  # table -> (rank, row, column, rows, columns)
        for key, st in self.collection.state_dict().items():
            name = self.names[int(key.split(".")[-2][1:])]  # embedding_bags.t{i}.weight
            self.local.update({(name, *s.metadata.shard_offsets): s.tensor for s in st.local_shards()})
            self.shards[name] = [(m.placement.rank(), *m.shard_offsets, *m.shard_sizes)
                                 for m in st.metadata().shards_metadata]
        self._load()
        family.route_lookup(model, ShardedLookup(model.tables, self.names, self.collection))

    def _shard(self, cfg: TrainConfig) -> nn.Module:
        import torch.distributed as dist
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.shard import shard
        from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, table_wise
        from torchrec.distributed.types import ShardingEnv
        tables = {n: self.model.tables[n] for n in self.names}
        configs = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=t.dim, num_embeddings=t.rows,
                                      feature_names=[feature(list(self.model.tables), n)])
                   for i, (n, t) in enumerate(tables.items())]
        collection = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
        kind, extra = FUSED[cfg.optimizer]
        sharder = EmbeddingBagCollectionSharder(fused_params={"optimizer": getattr(EmbOptimType, kind),
                                                              "learning_rate": cfg.lr, **extra})
        ranks = distributed.size()
        if cfg.shard == "table-wise":
            placed = _table_wise({f"t{i}": t.rows * t.dim for i, t in enumerate(tables.values())}, ranks)
            per = {k: table_wise(rank=r, compute_kernel="fused") for k, r in placed.items()}
        else:
            per = {f"t{i}": column_wise(size_per_rank=_column_wise(t.dim, ranks), compute_kernel="fused")
                   for i, t in enumerate(tables.values())}
        plan = construct_module_sharding_plan(collection, per, sharder=sharder, local_size=ranks, world_size=ranks,
                                              device_type="cpu")
        env = ShardingEnv.from_process_group(dist.GroupMember.WORLD)
        return distributed.collective(lambda: shard(collection, plan=plan, env=env, device=torch.device("cpu"),
                                                     sharder=sharder))

    def _load(self) -> None:
        """Each shard's rows from the model's table: the rank's own copy where every rank holds the same table
        (``distributed.differing``), else sent by rank 0; a table trained from scratch is drawn by each rank
        in row blocks, keeping its shards' part (``DenseTable.initial_rows``): no rank holds it whole."""
        weights = [self.model.tables[n].weight for n in self.names]
        send = distributed.differing(weights)
        me = distributed.rank()
        with torch.no_grad():
            for name, weight, from_zero in zip(self.names, weights, send):
                if weight.is_meta and not from_zero:
                    self._draw(name)
                    continue
                for owner, r, c, nr, nc in self.shards[name]:
                    target = self.local[name, r, c] if me == owner else None
                    if from_zero:
                        distributed.move_rows(weight[r:r + nr, c:c + nc] if me == 0 else None, target, 0, owner)
                    elif target is not None:
                        target.copy_(weight[r:r + nr, c:c + nc])
        self.dtypes = {n: self.model.tables[n].weight.dtype for n in self.names}
        for name in self.names:  # the model keeps an empty table (its own is freed, unless a file holds it)
            table = self.model.tables[name]
            table.weight = nn.Parameter(torch.empty(0, table.dim, dtype=table.weight.dtype), requires_grad=False)

    def _draw(self, name: str) -> None:
        mine = [(r, c, nr, nc) for owner, r, c, nr, nc in self.shards[name] if owner == distributed.rank()]
        if not mine:  # drawing is sequential: a rank with no part of the table skips it
            return
        for start, block in self.model.tables[name].initial_rows():
            for r, c, nr, nc in mine:
                lo, hi = max(start, r), min(start + len(block), r + nr)
                if lo < hi:
                    self.local[name, r, c][lo - r:hi - r].copy_(block[lo - start:hi - start, c:c + nc])

    def gather(self) -> None:
        """Every table whole back into rank 0's model; the lookups go back to the model's own tables."""
        me = distributed.rank()
        for name in self.names:
            table = self.model.tables[name]
            scratch = Scratch.temporary(f"table {name}", "which rank 0 gathers there from the shards, to write "
                                        "the checkpoint")
            whole = scratch.empty((table.rows, table.dim), self.dtypes[name]) if me == 0 else \
                torch.empty(table.rows, table.dim, dtype=self.dtypes[name], device="meta")
            with torch.no_grad():
                for owner, r, c, nr, nc in self.shards[name]:
                    distributed.move_rows(self.local[name, r, c] if me == owner else None,
                                          whole[r:r + nr, c:c + nc] if me == 0 else None, owner, 0)
            table.weight = nn.Parameter(whole)
        self.family.route_lookup(self.model, None)
        self.local.clear()
        del self.collection
        from torchrec.distributed import comm_ops
        comm_ops.set_gradient_division(self.division)


def _table_wise(sizes: dict[str, int], ranks: int) -> dict[str, int]:
    """Largest table first, each on the rank holding the fewest values so far (ties: the lowest rank)."""
    load = [0] * ranks
    placed = {}
    for key in sorted(sizes, key=lambda k: -sizes[k]):
        r = load.index(min(load))
        placed[key] = r
        load[r] += sizes[key]
    return placed


def _column_wise(dim: int, ranks: int) -> list[int]:
    """Column block widths, multiples of COLUMN_UNIT as even as they go, over at most ``ranks`` ranks."""
    units = dim // COLUMN_UNIT
    used = min(ranks, units)
    return [COLUMN_UNIT * (units // used + (k < units % used)) for k in range(used)]


@contextmanager
def _quiet() -> Iterator[None]:
    """TorchRec's and torch's advice printed while sharding (topology, fx tracing) is not for our users."""
    torchrec = logging.getLogger("torchrec")
    level = torchrec.level
    torchrec.setLevel(logging.ERROR)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # is_fx_tracing's advice, once per process
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torchrec.setLevel(level)
