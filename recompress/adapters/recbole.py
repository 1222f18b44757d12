"""RecBole checkpoints (``Trainer._save_checkpoint``: ``config``, ``state_dict``, ``other_parameter``,
``optimizer``, ...). Every hyper-parameter is in the pickled ``Config``, read as an inert stub (RecBole need
not be installed, nothing of it runs); shapes are checked against it. Rebuilt: SASRec (the ``recbole``
flavor of recompress's SASRec), BERT4Rec and GRU4Rec (recompress's families of those names, written after
RecBole's); other RecBole models are recognized and refused by name.
"""

from __future__ import annotations

import re
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


def _item_and_position(sd: dict[str, torch.Tensor]) -> list[FoundTable]:
    return [FoundTable.of("item", sd["item_embedding.weight"], "item_embedding.weight", "item"),
            FoundTable.of("position", sd["position_embedding.weight"], "position_embedding.weight", "position")]


def _need(sd: dict[str, torch.Tensor], keys: tuple[str, ...], model: str, where: Path | str) -> None:
    absent = [k for k in keys if k not in sd]
    if absent:
        raise UserError(f"{where}: a RecBole {model} state dict without {', '.join(absent[:3])}", "the file is damaged")


def describe(path: Path, obj: Any) -> Found:
    cfg = _config(obj, path)
    model = str(cfg.get("model"))
    sd = state_dict_of(obj, "state_dict") or {}
    if model not in READERS:
        raise UserError(f"{path} is a RecBole {model} checkpoint; recompress rebuilds RecBole's "
                        f"{', '.join(READERS)}", "its tables: " + ", ".join(
                            f"{k} {list(v.shape)}" for k, v in sd.items() if "embedding" in k)[:300])
    found, shapes, told, given = READERS[model](path, cfg, sd)
    for key, value in shapes.items():
        if key in told and cfg.get(told[key]) is not None and int(cfg[told[key]]) != value:
            raise UserError(f"{path}: its config says {told[key]} = {cfg[told[key]]}, the tensors' shapes say {value}",
                            "the file is inconsistent")
        found.set(key, value, "shapes")
    for key, (value, source) in given.items():
        found.set(key, value, source)
    if obj.get("other_parameter"):
        found.notes.append(f"other_parameter holds {', '.join(obj['other_parameter'])} (kept out; {model} needs none)")
    score = obj.get("best_valid_score")
    if score is not None:
        metric = str(cfg.get("valid_metric", "?"))
        found.provenance["upstream_metrics"] = {f"best valid {metric}": float(score)}
        found.notes.append(f"checkpoint: best valid {metric} = {float(score):.4f} (epoch {obj.get('epoch')})")
    found.notes.append(f"checkpoint: trained on {cfg.get('dataset')}; prepare it with 'recompress data sequences "
                       f"{cfg.get('dataset')}.inter --layout recbole -o DATA', then 'recompress evaluate ... --data DATA'")
    return found


# found, hyper-parameters read from shapes, the config keys that must agree with them, the others (value, source)
Reading = tuple[Found, dict[str, int], dict[str, str], dict[str, tuple[Any, str]]]


def _transformer(cfg: dict[str, Any], sd: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, int], dict[str, Any]]:
    """What SASRec and BERT4Rec share (RecBole's TransformerEncoder): its shapes, and heads, activation,
    layer norm epsilon and dropout from the config."""
    item, pos = sd["item_embedding.weight"], sd["position_embedding.weight"]
    inner = sd.get("trm_encoder.layer.0.feed_forward.dense_1.weight")
    act = str(cfg.get("hidden_act", "gelu"))
    if act not in ACTIVATIONS:
        raise UserError(f"{path}: hidden_act {act!r} is not one recompress rebuilds", f"supported: {', '.join(ACTIVATIONS)}")
    shapes = {"dim": int(item.shape[1]), "blocks": len(indexed(sd, "trm_encoder.layer", ".multi_head_attention.query.weight")),
              "max_len": int(pos.shape[0]), "ffn_dim": int(inner.shape[0]) if inner is not None else int(item.shape[1])}
    given = {"heads": int(cfg["n_heads"]), "activation": act, "ln_eps": float(cfg.get("layer_norm_eps", 1e-12)),
             "dropout": float(cfg.get("hidden_dropout_prob", 0.5))}
    return shapes, {k: (v, "checkpoint") for k, v in given.items()}


TRANSFORMER_TOLD = {"dim": "hidden_size", "blocks": "n_layers", "max_len": "MAX_ITEM_LIST_LENGTH", "ffn_dim": "inner_size"}
TRANSFORMER_HP = ("dim", "blocks", "heads", "max_len", "dropout", "ffn_dim", "activation", "ln_eps")


