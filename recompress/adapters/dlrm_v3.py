"""generative-recommenders' ``dlrm_v3`` checkpoints (``dlrm_v3/checkpoint.py`` ``save_dmp_checkpoint``): a
folder ``{timestamp}/`` with ``non_sparse.ckpt`` (``dense_dict``, ``optimizer_dict``, ``sparse_tensor_keys``)
and ``sparse/``, a DCP folder of the embedding tables (``sparse_dict._embedding_collection.embeddings.
{feature}.weight``). Both parts are read (the sparse one offline, ``shards``); given one part alone, the error
names the other.

Rebuilt as the ``dlrm_hstu`` family (``models/dlrm_hstu_net.py``). Widths, layers, contextual slots and tasks come
from the shapes; the heads from the group norm's shape (or dlrm_v3's config); what only upstream's Python configs
hold (``get_hstu_configs``: max_seq_len 2056, 10 candidates, min_uih 20) from the config its tables' names select
(``movie_id`` + ``user_id``: movielens-20m; with ``sex``, ``age_group``, ``occupation``, ``zip_code``:
movielens-1m). Configs with an action encoder (kuairand) or several item features (debug) are described, not
rebuilt.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recompress.errors import UserError

from . import shards
from .found import Found, FoundTable
from .stored import materialize
from .torch_files import is_torch_file, safe_torch_load

NAME = "dlrm_v3"
READS_OBJECT = False  # recognized by its files' names (both parts are read in describe)
LAYOUT = "a generative-recommenders dlrm_v3 checkpoint folder (non_sparse.ckpt + sparse/ DCP folder)"
ITEM_TABLES = ("movie_id", "video_id", "post_id")  # the configs' item tables (MovieLens, KuaiRand, debug)
TABLE = re.compile(r"^sparse_dict\.(?:.*\.)?embeddings\.([^.]+)\.weight$")


def _dense_part(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "dense_dict" in obj and "sparse_tensor_keys" in obj


def sniff(path: Path, obj: Any) -> bool:
    if path.is_dir() and ((path / "non_sparse.ckpt").is_file() or (path / "sparse").is_dir()):
        return True
    if path.is_file() and path.name == "non_sparse.ckpt":
        return True
    return shards.is_dcp(path) and path.name == "sparse"


def describe(path: Path, obj: Any) -> Found:
    folder = path.parent if path.is_file() or path.name == "sparse" else path
    dense, sparse = folder / "non_sparse.ckpt", folder / "sparse"
    if path != folder:
        raise UserError(f"{path} is one part of a dlrm_v3 checkpoint", f"pass the folder that holds both parts: {folder}")
    missing = [p.name for p in (dense, sparse) if not p.exists()]
    if missing:
        have = "the sparse part (sparse/)" if "sparse" not in missing else "the dense part (non_sparse.ckpt)"
        raise UserError(f"{folder} holds {have} of a dlrm_v3 checkpoint but not {', '.join(missing)}",
                        "save_dmp_checkpoint writes both into one timestamped folder; copy it whole")
    if not is_torch_file(dense) or not shards.is_dcp(sparse):
        raise UserError(f"{folder}: non_sparse.ckpt is not a torch file or sparse/ is not a DCP folder",
                        "the checkpoint is damaged")
    dense_obj, tensors = safe_torch_load(dense, lazy=True), shards.read_dcp(sparse)  # described only
    if not _dense_part(dense_obj):
        raise UserError(f"{dense} has no dense_dict/sparse_tensor_keys", "is this a dlrm_v3 non_sparse.ckpt?")
    tables = [FoundTable.of(m.group(1), t, k, role="item" if m.group(1) in ITEM_TABLES else "sparse_feature")
              for k, t in tensors.items() if (m := TABLE.match(k))]
    dense_sd = {_clean(k): v for k, v in dense_obj["dense_dict"].items()}
    why: list[str] = []  # what rules a rebuild out; inspect still describes the folder
    found = Found(NAME, "dlrm_hstu", tables, build=lambda hp: _build(hp, dense_sd, tensors, folder, why))
    found.notes.append(f"dense part: {len(dense_sd)} tensors; sparse part: {len(tensors)} tensors")
    why.extend(_read_hparams(found, dense_sd, {t.name: t for t in tables}))
    found.notes.extend(f"not rebuilt: {w}" for w in why)
    return found


MOVIELENS = {("movie_id", "user_id"): "movielens-20m",
             ("age_group", "movie_id", "occupation", "sex", "user_id", "zip_code"): "movielens-1m"}
CONTEXTUAL = {"movielens-20m": ["user_id"], "movielens-1m": ["user_id", "sex", "age_group", "occupation", "zip_code"]}
PRE, STU = "_hstu_transducer._input_preprocessor.", "_hstu_transducer._stu_module._stu_layers."
RENAME = [("_multitask_module._prediction_module.", "head."), (STU, "blocks."),
          (PRE + "_batched_contextual_linear_weights", "contextual_weight"),
          (PRE + "_batched_contextual_linear_bias", "contextual_bias"),
          (PRE + "_content_embedding_mlp.", "content_mlp."),
          ("_hstu_transducer._output_postprocessor._layer_norm.", "post_norm."),
          ("_hstu_transducer._output_postprocessor._time_feature_combiner.", "time_combiner."),
          ("_hstu_transducer._output_postprocessor._period_units", "period_units"),
          ("_hstu_transducer._output_postprocessor._units_per_period", "units_per_period"),
          ("_hstu_transducer._positional_encoder._position_embeddings_weight", "position_weight"),
          ("_hstu_transducer._positional_encoder._timestamp_embeddings_weight", "time_weight"),
          ("_item_embedding_mlp.", "item_mlp.")]


def _clean(key: str) -> str:
    for prefix in ("_dmp_wrapped_module.", "module."):
        key = key.removeprefix(prefix)
    return key


def _ours(key: str) -> str | None:
    """recompress's name for an upstream dense key (None: not part of the rebuilt model)."""
    for theirs, ours in RENAME:
        if key.startswith(theirs):
            return ours + key[len(theirs):].replace("._", ".").lstrip("_")
    return None


