"""Model families: each declares here its name, the dataset kind it trains on and its hyper-parameters
(torch-free, so ``train --help`` answers at once); its implementation, the ``nn.Module`` and the
``Family`` object that knows its batch, loss, metrics, inputs and item tables, lives in its model file
(``module``). Adding a family = one model file + one ``declare`` here. No stage branches on a family's
name: training, compression, export, evaluation, recipes and the gate ask the family object.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING

from .errors import UserError
from .params import Param

if TYPE_CHECKING:
    from .models.family import Family


@dataclass(frozen=True)
class FamilyInfo:
    name: str
    help: str
    data: str  # the dataset kind it trains on: "ctr" | "sequences"
    module: str  # holds FAMILY, the implementation
    hparams: tuple[Param, ...]


FAMILIES: dict[str, FamilyInfo] = {}


def declare(info: FamilyInfo) -> FamilyInfo:
    FAMILIES[info.name] = info
    return info


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}", f"known families: {', '.join(FAMILIES)}")
    return import_module(FAMILIES[name].module).FAMILY


def all_hparams() -> dict[str, list[tuple[str, Param]]]:
    """Every family hyper-parameter by name, with the families that declare it (a name means one thing)."""
    out: dict[str, list[tuple[str, Param]]] = {}
    for f in FAMILIES.values():
        for p in f.hparams:
            out.setdefault(p.name, []).append((f.name, p))
    return out


DIM = "embedding width d"
FFN_DIM = "sasrec, bert4rec: feed-forward inner width (sasrec without it: dim)"
ACTIVATION = "sasrec, bert4rec: feed-forward activation"
LN_EPS = "sasrec, bert4rec: layer norm epsilon"
SEQUENTIAL = (
    Param("max_len", int, "history length L the model reads (the most recent items)", 50),
    Param("blocks", int, "transformer blocks", 2),
    Param("heads", int, "attention heads", 1),
    Param("dropout", float, "dropout rate", 0.2),
    Param("loss", str, "bce: one sampled negative per position (SASRec); sampled-softmax: softmax over the positive "
                       "and --negatives sampled items (HSTU)", "bce", ("bce", "sampled-softmax")),
    Param("negatives", int, "sampled negatives per position", 1),
    Param("temperature", float, "sampled-softmax temperature", 1.0),
)


def _seq(defaults: dict[str, object], *extra: Param, without: tuple[str, ...] = ()) -> tuple[Param, ...]:
    base = [Param(p.name, p.type, p.help, defaults.get(p.name, p.default), p.choices) for p in SEQUENTIAL
            if p.name not in without]
    return (Param("dim", int, DIM, defaults.get("dim", 50)), *base, *extra)


declare(FamilyInfo("dlrm", "DLRM: bottom MLP, one pooled table per sparse feature, dot interaction, top MLP", "ctr",
                   "recompress.models.dlrm",
                   (Param("dim", int, DIM, 16), Param("bottom", str, "bottom MLP hidden sizes (d is appended)", "64"),
                    Param("top", str, "top MLP hidden sizes (1 is appended)", "64"))))
declare(FamilyInfo("sasrec", "SASRec: causal softmax self-attention over the history, scored by the tied item table",
                   "sequences", "recompress.models.sasrec",
                   _seq({}, Param("norm_first", bool, "sasrec: layer norm before attention/FFN (pre-LN) instead of "
                                                      "after (SASRec.pytorch's default)", False),
                        Param("wiring", str, "sasrec: block wiring; default: pre-ln with --norm-first, else post-ln; "
                                             "pmixer-2020 is SASRec.pytorch's before 2025-05", None,
                              ("post-ln", "pre-ln", "pmixer-2020")),
                        Param("attend_padding", bool, "sasrec: let positions attend to the left padding and keep it "
                                                      "unmasked, as SASRec.pytorch does", False),
                        Param("flavor", str, "sasrec: sasrec.pytorch's layout, or RecBole's (input layer norm, positions "
                                             "from the first item, no final norm)", "sasrec.pytorch",
                              ("sasrec.pytorch", "recbole")),
                        Param("ffn_dim", int, FFN_DIM, None), Param("activation", str, ACTIVATION, "relu", ("relu", "gelu")),
                        Param("ln_eps", float, LN_EPS, 1e-8))))
declare(FamilyInfo("bert4rec", "BERT4Rec (RecBole's or TorchRec's example): bidirectional self-attention over the "
                   "history and a mask token appended after it; an output head scores the tied item table (RecBole) or "
                   "an output table (TorchRec), plus a per-item bias", "sequences",
                   "recompress.models.bert4rec",
                   _seq({"dim": 64, "heads": 2, "loss": "sampled-softmax", "negatives": 128},
                        Param("ffn_dim", int, FFN_DIM, 256), Param("activation", str, ACTIVATION, "gelu", ("relu", "gelu")),
                        Param("ln_eps", float, LN_EPS, 1e-12),
                        Param("mask_ratio", float, "bert4rec: share of training positions masked (cloze); the last "
                                                   "is always masked, as in serving", 0.2),
                        Param("flavor", str, "bert4rec: RecBole's, or TorchRec's example (input layer norm over the "
                                             "whole window, pre-LN blocks, an untied output table; defaults: ReLU, "
                                             "ffn 4 d, ln eps 1e-5)", "recbole", ("recbole", "torchrec")))))
declare(FamilyInfo("gru4rec", "GRU4Rec (RecBole's): a GRU over the history's item rows, projected back to the item "
                   "width and scored by the tied item table", "sequences", "recompress.models.gru4rec",
                   _seq({"dim": 64, "dropout": 0.3, "loss": "sampled-softmax", "negatives": 128},
                        Param("hidden", int, "gru4rec: GRU hidden size", 128),
                        Param("layers", int, "gru4rec: stacked GRU layers", 1), without=("blocks", "heads"))))
declare(FamilyInfo("hstu", "HSTU: pointwise SiLU attention / length, relative position and time bias, U-gating",
                   "sequences", "recompress.models.hstu",
                   _seq({"loss": "sampled-softmax", "negatives": 128, "temperature": 0.05},
                        Param("time_bias", bool, "hstu: add the bucketed time bias when the data has timestamps", True),
                        Param("variant", str, "hstu: recompress's HSTU, or generative-recommenders' research HSTU "
                                             "(positions from the first item, max_len + 1 timestamps: the last the next "
                                             "item's, float32 time buckets)", "recompress", ("recompress", "research")),
                        Param("attn_norm", int, "hstu: divide the attention by this length (default: max_len; the "
                                                "research HSTU's is L + gr_output_length + 1)", None))))
declare(FamilyInfo("ranker", "appended-candidate ranker: each candidate is appended to the history and attends to "
                   "it; a CTR head scores it", "sequences", "recompress.models.ranker",
                   _seq({"dim": 64, "heads": 2, "negatives": 4},
                        Param("head", str, "ranker: hidden sizes of the CTR head MLP", "128"),
                        Param("fusion", str, "ranker: append: the candidate is one more token that attends the history "
                                             "(amortized: the history is computed once for all candidates); concat: the "
                                             "candidate's row is concatenated to every history item (early fusion, "
                                             "one history pass per candidate; the baseline)", "append",
                              ("append", "concat")))))
declare(FamilyInfo("dlrm_hstu", "generative-recommenders' dlrm_v3 ranker (DlrmHSTU): contextual, history and candidate "
                   "tokens through target-aware STU layers; an MLP of each candidate's item row times its output "
                   "predicts each task", "sequences", "recompress.models.dlrm_hstu",
                   (Param("dim", int, DIM, 256), Param("width", int, "dlrm_hstu: transducer (STU) width", 512),
                    Param("blocks", int, "transformer blocks", 3), Param("heads", int, "attention heads", 4),
                    Param("linear_dim", int, "dlrm_hstu: value and gate width per head", 128),
                    Param("qk_dim", int, "dlrm_hstu: query and key width per head", 128),
                    Param("group_norm", bool, "dlrm_hstu: group norm per head of the attention (else layer norm)",
                          True),
                    Param("dropout", float, "dropout rate", 0.2),
                    Param("linear_dropout", float, "dlrm_hstu: dropout of the STU output", 0.1),
                    Param("max_seq_len", int, "dlrm_hstu: contextual + history + candidate tokens (histories are cut "
                                              "to the first max_seq_len - candidates - contextual items)", 2056),
                    Param("num_candidates", int, "dlrm_hstu: candidates per sample (a user's last items)", 10),
                    Param("item_table", str, "dlrm_hstu: the item table's name", "movie_id"),
                    Param("contextual", str, "dlrm_hstu: contextual features, comma-separated (one table each)",
                          "user_id"),
                    Param("min_uih", int, "dlrm_hstu: contextual features are zeroed (their tokens are the bias) "
                                          "below this many history + candidate items", 20),
                    Param("tasks", str, "dlrm_hstu: NAME:regression|binary, comma-separated, binary ones first",
                          "rating:regression"),
                    Param("multitask_weight", float, "dlrm_hstu: loss weight (causal_multitask_weights)", 0.2),
                    Param("kernel", str, "dlrm_hstu: whose time-bucket clamp: upstream's PyTorch kernel (width - 1, "
                                         "what dlrm_v3 trains and evaluates with) or its Triton kernel (2048)",
                          "pytorch", ("pytorch", "triton")))))
