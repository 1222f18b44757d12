"""The model-family interface: the one place that knows a family's batch, loss, metrics, inputs and tables.

Training (``recompress.training``), evaluation (``recompress.evaluation``), compression, export, recipes and
the gate call these methods and never branch on a family's name. A family implements it next to its
``nn.Module`` and declares its name and hyper-parameters in ``recompress/families.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from recompress.errors import UserError
from recompress.families import FAMILIES, FamilyInfo
from recompress.spec import ModelSpec, TableSpec
from recompress.tables import Table, empty_table

Inputs = dict[str, np.ndarray]


class Family(ABC):
    """A stateless description of one model family.

    Declarations: ``metrics`` (the first is primary: reports and the gate use it), ``record`` (what an
    evaluation keeps per test row: ``scores`` or ``ranks``, see ``recompress.metrics``), ``protocols``
    (the first is the default), ``inputs`` (serving input name -> {axis: symbol}), ``output``,
    ``compressible`` (table roles a method touches unless tables are named), ``adam_betas``.
    """

    info: ClassVar[FamilyInfo]
    metrics: ClassVar[tuple[str, ...]]
    record: ClassVar[str]
    protocols: ClassVar[tuple[str, ...]]
    inputs: ClassVar[dict[str, dict[int, str]]]
    output: ClassVar[str]
    compressible: ClassVar[tuple[str, ...]] = ("sparse_feature", "item")
    adam_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)
    scorings: ClassVar[tuple[str, ...]] = ()  # serving graphs a family can write, the default first
    latency_batch_sizes: ClassVar[tuple[int, ...]] = (1, 64, 512)  # evaluate's default latency batches
    layouts: ClassVar[tuple[str, ...]] = ()  # serving input layouts it can export, the default first

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def primary(self) -> str:
        return self.metrics[0]

    def default_protocol(self, data: Any) -> str:
        """The protocol a dataset asks for (one whose layout stores its trainer's candidates: ``sampled``), else the
        family's first."""
        asked = getattr(data, "meta", {}).get("protocol")
        return asked if asked in self.protocols else self.protocols[0]

    def hparams(self, given: dict[str, Any]) -> dict[str, Any]:
        """The family's hyper-parameters: its declared defaults, overridden by ``given`` (None = default)."""
        params = {p.name: p for p in self.info.hparams}
        out = {p.name: p.default for p in params.values()}
        for k, v in given.items():
            if k in out and v is not None:
                if params[k].choices and v not in params[k].choices:
                    raise UserError(f"{k} = {v!r} is not a {self.name} choice",
                                    f"choose {params[k].flag} from {', '.join(params[k].choices)}")
                out[k] = v
        return out

    # --- model ---------------------------------------------------------------------------------------
    @abstractmethod
    def new_spec(self, data: Any, hparams: dict[str, Any]) -> ModelSpec:
        """A spec for a new model on ``data``: hyper-parameters, and tables (rows, dim, role) all dense."""

    @abstractmethod
    def build(self, spec: ModelSpec, tables: dict[str, Table]) -> nn.Module:
        """The model with every shape from ``spec`` and the given tables (weights loaded afterwards)."""

    def from_spec(self, spec: ModelSpec) -> nn.Module:
        return self.build(spec, {t.name: empty_table(t) for t in spec.tables})

    def init(self, model: nn.Module, seed: int) -> None:
        """Fresh weights for training from scratch: each table by its own rule, then the family's layers."""
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for t in model.tables.values():
                t.reset_parameters(gen)
            self.init_layers(model, gen)

    @abstractmethod
    def init_layers(self, model: nn.Module, gen: torch.Generator) -> None:
        """Initialize everything but the tables (the reference implementation's rule)."""

    def check_data(self, data: Any) -> None:
        if data.kind != self.info.data:
            raise UserError(f"a {self.name} model needs a {self.info.data} dataset, and {data.path} holds {data.kind}",
                            f"prepare one with 'recompress data {'criteo' if self.info.data == 'ctr' else 'sequences'}'")

    @abstractmethod
    def check(self, spec: ModelSpec, data: Any) -> None:
        """Raise UserError unless ``data`` fits a model of ``spec`` (dataset kind, features, id ranges)."""

    @staticmethod
    def check_vocabularies(spec: ModelSpec, data: Any) -> None:
        """Refuse a dataset whose table vocabularies differ from those the model was trained on, where both
        are known (``recompress.data.vocabularies``): same row counts, other values behind the ids."""
        theirs = data.meta.get("vocabularies") or {}
        for name, mine in (spec.vocab.get("vocabularies") or {}).items():
            if name in theirs and theirs[name] != mine:
                raise UserError(f"table {name!r}: the rows of the model's table stand for other values than the ids "
                                f"of {data.path} (vocabulary fingerprint {mine}, the dataset's {theirs[name]}): the same "
                                "sizes, other ids, so its scores here would mean nothing",
                                f"use the dataset the model was trained on ({spec.vocab.get('dataset', 'unknown')}), or "
                                "prepare the data again with the same file and options")

    def table_roles(self, spec: ModelSpec) -> dict[str, str]:
        return {t.name: t.role for t in spec.tables}

    def table_counts(self, spec: ModelSpec, data: Any) -> dict[str, np.ndarray]:
        """How often each id of each table occurs in the training data (frequency-aware methods use it)."""
        return {}

    def reduce_width(self, ckpt: Any, d: int, ctx: Any, make_table: Any = None) -> dict[str, Any]:
        """Cut the model's embedding width to ``d`` along a basis the family picks, selected tables becoming
        ``make_table(weight, basis)`` (post-training MLET); families that cannot, refuse."""
        raise UserError(f"post-training mlet --dim cuts the embedding width of every layer, which {self.name} does "
                        "not support", "use lowrank --rank for a post-training item-table factorization, or train "
                                       "in MLET's two-layer form from scratch (train --mlet-hidden K)")

    # --- training --------------------------------------------------------------------------------------
    def route_lookup(self, model: nn.Module, lookup: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """Send the model's table lookups through ``lookup`` (``[B, T, L]`` ids, -1 padding -> ``[B, T, d]`` bag
        sums, one table per feature in the model's order; not a submodule, so it stays out of ``parameters`` and
        ``state_dict``), or back to the model's own tables (None): how TorchRec's sharded tables take part
        (``recompress.sharding``). Families whose tables are not pooled one per feature refuse."""
        raise UserError(f"--shard-tables shards tables looked up as pooled bags, one per feature; a {self.name} "
                        "model's tables are not, so they cannot be sharded", "drop --shard-tables: its tables are "
                        "replicated on every rank")

    @abstractmethod
    def batches(self, model: nn.Module, data: Any, batch_size: int, seed: int,
                part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch of training batches (named tensors), shuffled by ``seed``. With ``part`` (rank, ranks):
        that rank's rows of each global batch (``recompress.distributed.shard``), read without the others'."""

    @abstractmethod
    def steps_per_epoch(self, data: Any, batch_size: int) -> int: ...

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean training loss over the batch's ``loss_units``."""

    def loss_units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many terms ``loss`` averages over (ranks weight their losses by it): rows, unless overridden."""
        return len(next(iter(batch.values())))

    # --- evaluation ------------------------------------------------------------------------------------
    @abstractmethod
    def eval_batches(self, hparams: dict[str, Any], data: Any, split: str, protocol: str, *, batch_size: int,
                     negatives: int, seed: int, users: int | None) -> Iterator[tuple[Inputs, Any]]:
        """(model inputs, truth) for every evaluated row of ``split`` under ``protocol``, for a model with
        ``hparams`` (e.g. the history length it reads)."""

    @abstractmethod
    def reduce(self, output: np.ndarray, truth: Any) -> tuple[np.ndarray, np.ndarray]:
        """A batch's model output and truth -> (per-row values, per-row truth) of kind ``record``."""

    def eval_rows(self, data: Any, split: str, protocol: str, users: int | None) -> int:
        return data.size(split) if users is None else min(users, data.size(split))

    # --- serving and export ----------------------------------------------------------------------------
    def scorings_of(self, hparams: dict[str, Any]) -> tuple[str, ...]:
        """The serving graphs a model with ``hparams`` can write, its default first."""
        return self.scorings

    @abstractmethod
    def scorer(self, model: nn.Module, scoring: str | None = None) -> nn.Module:
        """What is served and exported: ``forward(**inputs) -> output`` (the eager parity reference), in
        one of ``scorings`` (None: the default)."""

    def input_axes(self, hparams: dict[str, Any], layout: str | None = None) -> dict[str, dict[int, str]]:
        """The serving inputs of a model with ``hparams`` in ``layout`` (one of ``layouts``): name -> {axis:
        symbol}; an axis left out is fixed to its size in the example inputs' first row."""
        return self.inputs

    def profile(self, spec: ModelSpec, layout: str | None = None) -> dict[str, tuple[int, int, int]]:
        """Shape ranges an engine is built for (TensorRT optimization profiles): symbol of
        :meth:`input_axes` -> (min, opt, max). ``export --shapes`` overrides any of them."""
        return {"batch": (1, 64, 2048)}

    @abstractmethod
    def example_inputs(self, model: nn.Module, n: int, data: Any | None, seed: int = 0) -> dict[str, torch.Tensor]:
        """``n`` rows of valid inputs: from the test split when data is given, else random valid ids."""

    def parity_batches(self, model: nn.Module, n: int, data: Any | None) -> dict[str, dict[str, torch.Tensor]]:
        """The batches an export must reproduce, by label."""
        return {"example inputs": self.example_inputs(model, n, data)}

    def check_latency(self, hparams: dict[str, Any], data: Any, batch: int) -> None:
        """Refuse, before anything runs, a latency batch size a model with ``hparams`` cannot run on ``data`` here."""

    @abstractmethod
    def latency_inputs(self, hparams: dict[str, Any], data: Any, batch: int, count: int, seed: int = 0,
                       candidates: int | None = None) -> list[Inputs]:
        """``count`` distinct batches of real inputs for latency measurements (with ``candidates`` per row,
        for families that score candidates; None: the default protocol's)."""

    def spec_tables(self, rows: dict[str, tuple[int, int, str]]) -> list[TableSpec]:
        return [TableSpec(name=n, rows=r, dim=d, role=role) for n, (r, d, role) in rows.items()]


def family_of(spec: ModelSpec) -> Family:
    from recompress.families import get_family
    if spec.family not in FAMILIES:
        raise UserError(f"unknown model family {spec.family!r}", f"known families: {', '.join(FAMILIES)}")
    return get_family(spec.family)