def _read_hparams(found: Found, sd: dict[str, Any], tables: dict[str, FoundTable]) -> list[str]:
    """Set what the shapes and the config say; return what rules a rebuild out (nothing: it can be rebuilt)."""
    config = MOVIELENS.get(tuple(sorted(tables)))
    if config is None:
        return [f"its tables ({', '.join(sorted(tables))}) are not a MovieLens config's: kuairand's action encoder "
                "and the debug config's several item features are not rebuilt"]
    unknown = sorted(k for k in sd if _ours(k) is None)
    if unknown:
        return [f"dense tensors recompress does not rebuild ({unknown[0]}"
                + (f" and {len(unknown) - 1} more" if len(unknown) > 1 else "") + ")"]
    src = f"default:dlrm_v3 get_hstu_configs('{config}')"
    uvqk, out, norm = (sd.get(f"{STU}0.{k}") for k in ("_uvqk_weight", "_output_weight", "_output_norm_weight"))
    found.set("dim", tables["movie_id"].dim, "shapes")
    found.set("item_table", "movie_id", "shapes")
    found.set("contextual", CONTEXTUAL[config], "shapes")
    found.set("blocks", len({k[len(STU):].split(".")[0] for k in sd if k.startswith(STU)}), "shapes")
    if uvqk is None or out is None or norm is None:
        return [f"{STU}0 is incomplete"]
    width, linear = int(uvqk.shape[0]), int(out.shape[0]) // 3
    found.set("width", width, "shapes")
    group = int(norm.shape[0]) != linear
    found.set("group_norm", group, "shapes")
    if group:  # one norm weight per head
        found.set("heads", int(norm.shape[0]), "shapes")
    else:  # a layer norm over every head: the shapes give heads x widths only (split by heads in _build)
        found.set("heads", 4, src)
    for key, value in _per_head(sd, found.hparams["heads"]).items():
        found.set(key, value, "shapes" if group else src)
    head_out = sd.get("_multitask_module._prediction_module.2.weight")
    if head_out is None or head_out.shape[0] != 1:
        return ["its prediction head is not the MovieLens configs' one regression task"]
    found.set("tasks", ["rating:regression"], src)
    for key, value in (("max_seq_len", 2056), ("num_candidates", 10), ("min_uih", 20), ("dropout", 0.2),
                       ("linear_dropout", 0.1), ("multitask_weight", 0.2)):
        found.set(key, value, src)
    found.set("kernel", "pytorch", "default:dlrm_v3 make_model (HammerKernel.PYTORCH)")
    return []


def _per_head(sd: dict[str, Any], heads: int) -> dict[str, int]:
    """linear_dim and qk_dim of ``heads`` heads from the first STU layer's shapes (0 where heads does not divide)."""
    linear = int(sd[f"{STU}0._output_weight"].shape[0]) // 3
    qk = int(sd[f"{STU}0._uvqk_weight"].shape[1]) // 2 - linear
    return {"linear_dim": linear // heads if linear % heads == 0 else 0,
            "qk_dim": qk // heads if qk % heads == 0 else 0}


def _build(hp: dict[str, Any], dense: dict[str, Any], sparse: dict[str, Any], folder: Path, why: list[str]) -> Any:
    from recompress.checkpoint import Checkpoint
    from recompress.families import get_family
    from recompress.spec import ModelSpec, TableSpec

    from .sequential_build import load_checked

    where = str(folder)
    if why:
        raise UserError(f"{folder} is a dlrm_v3 checkpoint recompress does not rebuild: {'; '.join(why)}",
                        "'recompress inspect' lists its tables and what rules a rebuild out")
    if not hp["group_norm"]:  # heads may come from --hp: split the shapes by them
        hp = {**hp, **_per_head(dense, hp["heads"])}
        if not (hp["linear_dim"] and hp["qk_dim"]):
            raise UserError(f"{folder}: {hp['heads']} heads do not divide its STU widths (a layer norm over all "
                            "heads, so the shapes do not say how many there are)", "pass --hp heads=N")
    fam = get_family("dlrm_hstu")
    params = fam.hparams({k: v for k, v in hp.items() if k in {p.name for p in fam.info.hparams}})
    names = [params["item_table"], *params["contextual"]]
    keys = {n: f"sparse_dict._embedding_collection.embeddings.{n}.weight" for n in names}
    state = {f"tables.{n}.weight": sparse[k] for n, k in keys.items()}
    state.update({_ours(k): v for k, v in dense.items()})
    state = materialize(state)
    spec = ModelSpec(family="dlrm_hstu", hparams=params, tables=[
        TableSpec(n, int(state[f"tables.{n}.weight"].shape[0]), params["dim"],
                  role="item" if n == params["item_table"] else "sparse_feature") for n in names])
    return Checkpoint(load_checked(spec, state, where), spec)
