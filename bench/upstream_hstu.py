"""Benchmark (not a test): does recompress compute what generative-recommenders' research HSTU computes, from the
checkpoints its own code saves?

    python bench/upstream_hstu.py --repo GR_REPO --python HSTU_PYTHON --out bench/results/upstream_hstu.json

``bench/upstream_hstu_build.py`` runs under HSTU_PYTHON (torch, gin-config, pandas) against the
generative-recommenders checkout GR_REPO: two small research HSTUs (2 blocks, d 16: 2 heads with
gr_output_length 3, and 1 head with the default 10) trained 2 epochs by train.py's step and saved by its
line, plus the user embeddings and item scores its eval computes for 16 users, with and without timestamps.
Here recompress reads each checkpoint (``inspect``, then ``load_any``: nothing else is told), feeds the same
users as its own left-padded windows (the timestamps with the target's time last), and records the largest
difference; then the same after int8 rows. Without timestamps the research model adds no relative bias at
all, which recompress's HSTU does not do: those batches are recorded apart, not compared.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def windows(batch: dict, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's right-padded ids [B, N] and timestamps [B, N] (the target's time at index length) ->
    recompress's left-padded history [B, L] and timestamps [B, L + 1]."""
    ids, lengths, ts = batch["past_ids"], batch["past_lengths"], batch["timestamps"]
    hist = torch.zeros(len(ids), length, dtype=torch.long)
    times = torch.zeros(len(ids), length + 1, dtype=torch.long)
    for r, n in enumerate(lengths.tolist()):
        hist[r, length - n:] = ids[r, :n]
        times[r, length - n:] = ts[r, :n + 1]
    return hist, times


def compare(model: torch.nn.Module, refs: list[dict]) -> dict:
    length, items = model.hparams["max_len"], model.hparams["num_items"]
    worst = {"users": 0, "max_abs_diff_user_embedding": 0.0, "max_abs_diff_scores": 0.0}
    with torch.no_grad():
        for b in refs:
            hist, times = windows(b, length)
            user = model.encode(hist, times)[:, -1]
            scores = model(hist, torch.arange(1, items + 1)[None], times)
            worst["users"] += len(hist)
            worst["max_abs_diff_user_embedding"] = max(worst["max_abs_diff_user_embedding"],
                                                       float((user - b["user_embedding"]).abs().max()))
            worst["max_abs_diff_scores"] = max(worst["max_abs_diff_scores"], float((scores - b["scores"][:, 1:]).abs().max()))
    return worst


def main() -> None:
    from measure import recompress as run  # bench/measure.py, beside this script

    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True, help="a facebookresearch/generative-recommenders checkout")
    ap.add_argument("--python", required=True, help="an interpreter with torch, gin-config and pandas")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from recompress.adapters import load_any
    from recompress.checkpoint import load_checkpoint

    commit = subprocess.run(["git", "-C", a.repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result: dict = {"upstream": f"facebookresearch/generative-recommenders@{commit or 'unknown'}", "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([a.python, str(HERE / "upstream_hstu_build.py"), a.repo, str(work)], check=True)
        for ref_file in sorted(work.glob("*_reference.pt")):
            ref = torch.load(ref_file, weights_only=True)
            ckpt = work / ref["hparams"]["checkpoint"]
            info = json.loads(run("inspect", str(ckpt), "--json"))
            timed = [b for b in ref["batches"] if b["with_timestamps"]]
            run("checkpoint", str(ckpt), "--method", "int8", "-o", str(work / "q"), "--overwrite")
            result["models"][ref_file.name.removesuffix("_reference.pt")] = {
                "checkpoint": ref["hparams"]["checkpoint"], "format": info["format"],
                "hparams": {k: info["hparams"][k] for k in ("max_len", "heads", "blocks", "attn_norm", "variant")},
                "hparam_source": {k: info["hparam_source"][k] for k in ("max_len", "heads", "attn_norm")},
                "with_timestamps": compare(load_any(ckpt).model.eval(), timed),
                "int8_with_timestamps": compare(load_checkpoint(work / "q").model.eval(), timed),
                "without_timestamps_not_compared": sum(len(b["past_ids"]) for b in ref["batches"]
                                                       if not b["with_timestamps"])}
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
