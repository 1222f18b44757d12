"""Benchmark (not a test): does recompress score a model SASRec.pytorch trained as SASRec.pytorch does?

    python bench/upstream_sasrec.py --repo /path/to/SASRec.pytorch/python \
        --data ../shared/data/seq_sasrec_amazon_video_games/Video.txt.gz --out bench/results/upstream_sasrec.json

The upstream code is not part of recompress: pass a checkout of pmixer/SASRec.pytorch (its ``python/``
folder). This script copies the data file into that checkout's ``data/``, runs its own ``main.py`` to
train (``--epochs``, on the CPU; it evaluates and saves at the last epoch), then runs its
``--inference_only`` evaluation ``--repeats`` times (each draws other negatives and, above 10,000 users,
another sample of users), and prints what it printed. recompress then reads the same ``.pth`` (with the
``args.txt`` ``main.py`` wrote), prepares the file with ``--layout sasrec``, evaluates the sampled
protocol on every user, compresses the item table to int8 and evaluates again (paired, same users and
candidates), and reads it three wrong ways for contrast (padding masked, the other two block wirings).
Everything lands in one JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

TEST = re.compile(r"test \(NDCG@10: ([\d.]+), HR@10: ([\d.]+)\)")


def main() -> None:
    from measure import run  # bench/measure.py, beside this script

    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", required=True, help="SASRec.pytorch's python/ folder")
    ap.add_argument("--data", required=True, help="a 'u i' pairs file (gzip or plain), e.g. Video.txt.gz")
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--maxlen", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint", default=None, help="skip training: a .pth main.py wrote (args.txt beside it)")
    a = ap.parse_args()
    repo, name = Path(a.repo).resolve(), Path(a.data).name.split(".")[0]
    (repo / "data").mkdir(exist_ok=True)
    opener = gzip.open if a.data.endswith(".gz") else open
    with opener(a.data, "rb") as src, open(repo / "data" / f"{name}.txt", "wb") as dst:
        shutil.copyfileobj(src, dst)
    common = [f"--dataset={name}", "--device=cpu", f"--maxlen={a.maxlen}"]
    result: dict = {"upstream": "pmixer/SASRec.pytorch", "repo": str(repo), "data": a.data, "epochs": a.epochs,
                    "maxlen": a.maxlen}
    if a.checkpoint is None:
        t0 = time.time()
        out = run([sys.executable, "main.py", *common, "--train_dir=bench", f"--num_epochs={a.epochs}"], cwd=repo)
        result["train_seconds"] = round(time.time() - t0, 1)
        result["printed_at_training"] = [{"ndcg@10": float(n), "hr@10": float(h)} for n, h in TEST.findall(out)]
        folder = repo / f"{name}_bench"
        ckpt = next(folder.glob(f"SASRec.epoch={a.epochs}.*.pth"))
    else:
        ckpt = Path(a.checkpoint).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "run").mkdir()
        shutil.copy(ckpt, work / "run" / ckpt.name)
        shutil.copy(ckpt.parent / "args.txt", work / "run" / "args.txt")  # before --inference_only rewrites it
        printed = []
        for _ in range(a.repeats):
            out = run([sys.executable, "main.py", *common, "--train_dir=bench_eval", "--inference_only=true",
                       f"--state_dict_path={ckpt}"], cwd=repo)
            n, h = TEST.findall(out)[-1]
            printed.append({"ndcg@10": float(n), "hr@10": float(h)})
        result["printed_by_upstream"] = printed
        model, data = work / "run" / ckpt.name, work / "data"
        rc = [sys.executable, "-m", "recompress"]
        result["inspect"] = json.loads(run([*rc, "inspect", str(model), "--json"]))["hparam_source"]
        run([*rc, "data", "sequences", a.data, "--layout", "sasrec", "-o", str(data)])
        run([*rc, "evaluate", str(model), "--data", str(data), "--protocol", "sampled", "--no-latency",
             "--json", str(work / "base.json")])
        ablations = {}  # what reading it another way would score: the padding mask, the other wirings
        for name, hp in (("padding masked", "attend_padding=false"), ("pre-ln wiring", "wiring=pre-ln"),
                         ("pmixer-2020 wiring", "wiring=pmixer-2020")):
            run([*rc, "evaluate", str(model), "--data", str(data), "--protocol", "sampled", "--no-latency",
                 "--hp", hp, "--json", str(work / "ablation.json")])
            r = json.loads((work / "ablation.json").read_text())["accuracy"]["torch"]
            ablations[name] = {"hp": hp, "ndcg@10": r["ndcg@10"], "hr@10": r["hr@10"]}
            (work / "ablation.json").unlink()
        result["read_otherwise"] = ablations
        run([*rc, "checkpoint", str(model), "--method", "int8", "-o", str(work / "int8")])
        run([*rc, "evaluate", str(work / "int8"), "--data", str(data), "--protocol", "sampled", "--no-latency",
             "--compare", str(work / "base.json"), "--json", str(work / "int8.json")])
        base, q = (json.loads((work / f).read_text()) for f in ("base.json", "int8.json"))
        result["recompress"] = {"users": base["data"]["rows"], **{k: base["accuracy"]["torch"][k] for k in
                                                                  ("ndcg@10", "hr@10")}}
        result["int8"] = {k: q["accuracy"]["torch"][k] for k in ("ndcg@10", "hr@10")}
        result["int8_vs_base"] = q["compare"]
        result["bytes"] = {"base": base["bytes"], "int8": q["bytes"]}
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("printed_by_upstream", "recompress", "int8", "int8_vs_base")}, indent=1))


if __name__ == "__main__":
    main()
