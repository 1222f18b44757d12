"""pmixer/SASRec.pytorch checkpoints: a bare state dict saved as
``SASRec.epoch=E.lr=R.layer=B.head=H.hidden=D.maxlen=L.pth``, next to the ``args.txt`` its ``main.py``
writes (``key,value`` lines). Shapes give the width, blocks, items and window; the heads come from the file
name or args.txt; the block wiring from args.txt (``norm_first`` since 2025-05, absent before: the 2020
wiring). Its forward attends to the left padding, so the model is read with ``attend_padding``.
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

NAME = "sasrec.pytorch"
LAYOUT = "a pmixer/SASRec.pytorch state dict (item_emb, pos_emb, attention_layers...), SASRec.epoch=...pth"
CHECKED = {"dim": ("hidden", "hidden_units"), "blocks": ("layer", "num_blocks"), "max_len": ("maxlen", "maxlen")}
DEFAULT_DROPOUT = 0.2  # main.py's --dropout_rate default


def sniff(path: Path, obj: Any) -> bool:
    sd = state_dict_of(obj) if obj is not None else None
    return bool(sd) and "item_emb.weight" in sd and "attention_layers.0.in_proj_weight" in sd


def file_name_hparams(path: Path) -> dict[str, str]:
    """``SASRec.epoch=1000.lr=0.001.layer=2...pth`` -> {"epoch": "1000", "lr": "0.001", ...}."""
    return dict(re.findall(r"(\w+)=([-+\w]+(?:\.\d+(?:e[-+]?\d+)?)?)(?=\.\w+=|\.pth$|\.pt$|$)", path.name))


def sidecar(path: Path) -> dict[str, str]:
    """SASRec.pytorch's ``args.txt`` beside the checkpoint, if it is there."""
    args = path.parent / "args.txt"
    if not args.is_file():
        return {}
    out = {}
    for line in args.read_text(errors="replace").splitlines():
        key, sep, value = line.partition(",")
        if sep:
            out[key.strip()] = value.strip()
    return out


def describe(path: Path, obj: Any) -> Found:
    sd = state_dict_of(obj)
    assert sd is not None
    item, pos = sd["item_emb.weight"], sd.get("pos_emb.weight")
    if pos is None or item.dim() != 2 or pos.dim() != 2 or pos.shape[1] != item.shape[1]:
        raise UserError(f"{path}: item_emb/pos_emb are missing or disagree in width", "is this a SASRec.pytorch model?")
    d, blocks = int(item.shape[1]), len(indexed(sd, "attention_layers", ".in_proj_weight"))
    named, args = file_name_hparams(path), sidecar(path)
    max_len = int(pos.shape[0]) - 1
    if str(max_len + 1) in (named.get("maxlen"), args.get("maxlen")):
        raise UserError(f"{path}: pos_emb has maxlen = {max_len + 1} rows, the layout of SASRec.pytorch before "
                        "commit 33bc1d8 (2024-06-25), whose positions count from 0 with no padding row",
                        "re-save it with current SASRec.pytorch, or train again")
    tables = [FoundTable("item", int(item.shape[0]), d, str(item.dtype).removeprefix("torch."),
                         item.numel() * item.element_size(), role="item", parts=("item_emb.weight",)),
              FoundTable("position", int(pos.shape[0]), d, str(pos.dtype).removeprefix("torch."),
                         pos.numel() * pos.element_size(), role="position", parts=("pos_emb.weight",))]
    found = Found(NAME, "sasrec", tables, build=lambda hp: _build(hp, sd, str(path)))
    for key, value in (("dim", d), ("blocks", blocks), ("max_len", max_len), ("num_items", int(item.shape[0]) - 1)):
        found.set(key, value, "shapes")
    for key, (in_name, in_args) in CHECKED.items():
        for src, told in (("file name", named.get(in_name)), ("args.txt", args.get(in_args))):
            if told is not None and told != str(found.hparams[key]):
                raise UserError(f"{path}: the {src} says {key} = {told}, the tensors' shapes say {found.hparams[key]}",
                                "the file was renamed or args.txt belongs to another run")
    heads = named.get("head") or args.get("num_heads")
    if heads is not None:
        src = "file name" if named.get("head") else "sidecar: args.txt"
        if not heads.isdigit() or int(heads) < 1 or d % int(heads):
            raise UserError(f"{path}: the {src} says heads = {heads}, which does not divide the width {d}",
                            "rename the file, or pass --hp heads=N with N dividing the width")
        found.set("heads", int(heads), src)
    else:
        found.need("heads", (), "SASRec.pytorch stores the number of heads only in its file name and args.txt", like=1)
    if "norm_first" in args:
        flag = args["norm_first"].lower()
        if flag not in ("true", "false"):
            raise UserError(f"{path.parent / 'args.txt'}: norm_first = {args['norm_first']!r} is not True or False",
                            "fix args.txt, or move it away and pass --hp wiring=...")
        found.set("wiring", "pre-ln" if flag == "true" else "post-ln", "sidecar: args.txt")
    elif args:
        found.set("wiring", "pmixer-2020", "sidecar: args.txt")  # written before --norm_first existed
    else:
        found.need("wiring", ("post-ln", "pre-ln", "pmixer-2020"),
                   "its keys are the same in every version; the wiring is only in args.txt (norm_first, since "
                   "2025-05; files from before use pmixer-2020)")
    try:
        found.set("dropout", float(args.get("dropout_rate", DEFAULT_DROPOUT)),
                  "sidecar: args.txt" if "dropout_rate" in args else "default")
    except ValueError:
        raise UserError(f"{path.parent / 'args.txt'}: dropout_rate = {args['dropout_rate']!r} is not a number",
                        "fix args.txt, or move it away") from None
    found.set("attend_padding", True, "default")
    for k in ("epoch", "lr"):
        if k in named:
            found.notes.append(f"file name: {k} = {named[k]}")
    return found


def _build(hp: dict[str, Any], sd: dict[str, torch.Tensor], where: str) -> Checkpoint:
    state = {}
    for k, v in sd.items():
        key = {"item_emb.weight": "tables.item.weight", "pos_emb.weight": "tables.position.weight"}.get(k, k)
        state[key] = v.squeeze(-1) if re.fullmatch(r"forward_layers\.\d+\.conv\d\.weight", k) else v  # Conv1d k=1
    return build_sequential(hp, ("dim", "blocks", "heads", "max_len", "dropout", "wiring", "attend_padding"), {}, state,
                            where)
