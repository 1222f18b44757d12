"""TorchRec's BERT4Rec example (``examples/bert4rec``): the ``state_dict()`` its ``bert4rec_main.py`` saves
(``epoch_{n}_model.pth``; ``module.`` from DDP, or per-rank ``ShardedTensor`` files and DCP folders, merged by
``shards``), rebuilt as the ``torchrec`` flavor of recompress's BERT4Rec (``recompress.models.bert4rec_torchrec``).

Keys: ``history.ec.embeddings.item_embedding.weight`` (an ``EmbeddingCollection`` over ids 0..N + 1: padding,
items, mask token), ``history.positional`` ``[L, d]``, ``history.layernorm`` (over ``[L, d]``),
``transformer_blocks.{i}.{attention.linear_layers.{0,1,2}, attention.output_linear, feed_forward.w_1, w_2,
input_sublayer.norm, output_sublayer.norm}`` and ``out`` (``Linear(d, N + 2)``). Shapes give the width, window,
blocks, items and feed-forward width; the example keeps its heads (``--nhead``, default 2) nowhere in the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from recompress.errors import UserError

from .found import Found, FoundTable
from .sequential_build import build_sequential
from .torch_files import indexed, state_dict_of

if TYPE_CHECKING:
    from recompress.checkpoint import Checkpoint

NAME = "torchrec-bert4rec"
LAYOUT = "TorchRec's examples/bert4rec state dict (history.ec item table, history.positional, transformer_blocks, out)"
ITEM, POS, LN, OUT = "history.ec.embeddings.item_embedding.weight", "history.positional", "history.layernorm", "out"
BLOCK = "transformer_blocks"
MODEL_KEYS = ("model_state_dict", "state_dict", "model")


def _state(obj: Any) -> dict[str, torch.Tensor] | None:
    return state_dict_of(obj, *MODEL_KEYS) or state_dict_of(obj)


def sniff(path: Path, obj: Any) -> bool:
    sd = _state(obj)
    return bool(sd) and {ITEM, POS, f"{OUT}.weight"} <= set(sd)


def describe(path: Path, obj: Any) -> Found:
    sd = _state(obj)
    assert sd is not None
    need = [ITEM, POS, f"{LN}.weight", f"{LN}.bias", f"{OUT}.weight", f"{OUT}.bias"]
    absent = [k for k in need if k not in sd]
    if absent:
        raise UserError(f"{path}: a TorchRec BERT4Rec state dict without {', '.join(absent)}", "the file is damaged")
    item, pos, out = sd[ITEM], sd[POS], sd[f"{OUT}.weight"]
    vocab, d = (int(s) for s in item.shape)
    length = int(pos.shape[0])
    blocks = [i for i, _ in indexed(sd, BLOCK, ".attention.output_linear.weight")]
    w1 = sd.get(f"{BLOCK}.0.feed_forward.w_1.weight")
    problems = [f"{k} is {list(v.shape)}, expected {want}" for k, v, want in (
        (POS, pos, [length, d]), (f"{LN}.weight", sd[f"{LN}.weight"], [length, d]), (f"{OUT}.weight", out, [vocab, d]),
        (f"{OUT}.bias", sd[f"{OUT}.bias"], [vocab])) if list(v.shape) != want]
    if vocab < 3:
        problems.append(f"{vocab} ids, fewer than padding, one item and the mask token")
    if not blocks or blocks != list(range(len(blocks))) or w1 is None:
        problems.append("its transformer_blocks are missing or not numbered from 0")
    if problems:
        raise UserError(f"{path}: a TorchRec BERT4Rec state dict that contradicts itself ({'; '.join(problems)})",
                        "the file is damaged")
    tables = [FoundTable.of("item", item, ITEM, "item"),
              FoundTable.of("position", pos, POS, "position", rows=length + 1),  # recompress's padding row added
              FoundTable.of("output", out, f"{OUT}.weight", "output")]
    found = Found(NAME, "bert4rec", tables, build=lambda hp: _build(hp, sd, str(path)))
    found.set("flavor", "torchrec", "checkpoint")
    found.set("num_items", vocab - 2, "shapes")
    found.set("dim", d, "shapes")
    found.set("max_len", length, "shapes")
    found.set("blocks", len(blocks), "shapes")
    found.set("ffn_dim", int(w1.shape[0]), "shapes")
    found.set("activation", "relu", "default")
    found.set("ln_eps", 1e-5, "default")
    found.set("dropout", 0.1, "default")  # the example's (a fine-tune's)
    found.set("mask_ratio", 0.15, "default")
    found.need("heads", (), "TorchRec's example takes --nhead (its default: 2) and saves it nowhere", like=2)
    found.notes.append(f"ids 0..{vocab - 1}: 0 pads (and is looked up as a row), 1..{vocab - 2} are items, {vocab - 1} "
                       "is the mask token appended after the history when serving")
    found.notes.append("its data: 'recompress data sequences ratings.csv --layout torchrec' (the example's ids, time "
                       "order and 100 popularity-sampled candidates per user, which evaluate then scores)")
    return found


def _build(hp: dict[str, Any], sd: dict[str, torch.Tensor], where: str) -> Checkpoint:
    d = hp["dim"]
    pos = sd[POS]
    state = {"tables.item.weight": sd[ITEM], "tables.output.weight": sd[f"{OUT}.weight"],
             "output_bias": sd[f"{OUT}.bias"],
             "tables.position.weight": torch.cat([torch.zeros(1, d, dtype=pos.dtype), pos]),  # row 0: unused
             "input_layernorm.weight": sd[f"{LN}.weight"], "input_layernorm.bias": sd[f"{LN}.bias"]}
    for i in range(hp["blocks"]):
        src = f"{BLOCK}.{i}."
        qkv = [f"{src}attention.linear_layers.{j}." for j in range(3)]
        missing = [k + p for k in qkv for p in ("weight", "bias") if k + p not in sd]
        if missing:
            raise UserError(f"{where}: a TorchRec BERT4Rec state dict without {missing[0]}", "the file is damaged")
        wrong = [k + "weight" for k in qkv if tuple(sd[k + "weight"].shape) != (d, d)]
        if wrong:
            raise UserError(f"{where}: {wrong[0]} is {list(sd[wrong[0]].shape)}, not [{d}, {d}]", "the file is damaged")
        state[f"attention_layers.{i}.in_proj_weight"] = torch.cat([sd[k + "weight"] for k in qkv])
        state[f"attention_layers.{i}.in_proj_bias"] = torch.cat([sd[k + "bias"] for k in qkv])
        for ours, theirs in ((f"attention_layers.{i}.out_proj", "attention.output_linear"),
                             (f"forward_layers.{i}.conv1", "feed_forward.w_1"),
                             (f"forward_layers.{i}.conv2", "feed_forward.w_2"),
                             (f"attention_layernorms.{i}", "input_sublayer.norm"),
                             (f"forward_layernorms.{i}", "output_sublayer.norm")):
            for p in ("weight", "bias"):
                if src + theirs + "." + p not in sd:
                    raise UserError(f"{where}: a TorchRec BERT4Rec state dict without {src}{theirs}.{p}",
                                    "the file is damaged")
                state[f"{ours}.{p}"] = sd[f"{src}{theirs}.{p}"]
    keys = ("dim", "blocks", "heads", "max_len", "dropout", "flavor", "ffn_dim", "activation", "ln_eps", "mask_ratio")
    return build_sequential(hp, tuple(k for k in keys if k in hp), {"tied_output": False}, state, where,
                            family="bert4rec")