def _sasrec(path: Path, cfg: dict[str, Any], sd: dict[str, torch.Tensor]) -> Reading:
    _need(sd, ("item_embedding.weight", "position_embedding.weight"), "SASRec", path)
    tables = _item_and_position(sd)
    found = Found(NAME, "sasrec", tables, build=lambda hp: build_sequential(
        hp, (*TRANSFORMER_HP, "flavor"), {"loss": "sampled-softmax"}, _transformer_state(hp, sd, str(path)), str(path)))
    shapes, given = _transformer(cfg, sd, path)
    shapes["num_items"] = int(sd["item_embedding.weight"].shape[0]) - 1
    return found, shapes, TRANSFORMER_TOLD, {**given, "flavor": ("recbole", "default")}


def _bert4rec(path: Path, cfg: dict[str, Any], sd: dict[str, torch.Tensor]) -> Reading:
    """BERT4Rec: RecBole's transformer, an item table with the mask token as its last row, an output head."""
    head = ("output_ffn.weight", "output_ffn.bias", "output_ln.weight", "output_ln.bias", "output_bias")
    pos, length = sd.get("position_embedding.weight"), cfg.get("MAX_ITEM_LIST_LENGTH")
    if "output_ffn.weight" not in sd and pos is not None and length is not None and pos.shape[0] == int(length) + 1:
        raise UserError(f"{path} is a BERT4Rec written by RecBole before 1.2 (L + 1 positions, no output head), "
                        "which scores differently", "recompress rebuilds RecBole >= 1.2's BERT4Rec; its tables: "
                        f"item_embedding {list(sd['item_embedding.weight'].shape)}, position_embedding {list(pos.shape)}")
    _need(sd, ("item_embedding.weight", "position_embedding.weight", *head), "BERT4Rec", path)
    tables = _item_and_position(sd)

    def build(hp: dict[str, Any]) -> Checkpoint:
        state = _transformer_state(hp, sd, str(path))
        state.update({k: sd[k] for k in head})
        return build_sequential(hp, (*TRANSFORMER_HP, "mask_ratio"), {"loss": "sampled-softmax"}, state, str(path),
                                family="bert4rec")
    found = Found(NAME, "bert4rec", tables, build=build)
    items = int(sd["output_bias"].shape[0]) - 1
    if int(sd["item_embedding.weight"].shape[0]) != items + 2:
        raise UserError(f"{path}: BERT4Rec's item table has {sd['item_embedding.weight'].shape[0]} rows and its output "
                        f"bias {items + 1}: the table should have one more (the mask token)", "the file is inconsistent")
    found.notes.append(f"item row {items + 1} is BERT4Rec's mask token (appended after the history when serving)")
    shapes, given = _transformer(cfg, sd, path)
    return found, {**shapes, "num_items": items}, TRANSFORMER_TOLD, {
        **given, "mask_ratio": (float(cfg.get("mask_ratio", 0.2)), "checkpoint")}


def _gru4rec(path: Path, cfg: dict[str, Any], sd: dict[str, torch.Tensor]) -> Reading:
    """GRU4Rec: item table, ``gru_layers`` (no biases), ``dense``; no position table, so the history length
    is the config's MAX_ITEM_LIST_LENGTH."""
    _need(sd, ("item_embedding.weight", "gru_layers.weight_hh_l0", "dense.weight", "dense.bias"), "GRU4Rec", path)
    if any(k.startswith("gru_layers.bias") for k in sd):
        raise UserError(f"{path}: its GRU has biases, which RecBole's GRU4Rec never has", "the file is not RecBole's GRU4Rec")
    item = sd["item_embedding.weight"]

    def build(hp: dict[str, Any]) -> Checkpoint:
        state = {"tables.item.weight": item, "dense.weight": sd["dense.weight"], "dense.bias": sd["dense.bias"],
                 **{k: v for k, v in sd.items() if k.startswith("gru_layers.")}}
        return build_sequential(hp, ("dim", "hidden", "layers", "max_len", "dropout"), {"loss": "sampled-softmax"},
                                state, str(path), family="gru4rec")
    found = Found(NAME, "gru4rec", [FoundTable.of("item", item, "item_embedding.weight", "item")], build=build)
    if cfg.get("MAX_ITEM_LIST_LENGTH") is None:
        raise UserError(f"{path}: its config has no MAX_ITEM_LIST_LENGTH", "the file is damaged")
    shapes = {"dim": int(item.shape[1]), "hidden": int(sd["gru_layers.weight_hh_l0"].shape[1]),
              "layers": sum(bool(re.fullmatch(r"gru_layers\.weight_ih_l\d+", k)) for k in sd),
              "num_items": int(item.shape[0]) - 1}
    given = {"max_len": (int(cfg["MAX_ITEM_LIST_LENGTH"]), "checkpoint"),
             "dropout": (float(cfg.get("dropout_prob", 0.3)), "checkpoint")}
    return found, shapes, {"dim": "embedding_size", "hidden": "hidden_size", "layers": "num_layers"}, given


READERS = {"SASRec": _sasrec, "BERT4Rec": _bert4rec, "GRU4Rec": _gru4rec}


def _transformer_state(hp: dict[str, Any], sd: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """RecBole's TransformerEncoder, input layer norm, item and position tables under recompress's SASRec keys."""
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
    return state
