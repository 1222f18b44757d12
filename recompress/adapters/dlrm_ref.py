"""facebookresearch/dlrm ``--save-model`` files (and bare ``DLRM_Net`` state dicts): plain, QR
(``weight_q``/``weight_r``) and mixed-dimension (``embs`` + ``proj``) tables; shapes give every
hyper-parameter but QR's operation (``--hp qr_operation=mult|add``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recompress.errors import UserError

from .dlrm_common import UpTable, dlrm_found
from .found import Found
from .torch_files import indexed, state_dict_of

NAME = "dlrm"
LAYOUT = "a facebookresearch/dlrm --save-model file (state_dict with emb_l/bot_l/top_l)"
COUNTERS = ("nepochs", "nbatches", "nbatches_test", "epoch", "iter")  # ints in dlrm's --load-model formats
METRICS = ("train_loss", "total_loss", "test_acc", "test_auc")


def sniff(path: Path, obj: Any) -> bool:
    sd = state_dict_of(obj, "state_dict") or state_dict_of(obj) if obj is not None else None
    return bool(sd) and any(k.startswith("emb_l.") for k in sd) and any(k.startswith("top_l.") for k in sd)


def describe(path: Path, obj: Any) -> Found:
    sd = state_dict_of(obj, "state_dict") or state_dict_of(obj)
    assert sd is not None
    if any(k.startswith("v_W_l.") for k in sd):
        raise UserError(f"{path} uses dlrm's learned weighted pooling (v_W_l)", "only sum pooling is supported")
    ids = sorted({int(k.split(".")[1]) for k in sd if k.startswith("emb_l.") and k.split(".")[1].isdigit()})
    tables = []
    for i in ids:
        p = f"emb_l.{i}."
        if p + "weight" in sd:
            tables.append(UpTable(f"emb_{i}", "dense", {"weight": sd[p + "weight"]}, (p + "weight",)))
        elif p + "weight_q" in sd and p + "weight_r" in sd:
            tables.append(UpTable(f"emb_{i}", "qr", {"q": sd[p + "weight_q"], "r": sd[p + "weight_r"]},
                                  (p + "weight_q", p + "weight_r")))
        elif p + "embs.weight" in sd and p + "proj.weight" in sd:
            tables.append(UpTable(f"emb_{i}", "md", {"embs": sd[p + "embs.weight"], "proj": sd[p + "proj.weight"]},
                                  (p + "embs.weight", p + "proj.weight")))
        elif p + "embs.weight" in sd:  # a mixed-dimension table at full width: no projection
            tables.append(UpTable(f"emb_{i}", "dense", {"weight": sd[p + "embs.weight"]}, (p + "embs.weight",)))
        else:
            raise UserError(f"{path}: table emb_l.{i} has none of weight, weight_q/weight_r, embs.weight",
                            "the checkpoint is damaged or from a dlrm variant recompress does not know")
    if ids != list(range(len(ids))):
        raise UserError(f"{path}: tables emb_l.{ids} are not numbered 0..{len(ids) - 1}",
                        "a multi-process dlrm run saves only one rank's tables; save from a single process")
    pairs = lambda pre: [(sd[k], sd[k[:-len("weight")] + "bias"]) for _, k in indexed(sd, pre, ".weight")]
    found = dlrm_found(NAME, tables, pairs("bot_l"), pairs("top_l"), where=str(path))
    made = obj.get("recompress") if isinstance(obj, dict) else None
    if isinstance(made, dict):
        found.notes.append(f"written by {made.get('tool')} after {', '.join(map(str, made.get('history') or [])) or 'no compression'}")
    values = {k: int(obj[k]) if k in COUNTERS else float(obj[k]) for k in (*COUNTERS, *METRICS)
              if isinstance(obj, dict) and _number(obj.get(k))}
    if values and not made:
        found.provenance["upstream_metrics"] = values
        found.notes.append("upstream: " + ", ".join(f"{k} {v}" for k, v in values.items()))
    return found


def _number(v: Any) -> bool:
    try:
        float(v)
        return not isinstance(v, (str, bytes))
    except (TypeError, ValueError):
        return False
