"""Benchmark (not a test): what ``recompress inspect`` costs on a big upstream checkpoint.

    python bench/inspect_memory.py --out bench/results/inspect_dcp.json [--rows 10000000] [--baseline REF]

A TorchRec DLRM with one ``rows x 64`` table saved as a DCP folder (``stream_memory.make_dcp``) is inspected
by ``python -m recompress inspect`` in its own process under ``/usr/bin/time -v`` (wall time, maximum resident
set size). With ``--baseline REF`` the same command of git revision REF (a worktree, run from its folder so
that its package is the one imported) runs too, interleaved (ABAB), and both outputs must be the same text.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from measure import checkouts, timed  # bench/measure.py, beside this script
from stream_memory import make_dcp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--baseline", default=None, help="git revision whose inspect runs too, interleaved")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        src = Path(tmp) / "dcp"
        table = make_dcp(src, a.rows, 64)
        with checkouts(a.baseline, Path(tmp) / "baseline") as trees:
            outputs = {}
            for repeat in range(a.repeats):
                for name, tree in trees.items():
                    cmd = [sys.executable, "-m", "recompress", "inspect", str(src)]
                    outputs[name] = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, check=True).stdout
                    r = {"code": name, "repeat": repeat, "rows": a.rows, "table_bytes": table,
                         **timed(["env", "-C", str(tree), *cmd])}
                    results.append(r)
                    print(json.dumps(r), flush=True)
            if len(set(outputs.values())) != 1:
                raise SystemExit(f"the outputs differ: {outputs}")
    Path(a.out).write_text(json.dumps({"machine": "2 CPU cores, 24 GB", "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
