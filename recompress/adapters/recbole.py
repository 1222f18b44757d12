"""RecBole checkpoints (``Trainer._save_checkpoint``: ``config``, ``state_dict``, ``other_parameter``,
``optimizer``, ...). Every hyper-parameter is in the pickled ``Config``, read as an inert stub (RecBole need
not be installed, nothing of it runs); shapes are checked against it. SASRec is rebuilt (the ``recbole``
flavor of recompress's SASRec); other RecBole models are recognized and refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from recompress.errors import UserError

from .found import Found, FoundTable
from .safe_pickle import Stub
from .sequential_build import build_sequential
from .torch_files import indexed, state_dict_of

if TYPE_CHECKING:
    from recompress.checkpoint import Checkpoint

NAME = "recbole"
LAYOUT = "a RecBole checkpoint (config, state_dict, other_parameter, optimizer)"
ACTIVATIONS = ("gelu", "relu")


def sniff(path: Path, obj: Any) -> bool:
    return isinstance(obj, Mapping) and {"config", "state_dict", "other_parameter"} <= set(obj)


def _config(obj: Mapping[str, Any], path: Path) -> dict[str, Any]:
    cfg = obj["config"]
    state = cfg.state if isinstance(cfg, Stub) else None
    final = state.get("final_config_dict") if isinstance(state, dict) else None  # Config's pickled __dict__
    if not isinstance(final, dict):
        raise UserError(f"{path}: its config holds no final_config_dict", "is this a RecBole checkpoint?")
    return final


def describe(path: Path, obj: Any) -> Found:
    cfg = _config(obj, path)
    model = str(cfg.get("model"))
    sd = state_dict_of(obj, "state_dict") or {}
    if model != "SASRec":
        raise UserError(f"{path} is a RecBole {model} checkpoint; recompress rebuilds RecBole's SASRec only",
                        "its tables: " + ", ".join(f"{k} {list(v.shape)}" for k, v in sd.items() if "embedding" in k)[:300])
    item, pos = sd.get("item_embedding.weight"), sd.get("position_embedding.weight")
    if item is None or pos is None:
        raise UserError(f"{path}: a SASRec state dict without item_embedding/position_embedding", "the file is damaged")
    d = int(item.shape[1])
    blocks = len(indexed(sd, "trm_encoder.layer", ".multi_head_attention.query.weight"))
    inner = sd.get("trm_encoder.layer.0.feed_forward.dense_1.weight")
    tables = [FoundTable("item", int(item.shape[0]), d, str(item.dtype).removeprefix("torch."),
                         item.numel() * item.element_size(), role="item", parts=("item_embedding.weight",)),
              FoundTable("position", int(pos.shape[0]), d, str(pos.dtype).removeprefix("torch."),
                         pos.numel() * pos.element_size(), role="position", parts=("position_embedding.weight",))]
    found = Found(NAME, "sasrec", tables, build=lambda hp: _build(hp, sd, str(path)))
    shapes = {"dim": d, "blocks": blocks, "max_len": int(pos.shape[0]), "num_items": int(item.shape[0]) - 1,
              "ffn_dim": int(inner.shape[0]) if inner is not None else d}
    told = {"dim": "hidden_size", "blocks": "n_layers", "max_len": "MAX_ITEM_LIST_LENGTH", "ffn_dim": "inner_size"}
    for key, value in shapes.items():
        if key in told and cfg.get(told[key]) is not None and int(cfg[told[key]]) != value:
            raise UserError(f"{path}: its config says {told[key]} = {cfg[told[key]]}, the tensors' shapes say {value}",
                            "the file is inconsistent")
        found.set(key, value, "shapes")
    found.set("heads", int(cfg["n_heads"]), "checkpoint")
    act = str(cfg.get("hidden_act", "gelu"))
    if act not in ACTIVATIONS:
        raise UserError(f"{path}: hidden_act {act!r} is not one recompress rebuilds", f"supported: {', '.join(ACTIVATIONS)}")
    found.set("activation", act, "checkpoint")
    found.set("ln_eps", float(cfg.get("layer_norm_eps", 1e-12)), "checkpoint")
    found.set("dropout", float(cfg.get("hidden_dropout_prob", 0.5)), "checkpoint")
    found.set("flavor", "recbole", "default")
    if obj.get("other_parameter"):
        found.notes.append(f"other_parameter holds {', '.join(obj['other_parameter'])} (kept out; SASRec needs none)")
    score = obj.get("best_valid_score")
    if score is not None:
        metric = str(cfg.get("valid_metric", "?"))
        found.provenance["upstream_metrics"] = {f"best valid {metric}": float(score)}
        found.notes.append(f"checkpoint: best valid {metric} = {float(score):.4f} (epoch {obj.get('epoch')})")
    found.notes.append(f"checkpoint: trained on {cfg.get('dataset')}; prepare it with 'recompress data sequences "
                       f"{cfg.get('dataset')}.inter --layout recbole -o DATA', then 'recompress evaluate ... --data DATA'")
    return found


def _build(hp: dict[str, Any], sd: dict[str, torch.Tensor], where: str) -> Checkpoint:
    need = ("item_embedding.weight", "position_embedding.weight", "LayerNorm.weight", "LayerNorm.bias")
    if any(k not in sd for k in need):
        raise UserError(f"{where} lacks {', '.join(k for k in need if k not in sd)}", "the file is damaged")
    state: dict[str, torch.Tensor] = {
        "tables.item.weight": sd["item_embedding.weight"],
        "tables.position.weight": torch.cat([torch.zeros(1, hp["dim"]), sd["position_embedding.weight"].float()]),
        "input_layernorm.weight": sd["LayerNorm.weight"], "input_layernorm.bias": sd["LayerNorm.bias"]}
    for i in range(hp["blocks"]):
        up = f"trm_encoder.layer.{i}."
        att, ffn = up + "multi_head_attention.", up + "feed_forward."
        parts = {f"attention_layers.{i}.out_proj": att + "dense", f"attention_layernorms.{i}": att + "LayerNorm",
                 f"forward_layers.{i}.conv1": ffn + "dense_1", f"forward_layers.{i}.conv2": ffn + "dense_2",
                 f"forward_layernorms.{i}": ffn + "LayerNorm"}
        qkv = [f"{att}{n}.{w}" for n in ("query", "key", "value") for w in ("weight", "bias")]
        absent = [k for k in (*qkv, *(f"{t}.{w}" for t in parts.values() for w in ("weight", "bias"))) if k not in sd]
        if absent:
            raise UserError(f"{where} lacks {', '.join(absent[:3])}", "the file is damaged")
        state[f"attention_layers.{i}.in_proj_weight"] = torch.cat([sd[f"{att}{n}.weight"] for n in ("query", "key", "value")])
        state[f"attention_layers.{i}.in_proj_bias"] = torch.cat([sd[f"{att}{n}.bias"] for n in ("query", "key", "value")])
        for ours, theirs in parts.items():
            state[f"{ours}.weight"], state[f"{ours}.bias"] = sd[f"{theirs}.weight"], sd[f"{theirs}.bias"]
    return build_sequential(hp, ("dim", "blocks", "heads", "max_len", "dropout", "flavor", "ffn_dim", "activation",
                                 "ln_eps"), {"loss": "sampled-softmax"}, state, where)
