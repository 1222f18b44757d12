"""Benchmark (not a test): a dlrm_v3 checkpoint written by generative-recommenders' own code, read by recompress.

    GR_PYTHON bench/upstream_dlrm_v3.py GR_REPO --out bench/results/upstream_dlrm_v3.json

GR_PYTHON: an interpreter with torch, TorchRec (``fbgemm-gpu-cpu`` with ``--no-deps``), gin-config and recompress
(this project's environment plus ``pip install gin-config``); GR_REPO: a generative-recommenders checkout (read at
2e81fab). The script builds ``DlrmHSTU`` with ``get_hstu_configs("movielens-1m")`` and its table configs (the tables
cut to 1,000 rows, ``max_seq_len`` 64; STU layers, heads and widths as configured), shards its ``EmbeddingCollection`` with TorchRec's ``DistributedModelParallel`` (one gloo
process on the CPU) and saves it with ``dlrm_v3/checkpoint.py``'s ``save_dmp_checkpoint``, as ``train_loop`` does.
Then ``recompress inspect`` describes the folder (its tables against the upstream table configs), the messages
for each part given alone are recorded, and ``export`` rebuilds it (family ``dlrm_hstu``) and writes ONNX.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("repo")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    sys.path.insert(0, a.repo)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
    import torch
    import torch.distributed as dist
    from generative_recommenders.dlrm_v3.checkpoint import save_dmp_checkpoint
    from generative_recommenders.dlrm_v3.configs import get_embedding_table_config, get_hstu_configs
    from generative_recommenders.modules.dlrm_hstu import DlrmHSTU
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = get_hstu_configs("movielens-1m")
    cfg.max_seq_len = 64
    tables = get_embedding_table_config("movielens-1m")
    for t in tables.values():
        t.num_embeddings = 1000
    torch.manual_seed(0)
    model = DlrmHSTU(cfg, tables, is_inference=False)
    sharder = EmbeddingCollectionSharder()
    plan = EmbeddingShardingPlanner(topology=Topology(world_size=1, compute_device="cpu")).collective_plan(
        model, [sharder], dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan, sharders=[sharder])
    optimizer = torch.optim.Adam([p for n, p in dmp.named_parameters() if "embedding_collection" not in n])
    work = Path(tempfile.mkdtemp())
    try:
        save_dmp_checkpoint(dmp, optimizer, 0, str(work / "ckpt"))
        dist.destroy_process_group()
        folder = next((work / "ckpt").iterdir())
        run = lambda *args: subprocess.run([sys.executable, "-m", "recompress", *map(str, args)], capture_output=True,
                                           text=True)
        described = run("inspect", folder, "--json")
        info = json.loads(described.stdout)
        expected = {n: {"rows": t.num_embeddings, "dim": t.embedding_dim, "dtype": str(t.data_type).split(".")[-1]}
                    for n, t in tables.items()}
        dense_only, sparse_only = work / "dense_only", work / "sparse_only"
        shutil.copytree(folder, dense_only, ignore=shutil.ignore_patterns("sparse"))
        shutil.copytree(folder, sparse_only, ignore=shutil.ignore_patterns("non_sparse.ckpt"))
        said = {name: run(*args).stderr.strip().splitlines()[-1] for name, args in {
            "sparse part given": ("inspect", folder / "sparse"),
            "dense part only": ("inspect", dense_only),
            "sparse part only": ("inspect", sparse_only)}.items()}
        exported = run("export", folder, "-o", work / "exported")  # rebuilt as dlrm_hstu: ONNX, checked for parity
        said["export"] = {"exit": exported.returncode,
                          "said": (exported.stdout + exported.stderr).strip().splitlines()[-1]}
        result = {
            "upstream": "facebookresearch/generative-recommenders@2e81fab, dlrm_v3 save_dmp_checkpoint",
            "config": {"dataset": "movielens-1m", "table_rows": 1000, "max_seq_len": 64,
                       "stu_layers": cfg.hstu_attn_num_layers, "heads": cfg.hstu_num_heads,
                       "transducer_dim": cfg.hstu_transducer_embedding_dim},
            "files": sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()),
            "inspect_exit": described.returncode, "format": info["format"], "family": info["family"],
            "tables": {t["name"]: {k: t[k] for k in ("rows", "dim", "dtype")} for t in info["tables"]},
            "upstream_tables": expected, "notes": info.get("notes"), "messages": said}
        result["tables_match_upstream"] = all(
            result["tables"].get(n) == {**e, "dtype": {"FP16": "float16", "FP32": "float32"}[e["dtype"]]}
            for n, e in expected.items()) and len(result["tables"]) == len(expected)
    finally:
        shutil.rmtree(work)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
