"""generative-recommenders' research HSTU checkpoints (``research/trainer/train.py``: ``{epoch,
model_state_dict, optimizer_state_dict}``, every key under DDP's ``module.``), saved as
``./ckpts/{dataset}-l{L}/HSTU-b{blocks}-h{heads}-dqk{dqk}-dv{dv}-l{act}d{dropout}-ad{attn dropout}...``: the
file name and its folder give the hyper-parameters, shapes the rest (``_attn_mask`` is N x N with
N = L + gr_output_length + 1).

Rebuilt as recompress's HSTU with ``variant=research`` (positions from the first item, the next item's
timestamp as a last timestamps column, float32 time buckets) and ``attn_norm=N``. Weights: position row
r (r = 1..L) is ``_pos_emb`` row r - 1 (row 0, padding, zero); ``pos_w`` is ``_pos_w[N - L : N + L - 1]``
(upstream indexes it by N - 1 + j - i, recompress by L - 1 + j - i); ``_ts_w``, ``_uvqk`` and ``_o`` as they
are. Checked against upstream's own outputs on checkpoints its train.py wrote (docs/benchmarks.md).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from recompress.checkpoint import Checkpoint
from recompress.errors import UserError

from .found import Found, FoundTable
from .sequential_build import build_sequential
from .torch_files import indexed, state_dict_of

NAME = "hstu-research"
LAYOUT = "a generative-recommenders research HSTU checkpoint (model_state_dict with _embedding_module, _hstu)"
DESC = re.compile(r"-l(\d+)/HSTU-b(\d+)-h(\d+)-dqk(\d+)-dv(\d+)-l(\w+?)d([\d.]+)-ad([\d.]+)(-norab)?")
LOSS = re.compile(r"_ssl-t([\d.]+)-n(\d+)")
ITEM, POS, MASK = "_embedding_module._item_emb.weight", "_input_features_preproc._pos_emb.weight", "_attn_mask"
LAYER = "_hstu._attention_layers"


def sniff(path: Path, obj: Any) -> bool:
    sd = state_dict_of(obj, "model_state_dict") if obj is not None else None
    return bool(sd) and ITEM in sd and any(k.startswith("_hstu.") for k in sd)


def describe(path: Path, obj: Any) -> Found:
    sd = state_dict_of(obj, "model_state_dict")
    assert sd is not None
    item, pos = sd[ITEM], sd.get(POS)
    d = int(item.shape[1])
    tables = [FoundTable("item", int(item.shape[0]), d, str(item.dtype).removeprefix("torch."),
                         item.numel() * item.element_size(), role="item", parts=(ITEM,))]
    if pos is not None:
        tables.append(FoundTable("position", int(pos.shape[0]), int(pos.shape[1]), str(pos.dtype).removeprefix("torch."),
                                 pos.numel() * pos.element_size(), role="position", parts=(POS,)))
    why: list[str] = []  # what rules a rebuild out; inspect still describes the file
    if pos is None or MASK not in sd or item.dim() != 2 or pos.dim() != 2 or pos.shape[1] != d:
        why.append(f"{POS} or {MASK} is missing, or the tables disagree in width")
    found = Found(NAME, "hstu", tables, build=lambda hp: _build(hp, sd, int(sd[MASK].shape[0]) if MASK in sd else 0,
                                                                str(path), why))
    found.set("dim", d, "shapes")
    found.set("num_items", int(item.shape[0]) - 1, "shapes")
    found.set("blocks", len(indexed(sd, LAYER, "._uvqk")), "shapes")
    if MASK in sd:
        found.set("attn_norm", int(sd[MASK].shape[0]), "shapes")
    found.set("variant", "research", "default")
    found.set("time_bias", f"{LAYER}.0._rel_attn_bias._ts_w" in sd, "shapes")
    m = DESC.search(f"{path.parent.name}/{path.name}")
    if m:
        max_len, blocks, heads, dqk, dv = (int(g) for g in m.groups()[:5])
        if blocks != found.hparams["blocks"]:
            raise UserError(f"{path}: the file name says {blocks} blocks, the tensors hold {found.hparams['blocks']}",
                            "the file was renamed")
        found.set("max_len", max_len, "file name")
        found.set("heads", heads, "file name")
        found.set("dqk", dqk, "file name")
        found.set("dv", dv, "file name")
        if dqk * heads != d or dv * heads != d:
            why.append(f"dqk = {dqk}, dv = {dv} with {heads} heads and width {d}: recompress's HSTU has dqk = dv = "
                       "width / heads")
        if m.group(6) != "silu":
            why.append(f"linear activation {m.group(6)!r}: recompress's HSTU applies SiLU")
        if m.group(9):
            why.append("trained with -norab (softmax attention with a relative bias): recompress rebuilds HSTU's "
                       "pointwise attention only")
        found.set("dropout", float(m.group(7)), "file name")
        loss = LOSS.search(path.name)
        if loss:
            found.set("loss", "sampled-softmax", "file name")
            found.set("temperature", float(loss.group(1)), "file name")
            found.set("negatives", int(loss.group(2)), "file name")
    else:
        found.need("heads", (), "the research code keeps heads in its gin config and the file name", like=1)
        found.need("max_len", (), "the research code keeps the history length L in its gin config and the folder "
                   "name (…-l{L}/)", like=200)
    if isinstance(obj, dict) and "epoch" in obj:
        found.notes.append(f"checkpoint: epoch {obj['epoch']}")
    found.notes.extend(f"not rebuilt: {w}" for w in why)
    return found


def _build(hp: dict[str, Any], sd: dict[str, torch.Tensor], n: int, where: str, why: list[str]) -> Checkpoint:
    if why:
        raise UserError(f"{where} is a research HSTU recompress does not rebuild: {'; '.join(why)}",
                        "'recompress inspect' lists its tables and hyper-parameters")
    d, window = hp["dim"], hp["max_len"]
    if not 1 <= window <= n - 1:
        raise UserError(f"max_len {window} with N = {n} positions upstream", f"pass --hp max_len=L with L < {n}")
    if sd[f"{LAYER}.0._o.weight"].shape[1] != d:
        raise UserError(f"{where}: _o takes {sd[f'{LAYER}.0._o.weight'].shape[1]} inputs, not {d} (concat_ua)",
                        "recompress's HSTU gates u * norm(attention) only")
    pos = torch.zeros(window + 1, d, dtype=sd[POS].dtype)
    pos[1:] = sd[POS][:window]
    state = {"tables.item.weight": sd[ITEM], "tables.position.weight": pos}
    for i in range(hp["blocks"]):
        src, dst = f"{LAYER}.{i}.", f"blocks.{i}."
        state[dst + "uvqk"] = sd[src + "_uvqk"]
        state[dst + "o.weight"], state[dst + "o.bias"] = sd[src + "_o.weight"], sd[src + "_o.bias"]
        pos_w = sd[src + "_rel_attn_bias._pos_w"]
        if pos_w.shape != (2 * n - 1,):
            raise UserError(f"{where}: {src}_rel_attn_bias._pos_w has {list(pos_w.shape)} values, not 2N - 1 = "
                            f"{2 * n - 1}", "the file is damaged")
        state[dst + "pos_w"] = pos_w[n - window: n + window - 1]
        if hp["time_bias"]:
            state[dst + "ts_w"] = sd[src + "_rel_attn_bias._ts_w"]
    keys = ("dim", "blocks", "heads", "max_len", "dropout", "variant", "attn_norm", "time_bias", "loss", "temperature",
            "negatives")
    return build_sequential(hp, tuple(k for k in keys if k in hp), {"has_times": bool(hp["time_bias"])}, state, where,
                            family="hstu")
