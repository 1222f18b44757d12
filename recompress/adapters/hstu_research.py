"""generative-recommenders' research HSTU checkpoints (``research/trainer/train.py``: ``{epoch,
model_state_dict, optimizer_state_dict}``, every key under DDP's ``module.``), saved as
``./ckpts/{dataset}-l{L}/HSTU-b{blocks}-h{heads}-dqk{dqk}-dv{dv}-...{date}_ep{epoch}``: the file name and
its folder give the hyper-parameters, shapes the rest. Recognized and described; not rebuilt: the research
HSTU differs from recompress's in four ways that reading weights cannot bridge (measured on checkpoints its
own train.py wrote, 0.6 apart in user embeddings): positions count from the first item of a right-padded
sequence, attention is divided by L + gr_output_length + 1 rather than the window, the last position's time
bias uses the target's timestamp (an extra input), and its time buckets are float32 logs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from recompress.errors import UserError

from .found import Found, FoundTable
from .torch_files import indexed, state_dict_of

NAME = "hstu-research"
LAYOUT = "a generative-recommenders research HSTU checkpoint (model_state_dict with _embedding_module, _hstu)"
DESC = re.compile(r"-l(\d+)/HSTU-b(\d+)-h(\d+)-dqk(\d+)-dv(\d+)-l(\w+?)d([\d.]+)-ad([\d.]+)(-norab)?")
WHY = ("recompress's HSTU is not the research HSTU: positions from the first item of a right-padded sequence, "
       "attention divided by L + gr_output_length + 1, the target's timestamp in the last position's time bias, "
       "float32 time buckets")


def sniff(path: Path, obj: Any) -> bool:
    sd = state_dict_of(obj, "model_state_dict") if obj is not None else None
    return bool(sd) and "_embedding_module._item_emb.weight" in sd and any(k.startswith("_hstu.") for k in sd)


def describe(path: Path, obj: Any) -> Found:
    sd = state_dict_of(obj, "model_state_dict")
    assert sd is not None
    item, pos = sd["_embedding_module._item_emb.weight"], sd.get("_input_features_preproc._pos_emb.weight")
    tables = [FoundTable("item", int(item.shape[0]), int(item.shape[1]), str(item.dtype).removeprefix("torch."),
                         item.numel() * item.element_size(), role="item", parts=("_embedding_module._item_emb.weight",))]
    if pos is not None:
        tables.append(FoundTable("position", int(pos.shape[0]), int(pos.shape[1]), str(pos.dtype).removeprefix("torch."),
                                 pos.numel() * pos.element_size(), role="position",
                                 parts=("_input_features_preproc._pos_emb.weight",)))
    found = Found(NAME, "hstu", tables, build=lambda hp: _refuse(path))
    found.set("dim", int(item.shape[1]), "shapes")
    found.set("num_items", int(item.shape[0]) - 1, "shapes")
    found.set("blocks", len(indexed(sd, "_hstu._attention_layers", "._uvqk")), "shapes")
    if pos is not None:
        found.set("positions", int(pos.shape[0]), "shapes")
    m = DESC.search(f"{path.parent.name}/{path.name}")
    if m:
        for key, value in zip(("max_len", "blocks", "heads", "dqk", "dv"), m.groups()[:5]):
            found.set(key, int(value), "file name")
        found.set("rel_attn_bias", m.group(9) is None, "file name")
    else:
        found.need("heads", (), "the research code keeps heads in its gin config and file name", like=1)
    if isinstance(obj, dict) and "epoch" in obj:
        found.notes.append(f"checkpoint: epoch {obj['epoch']}")
    found.notes.append(f"not rebuilt: {WHY}")
    return found


def _refuse(path: Path) -> Any:
    raise UserError(f"{path} is a generative-recommenders research HSTU, which recompress describes but does not "
                    f"rebuild ({WHY})", "'recompress inspect' lists its tables and hyper-parameters; train recompress's "
                    "HSTU ('recompress train --model hstu') to compress and export one")
