"""Benchmark (not a test): does recompress score a BERT4Rec that TorchRec's own example trained as that example does?

    PYTHONPATH=PANDAS python bench/upstream_torchrec_bert4rec.py --repo TORCHREC/examples/bert4rec \
        --ratings ../shared/data/movielens_latest_small/ratings.csv.gz --out bench/results/upstream_torchrec_bert4rec.json

The upstream code is not part of recompress: pass TorchRec's ``examples/bert4rec`` folder (read at a48cef7) and an
interpreter with this project's environment plus pandas (the example's data code needs it). The script seeds
Python's, NumPy's and torch's generators, then runs the example's own ``bert4rec_main.main`` in this process
(``--mode ddp``: its default ``dmp`` needs fbgemm's GPU Adam; one gloo rank on the CPU) on a MovieLens
``ratings.csv`` (read by the example as ``--dataset_name ml-20m``), and keeps what it printed, the ``.pth`` it
saved and the test candidates its preprocessing drew (popularity-sampled negatives). recompress then reads the
``.pth`` (``--hp heads=2``: the example's ``--nhead`` default, which its file does not record), prepares the same
ratings with ``--layout torchrec --seed 0`` (which must draw the same candidates: the JSON says whether every one
matched), evaluates the sampled protocol on every user, compresses the item and output tables to int8 and evaluates
again (paired, same users and candidates). The same weights are also saved as a DMP user saves them (the model
wrapped in ``DistributedModelParallel``, its ``state_dict()`` through ``torch.save`` and DCP) and evaluated, and the
file is read once with 4 heads for contrast. Everything lands in one JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

TEST = re.compile(r"Test, metrics (\{.*\})")
KS = (1, 5, 10)


def train_upstream(repo: Path, ratings: Path, work: Path, args: list[str]) -> dict:
    """Run the example's ``main`` here, seeded; return what it printed and the test candidates it drew."""
    import numpy as np
    import torch

    sys.path.insert(0, str(repo))
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29541")
    import bert4rec_main
    from data import bert4rec_movielens_datasets as upstream_data

    drawn: dict = {}
    processed = upstream_data.Bert4RecPreprocsser.get_processed_dataframes

    def keep(self):  # the example's own preprocessing, its result kept for the comparison
        out = processed(self)
        drawn.update(test=out["test"], smap=out["smap"], umap=out["umap"])
        return out

    upstream_data.Bert4RecPreprocsser.get_processed_dataframes = keep
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    printed = io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(printed):
        bert4rec_main.main(["--dataset_name", "ml-20m", "--dataset_path", str(ratings.parent), "--mode", "ddp",
                            "--export_root", str(work) + "/", *args])
    seconds = round(time.time() - t0, 1)
    metrics = json.loads(re.sub(r"np\.float64\(([^)]*)\)", r"\1", TEST.findall(printed.getvalue())[-1]).replace("'", '"'))
    movie = {v: k for k, v in drawn["smap"].items()}
    user = {v: k for k, v in drawn["umap"].items()}
    test = drawn["test"]
    candidates = {str(user[int(u)]): [movie[int(i)] for i in c] for u, c in zip(test["user"], test["candidates"])}
    return {"printed": metrics, "train_seconds": seconds, "candidates": candidates,
            "users": len(test), "items": len(drawn["smap"])}


def at_ks(results: dict) -> dict:
    """HR@k and NDCG@k for the example's ks (its Recall@k with one answer is HR@k), from the ranks a results file
    keeps of every user (recompress reports k = 10 and 20)."""
    import numpy as np
    from recompress.stats import decode

    rec = results["predictions"]
    assert rec["kind"] == "ranks" and not rec["sampled"], rec.keys()
    r = decode(rec["base64"], "<i4").astype(np.float64)
    out = {f"hr@{k}": float(np.mean(r < k)) for k in KS}
    out.update({f"ndcg@{k}": float(np.mean(np.where(r < k, 1 / np.log2(r + 2), 0))) for k in KS if k > 1})
    assert abs(out["ndcg@10"] - results["accuracy"]["torch"]["ndcg@10"]) < 1e-12  # the same ranks as reported
    return out


