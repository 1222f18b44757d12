"""BERT4Rec (Sun et al. 2019) as RecBole builds and serves it (flavor ``recbole``; TorchRec's example, flavor
``torchrec``: ``recompress.models.bert4rec_torchrec``).

The encoder is RecBole's transformer, as in its SASRec (``recompress.models.sasrec``, flavor ``recbole``:
item plus position rows through a layer norm, post-LN blocks, positions from the first item) with
bidirectional attention: every position attends every real one. The item table has one more row after the
items, the mask token. Serving (RecBole's ``full_sort_predict``): the history's oldest item is dropped and
the mask token appended after the newest (``reconstruct_test_data`` writes the mask after the last item and
drops the first column, so the oldest item goes whatever the history's length); the mask position's state
goes through a head (linear, GELU, layer norm) and scores each item by its tied row plus a per-item bias.

Training (cloze): the window ending at the last training item, cut as serving cuts a history (the oldest item
dropped), each real position replaced by the mask token with probability ``mask_ratio`` and the last always:
the window is cut as serving cuts the same history (with no other position masked, the last position's input
is exactly serving's). Masked positions predict the item they hid. One window per user and epoch, as
recompress's SASRec trains (RecBole trains on every prefix). (RecBole's own training keeps the oldest item, so a short history reads one item more in
training than in its serving.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from recompress.distributed import shard
from recompress.families import FAMILIES
from recompress.progress import say
from recompress.spec import ModelSpec
from recompress.tables import Table

from .bert4rec_torchrec import TorchRecBERT4Rec
from .sasrec import SASRec
from .sequential import SequentialFamily, dot_candidates, dot_negatives, item_embed, key_mask, sample_negatives


class BERT4Rec(SASRec):
    family = "bert4rec"

    def __init__(self, hparams: dict[str, Any], tables: dict[str, Table]) -> None:
        super().__init__({**hparams, "flavor": "recbole"}, tables)
        self.hparams = dict(hparams)
        d, eps = hparams["dim"], hparams["ln_eps"]
        self.mask_id = hparams["num_items"] + 1
        self.output_ffn = nn.Linear(d, d)
        self.output_ln = nn.LayerNorm(d, eps=eps)
        self.output_bias = nn.Parameter(torch.zeros(hparams["num_items"] + 1))

    def allowed(self, history: Tensor) -> Tensor:
        return key_mask(history)

    def head(self, h: Tensor) -> Tensor:
        """RecBole's output_ffn, GELU, output_ln (its input in float32: under a reduced-precision export the
        GELU's output is float16 and the norm's weights float32, a LayerNormalization no runtime loads)."""
        return self.output_ln(nn.functional.gelu(self.output_ffn(h)).float())

    def served(self, history: Tensor) -> Tensor:
        """RecBole's test input: the oldest real item dropped, the mask token appended after the newest."""
        return torch.cat([drop_oldest(history), torch.full_like(history[:, :1], self.mask_id)], dim=1)

    def cloze_window(self, data: Any, users: np.ndarray, ends: np.ndarray, length: int) -> np.ndarray:
        """The training window whose last item is masked: the items up to ``ends``, as ``served`` cuts them."""
        return drop_oldest(torch.from_numpy(data.windows(users, ends, length + 1))).numpy()

    def bias(self, ids: Tensor) -> Tensor:
        """Each item's bias (padding's: 0)."""
        return self.output_bias[ids.clamp(0, self.mask_id - 1)] * (ids > 0).to(torch.float32)

    def forward(self, history: Tensor, candidates: Tensor, timestamps: Tensor | None = None) -> Tensor:
        h = self.head(self.encode(self.served(history))[:, -1])
        return dot_candidates(h, item_embed(self, candidates)) + self.bias(candidates)

    def train_logits(self, history: Tensor, targets: Tensor, negatives: Tensor,
                     timestamps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``history``: a masked window; ``targets``: the item each masked position hid (0 elsewhere)."""
        h = self.head(self.encode(history))
        pos = (h * item_embed(self, targets)).sum(-1) + self.bias(targets)
        neg = dot_negatives(h, item_embed(self, negatives), negatives.dim() == 1) + self.bias(negatives)
        return pos, neg


def drop_oldest(window: Tensor) -> Tensor:
    """``[B, n]`` -> ``[B, n - 1]``: the window without its oldest real item (the first column when the window
    is full; otherwise the oldest item is zeroed and a padding column goes)."""
    real = window > 0
    return window.masked_fill(real & (real.long().cumsum(1) == 1), 0)[:, 1:]


class BERT4RecFamily(SequentialFamily):
    info = FAMILIES["bert4rec"]
    extra_items = 1  # the mask token

    compressible = ("item", "output")

    def build(self, spec: ModelSpec, tables: dict[str, Table]) -> nn.Module:
        if spec.hparams.get("flavor") == "torchrec":
            return TorchRecBERT4Rec(spec.hparams, tables)
        return BERT4Rec(spec.hparams, tables)

    def hparams(self, given: dict[str, Any]) -> dict[str, Any]:
        """TorchRec's flavor defaults to its example's: a ReLU feed-forward of width 4 d, PyTorch's layer norm
        epsilon, dropout 0.1 and 15% of positions masked."""
        hp = super().hparams(given)
        if hp["flavor"] == "torchrec":
            defaults = {"activation": "relu", "ln_eps": 1e-5, "ffn_dim": 4 * hp["dim"], "dropout": 0.1,
                        "mask_ratio": 0.15}
            hp.update({k: v for k, v in defaults.items() if given.get(k) is None})
        return hp

    def new_spec(self, data: Any, hparams: dict[str, Any]) -> ModelSpec:
        spec = super().new_spec(data, hparams)
        spec.hparams["tied_output"] = spec.hparams["flavor"] != "torchrec"
        return spec

    def check(self, spec: ModelSpec, data: Any) -> None:
        """Also warn when a model read from TorchRec's example file meets data its layout did not prepare: the same
        sizes can hold other ids there, and the scores would mean nothing."""
        super().check(spec, data)
        if spec.provenance.get("source_format") == "torchrec-bert4rec" and data.meta.get("layout") != "torchrec":
            say(f"[yellow]warning:[/yellow] this model was trained by TorchRec's BERT4Rec example and {data.path} was "
                f"prepared with --layout {data.meta.get('layout', 'recompress')}: the example numbers ids its own way; "
                "prepare its ratings file with 'recompress data sequences RATINGS --layout torchrec'")

    def table_rows(self, hparams: dict[str, Any]) -> dict[str, int]:
        """TorchRec's flavor scores with an output table of the item table's rows (padding and mask included)."""
        rows = super().table_rows(hparams)
        return {**rows, "output": rows["item"]} if hparams.get("flavor") == "torchrec" else rows

    def init_layers(self, model: nn.Module, gen: torch.Generator) -> None:
        """RecBole's rule: linear weights N(0, 0.02), their biases 0, layer norms 1 and 0, the item bias 0."""
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, 0.02, generator=gen)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.MultiheadAttention):
                m.in_proj_weight.normal_(0.0, 0.02, generator=gen)
                m.in_proj_bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        model.output_bias.zero_()

    def table_counts(self, spec: ModelSpec, data: Any) -> dict[str, np.ndarray]:
        """Training counts of each item (for the item and output tables); the mask token, read by every request,
        counts one more than the most frequent item (frequency-aware methods keep it in a row of its own)."""
        counts = data.id_counts("train")
        counts = np.append(counts, counts.max(initial=0) + 1)
        return {t.name: counts for t in spec.tables if t.name in ("item", "output")}

    def batches(self, model: nn.Module, data: Any, batch_size: int, seed: int,
                part: tuple[int, int] = (0, 1)) -> Iterator[dict[str, Tensor]]:
        hp = model.hparams
        length, k, mask_id = hp["max_len"], hp["negatives"], hp["num_items"] + 1
        rng = np.random.default_rng(seed)
        ends = data.history_end("train")
        for users in np.array_split(rng.permutation(data.num_users), self.steps_per_epoch(data, batch_size)):
            # the window as serving would see it with the last item asked for: oldest dropped, then masked
            window = model.cloze_window(data, users, ends[users], length)
            masked = (window > 0) & (rng.random(window.shape) < hp["mask_ratio"])
            masked[:, -1] = window[:, -1] > 0
            if hp["loss"] == "sampled-softmax":
                negatives = rng.integers(1, data.num_items + 1, k)
            else:
                negatives = sample_negatives(rng, data.num_items, (len(users), length, k), window)
            mine = shard(len(users), part)
            yield {"history": torch.from_numpy(np.where(masked, mask_id, window)[mine]),
                   "targets": torch.from_numpy(np.where(masked, window, 0)[mine]),
                   "negatives": torch.from_numpy(negatives if negatives.ndim == 1 else negatives[mine])}


FAMILY = BERT4RecFamily()
