"""facebookresearch/dlrm ``--save-model`` dicts (and bare DLRM_Net state_dicts): shapes give every hyper-parameter."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from recompress.checkpoint import Checkpoint
from recompress.errors import UserError

from .torch_files import dlrm_from_tensors, file_sha256, safe_torch_load

NAME = "dlrm"


def sniff(path: Path) -> bool:
    return path.is_file() and path.suffix in {".pt", ".pth", ".ckpt"} and zipfile.is_zipfile(path)


def _strip(key: str) -> str:
    for p in ("module.", "_orig_mod.", "model."):
        key = key.removeprefix(p)
    return key.replace(".module.", ".")


def read(path: Path) -> Checkpoint:
    obj = safe_torch_load(path)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not any(str(k).endswith("weight") for k in sd):
        raise UserError(f"{path} holds no state_dict", "expected a facebookresearch/dlrm --save-model file")
    sd = {_strip(k): v for k, v in sd.items()}
    if any(k.endswith((".weight_q", ".embs.weight")) for k in sd):
        raise UserError(f"{path} uses dlrm's QR or mixed-dimension tables",
                        "only plain emb_l tables are supported by this adapter so far")

    def indexed(prefix: str, suffix: str) -> list:
        pat = re.compile(rf"^{re.escape(prefix)}\.(\d+){re.escape(suffix)}$")
        found = sorted((int(m.group(1)), k) for k in sd if (m := pat.match(k)))
        return [sd[k] for _, k in found]

    tables = indexed("emb_l", ".weight")
    if not tables:
        raise UserError(f"{path} has no emb_l.N.weight tables", "expected a facebookresearch/dlrm checkpoint")
    pairs = lambda pre: list(zip(indexed(pre, ".weight"), indexed(pre, ".bias")))
    extra = {k: obj[k] for k in ("nepochs", "epoch", "iter", "test_acc", "train_loss")
             if isinstance(obj, dict) and isinstance(obj.get(k), (int, float))}
    return dlrm_from_tensors(tables, pairs("bot_l"), pairs("top_l"), pad=0, source=NAME,
                             source_hash=file_sha256([path]), where=str(path),
                             extra={"upstream_metrics": extra, "source_path": str(path)})
