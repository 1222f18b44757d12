"""What the sequential-format adapters share: recompress's model of a sequential family (SASRec, HSTU, ...) built
from hyper-parameters and a state dict already under recompress's keys, every tensor checked."""

from __future__ import annotations

from typing import Any

import torch

from recompress.checkpoint import Checkpoint
from recompress.errors import UserError
from recompress.families import get_family
from recompress.spec import ModelSpec, TableSpec
from recompress.tables import empty_table

from .stored import as_float32, check, unshared


def build_sequential(hp: dict[str, Any], keys: tuple[str, ...], extra: dict[str, Any], state: dict[str, torch.Tensor],
                     where: str, family: str = "sasrec") -> Checkpoint:
    """A ``family`` model (its tables: ``Family.table_rows``) with the family's defaults, ``hp``'s values for ``keys``
    and ``extra``; ``state`` loaded strictly."""
    if "heads" in keys and (hp["heads"] < 1 or hp["dim"] % hp["heads"]):
        raise UserError(f"heads = {hp['heads']} does not divide the width {hp['dim']}", "pass --hp heads=N with N | dim")
    fam = get_family(family)
    params = fam.hparams({k: hp[k] for k in keys})
    params.update({"num_items": hp["num_items"], "has_times": False, "tied_output": True, **extra})
    rows = fam.table_rows(params)
    spec = ModelSpec(family=family, hparams=params, tables=[TableSpec(n, r, hp["dim"], role=n) for n, r in rows.items()])
    return Checkpoint(load_checked(spec, state, where), spec)


def load_checked(spec: ModelSpec, state: dict[str, torch.Tensor], where: str) -> torch.nn.Module:
    """The model of ``spec`` holding ``state`` (recompress's keys), every tensor checked for NaN/Inf and every key and
    shape against the model, or one message naming the first that does not fit."""
    for k, v in state.items():
        check(k, v, where)
    fam = get_family(spec.family)
    model = fam.build(spec, {t.name: empty_table(t, unallocated=True) for t in spec.tables})  # tables: shapes only
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    wrong = [k for k, v in model.state_dict().items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        what = "; ".join(part for part in (
            f"missing {sorted(missing)[:3]}" if missing else "", f"unexpected {sorted(unexpected)[:3]}" if unexpected else "",
            f"{wrong[0]} is {list(state[wrong[0]].shape)}, expected {list(model.state_dict()[wrong[0]].shape)}" if wrong else "")
            if part)
        raise UserError(f"{where} does not fit {spec.family} with these hyper-parameters ({what})",
                        "the file is damaged, or a --hp value contradicts it ('recompress inspect' lists them)")
    model.load_state_dict(unshared({k: as_float32(k, v, where) for k, v in state.items()}), assign=True)  # the tensors read, a big one mapped
    return model.eval()