def sharded_saves(repo: Path, saved: Path, work: Path, vocab: int, args: list[str]) -> None:
    """The trained weights as a DMP user saves them: the example's model wrapped in TorchRec's
    DistributedModelParallel (its item table an EmbeddingCollection shard; SGD as the fused optimizer, since
    fbgemm's CPU kernels have no Adam), its ``state_dict()`` saved with ``torch.save`` and with DCP."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel

    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29542")
        dist.init_process_group("gloo", rank=0, world_size=1)
    from models.bert4rec import BERT4Rec  # the example's own module

    opt = dict(zip(args[::2], args[1::2]))
    model = BERT4Rec(vocab, int(opt["--max_len"]), emb_dim=int(opt["--emb_dim"]), nhead=2, num_layers=2)
    model.load_state_dict({k.removeprefix("module."): v for k, v in torch.load(saved, weights_only=True).items()})
    sharder = EmbeddingCollectionSharder({"optimizer": EmbOptimType.EXACT_SGD, "learning_rate": 0.0})
    dmp = DistributedModelParallel(module=model, device=torch.device("cpu"), sharders=[sharder])
    state = dmp.state_dict()
    torch.save(state, work / "dmp_model.pth")
    dcp.save(state, checkpoint_id=str(work / "dcp"))
    dist.destroy_process_group()


def main() -> None:
    from measure import run  # bench/measure.py, beside this script

    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True, help="TorchRec's examples/bert4rec folder")
    ap.add_argument("--ratings", required=True, help="a MovieLens ratings.csv (gzip or plain)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--emb-dim", type=int, default=64)
    ap.add_argument("--dupe-factor", type=int, default=1)
    ap.add_argument("--upstream-dir", default=None, help="keep the upstream run here; a folder with one is reused")
    a = ap.parse_args()
    upstream_args = ["--num_epochs", str(a.epochs), "--max_len", str(a.max_len), "--emb_dim", str(a.emb_dim),
                     "--dupe_factor", str(a.dupe_factor), "--val_batch_size", "305", "--test_batch_size", "305"]
    result: dict = {"upstream": "pytorch/torchrec examples/bert4rec", "repo": str(Path(a.repo).resolve()),
                    "ratings": a.ratings, "upstream_args": upstream_args,
                    "note": "test batches of 305 users (610 users: two equal batches), so the example's mean over "
                            "batches is the mean over users, as recompress averages"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "ml").mkdir()
        opener = gzip.open if a.ratings.endswith(".gz") else open
        with opener(a.ratings, "rb") as src, open(work / "ml" / "ratings.csv", "wb") as dst:
            shutil.copyfileobj(src, dst)
        kept = Path(a.upstream_dir or work / "upstream")
        if not (kept / "upstream.json").exists():
            kept.mkdir(parents=True, exist_ok=True)
            up = train_upstream(Path(a.repo).resolve(), work / "ml" / "ratings.csv", kept, upstream_args)
            (kept / "upstream.json").write_text(json.dumps(up) + "\n")
        up = json.loads((kept / "upstream.json").read_text())
        if not (kept / "dcp").exists():
            sharded_saves(Path(a.repo).resolve(), kept / f"epoch_{a.epochs}_model.pth", kept, up["items"] + 2,
                          upstream_args)
        result["printed_by_upstream"] = up["printed"]
        result["train_seconds"] = up["train_seconds"]
        model, data = kept / f"epoch_{a.epochs}_model.pth", work / "data"
        rc = [sys.executable, "-m", "recompress"]
        result["inspect"] = json.loads(run([*rc, "inspect", str(model), "--json"]))["hparam_source"]
        run([*rc, "data", "sequences", str(work / "ml" / "ratings.csv"), "--layout", "torchrec", "--seed", "0",
             "-o", str(data)])
        import numpy as np

        users = np.load(data / "user_ids.npy")
        ids = np.load(data / "item_ids.npy")
        mine = np.load(data / "negatives.npy")
        items = np.load(data / "items.npy")
        ends = np.load(data / "offsets.npy")[1:]
        same = [[int(ids[items[e - 1]]), *map(int, ids[n])] == up["candidates"][str(u)]
                for u, e, n in zip(users, ends, mine)]
        result["candidates_identical"] = {"users": len(same), "identical": int(sum(same))}
        heads = ["--hp", "heads=2"]  # the example's --nhead default, as trained here; its file does not say
        evaluate = ["evaluate", "--data", str(data), "--protocol", "sampled", "--no-latency", *heads]
        run([*rc, *evaluate, str(model), "--json", str(work / "base.json")])
        metrics = lambda f: at_ks(json.loads((work / f).read_text()))
        for name in ("dmp_model.pth", "dcp"):  # the same weights saved sharded (DMP), then through DCP
            run([*rc, *evaluate, str(kept / name), "--json", str(work / "sharded.json")])
            result.setdefault("sharded_saves", {})[name] = {"same_as_ddp_file": metrics("sharded.json") ==
                                                            metrics("base.json"), **metrics("sharded.json")}
        run([*rc, *evaluate[:-2], "--hp", "heads=4", str(model), "--json", str(work / "heads4.json")])
        result["read_with_4_heads"] = metrics("heads4.json")
        run([*rc, "checkpoint", str(model), *heads, "--method", "int8", "-o", str(work / "int8")])
        run([*rc, "evaluate", str(work / "int8"), "--data", str(data), "--protocol", "sampled", "--no-latency",
             "--compare", str(work / "base.json"), "--json", str(work / "int8.json")])
        base, q = (json.loads((work / f).read_text()) for f in ("base.json", "int8.json"))
        result["recompress"] = {"users": base["data"]["rows"], **metrics("base.json")}
        result["int8"] = metrics("int8.json")
        result["int8_vs_base"] = q["compare"]
        result["bytes"] = {"base": base["bytes"], "int8": q["bytes"]}
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("printed_by_upstream", "recompress", "int8", "candidates_identical")},
                     indent=1))


if __name__ == "__main__":
    main()
