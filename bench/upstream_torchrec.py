"""Benchmark (not a test): recompress against real TorchRec, both ways.

    /path/to/python-with-torchrec bench/upstream_torchrec.py --out bench/results/upstream_torchrec.json

Run it with an interpreter that has TorchRec (TorchRec 1.9.2 works with torch 2.13 and ``fbgemm-gpu-cpu==1.8.0``
installed with ``--no-deps``) and recompress (``pip install --no-deps -e .``). It builds TorchRec's own
``torchrec.models.dlrm.DLRM`` (random weights, seeded), scores a batch of KeyedJaggedTensor inputs, and saves its
state dict plain and wrapped as ``DLRMTrain`` saves it (``model.`` keys); then:

1. recompress reads each file and scores the same rows: the largest difference from TorchRec's logits;
2. ``recompress export --target torchrec`` of that checkpoint loads into a fresh TorchRec DLRM with
   ``load_state_dict(strict=True)``: the largest difference of its logits from the first model's;
3. the checkpoint compressed to int8 rows and exported the same way loads (``strict=True``) into a TorchRec DLRM
   whose collection is TorchRec's quantized inference one (``torchrec.quant.EmbeddingBagCollection`` from
   ``from_float`` with qint8 weights, its rows replaced by the file's): the largest difference of its logits from
   recompress's int8 checkpoint's, and from TorchRec's own int8 quantization of the float model, for scale.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

TABLES = {"t_cat_0": 1000, "t_cat_1": 50, "t_cat_2": 300, "t_cat_3": 7}
DIM, DENSE = 16, 13


def torchrec_model(seed: int) -> torch.nn.Module:
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    torch.manual_seed(seed)
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name=n, embedding_dim=DIM, num_embeddings=r,
                                                            feature_names=[n.removeprefix("t_")]) for n, r in TABLES.items()],
                                 device=torch.device("cpu"))
    return DLRM(embedding_bag_collection=ebc, dense_in_features=DENSE, dense_arch_layer_sizes=[64, DIM],
                over_arch_layer_sizes=[64, 32, 1]).eval()


def quantized(model: torch.nn.Module) -> torch.nn.Module:
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC
    ebc = model.sparse_arch.embedding_bag_collection
    ebc.qconfig = torch.ao.quantization.QConfig(
        activation=torch.ao.quantization.PlaceholderObserver,
        weight=torch.ao.quantization.PlaceholderObserver.with_args(dtype=torch.qint8))
    model.sparse_arch.embedding_bag_collection = QuantEBC.from_float(ebc)
    return model


def inputs(n: int = 512, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, DENSE, generator=g), torch.stack([torch.randint(0, r, (n,), generator=g) for r in TABLES.values()], 1)


def torchrec_logits(model: torch.nn.Module, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    keys = [n.removeprefix("t_") for n in TABLES]
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=ids.T.reshape(-1),
                                              lengths=torch.ones(ids.numel(), dtype=torch.int32))
    with torch.no_grad():
        return model(dense, kjt).squeeze(-1)


def ours(path: Path, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    from recompress.adapters import load_any
    with torch.no_grad():
        return load_any(path).model(dense, ids.unsqueeze(-1))



def main() -> None:
    from measure import recompress  # bench/measure.py, beside this script

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import torchrec
    dense, ids = inputs()
    model = torchrec_model(0)
    want = torchrec_logits(model, dense, ids)
    result: dict = {"torchrec": torchrec.__version__, "torch": torch.__version__, "tables": TABLES, "dim": DIM,
                    "rows_scored": len(dense)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.save(model.state_dict(), work / "plain.pt")
        torch.save({"model." + k: v for k, v in model.state_dict().items()}, work / "dlrmtrain.pt")
        result["read"] = {name: float((ours(work / f"{name}.pt", dense, ids) - want).abs().max())
                          for name in ("plain", "dlrmtrain")}
        recompress("export", str(work / "plain.pt"), "--target", "torchrec", "-o", str(work / "x"))
        back = torchrec_model(99)
        back.load_state_dict(torch.load(work / "x" / "model.pt", weights_only=True), strict=True)
        result["export_float_loaded_strict"] = float((torchrec_logits(back, dense, ids) - want).abs().max())
        recompress("checkpoint", str(work / "plain.pt"), "--method", "int8", "-o", str(work / "q"))
        recompress("export", str(work / "q"), "--target", "torchrec", "-o", str(work / "qx"))
        q_model = quantized(torchrec_model(99))
        q_model.load_state_dict(torch.load(work / "qx" / "model.pt", weights_only=True), strict=True)
        ours_int8 = ours(work / "q", dense, ids)
        got = torchrec_logits(q_model, dense, ids)
        own = torchrec_logits(quantized(torchrec_model(0)), dense, ids)
        result["export_int8_loaded_strict"] = {
            "max_diff_vs_recompress_int8": float((got - ours_int8).abs().max()),
            "max_diff_vs_float": float((got - want).abs().max()),
            "torchrec_own_int8_max_diff_vs_float": float((own - want).abs().max())}
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
