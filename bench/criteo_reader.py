"""Benchmark (not a test): the Criteo TSV reader's rows/s and peak memory on a generated Criteo-format file.

    python bench/criteo_reader.py --out bench/results/criteo_reader.json [--rows 5000000] [--baseline REF]

The file has Criteo's layout (label, I1-I13 integers with ~10% empty, C1-C26 8-hex-digit hashes with ~5%
empty), ids drawn Zipf(1.1) over dlrm's Kaggle vocabulary sizes, so the vocabularies grow as they do on
real data. ``recompress data criteo FILE`` runs in its own process under ``/usr/bin/time -v`` (wall time
over both passes, maximum resident set size). With ``--baseline REF`` the reader of git revision REF runs
too, interleaved with this checkout's (ABAB), so the two are compared within one run. With ``--profile``
the reader runs in this process under cProfile instead, its background thread disabled so that parsing is
attributed, and the JSON lists where the time went.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

KAGGLE = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992, 5461306,
          10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]  # dlrm tools/visualize.py
CHUNK = 500_000
RUN = """
import sys
sys.path.insert(0, sys.argv[1])
from recompress.data.criteo import prepare_criteo
prepare_criteo(sys.argv[2], sys.argv[3])
"""


def generate(path: Path, rows: int, seed: int = 0) -> int:
    """Write a Criteo-format TSV of ``rows`` lines; returns its bytes."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    rng = np.random.default_rng(seed)
    hashes = [rng.choice(1 << 32, size=min(v, rows), replace=False) for v in KAGGLE]
    with open(path, "wb") as f:
        for s in range(0, rows, CHUNK):
            n = min(CHUNK, rows - s)
            cols = {"label": pa.array(rng.random(n) < 0.25, pa.int8())}
            for j in range(13):
                v = np.floor(rng.exponential(20.0 * (j + 1), n)).astype(np.int64) - (j == 1)  # I2 may be -1
                cols[f"I{j + 1}"] = pa.array(v, mask=rng.random(n) < 0.1)
            for j, h in enumerate(hashes):
                ids = np.minimum(rng.zipf(1.1, n) - 1, len(h) - 1)
                text = np.char.zfill(np.char.mod("%x", h[ids]), 8)
                cols[f"C{j + 1}"] = pa.array(text, mask=rng.random(n) < 0.05)
            pcsv.write_csv(pa.table(cols), f, pcsv.WriteOptions(include_header=False, delimiter="\t",
                                                                 quoting_style="none"))
    return path.stat().st_size


def profile(path: Path, out: Path) -> list[dict]:
    """cProfile of ``prepare_criteo`` (single-threaded): the functions with the most own time."""
    import cProfile
    import pstats

    from recompress.data import criteo

    criteo._ahead = lambda items, depth=2: items  # parse on this thread, so that cProfile sees it
    prof = cProfile.Profile()
    prof.runcall(criteo.prepare_criteo, path, out)
    stats = pstats.Stats(prof).stats
    rows = [{"function": f"{Path(f).name}:{line}({name})", "calls": nc, "own_seconds": round(tt, 3),
             "cumulative_seconds": round(ct, 3)} for (f, line, name), (_, nc, tt, ct, _) in stats.items()]
    return sorted(rows, key=lambda r: -r["own_seconds"])[:12]


def main() -> None:
    from measure import checkouts, timed  # bench/measure.py, beside this script

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--baseline", default=None, help="git revision whose reader runs too, interleaved")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="profile this checkout's reader instead of timing it")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        size = generate(tmp / "train.txt", a.rows)
        os.sync()  # the file's dirty pages written back before anything is timed
        print(f"generated {a.rows:,} rows, {size:,} bytes in {time.perf_counter() - t0:.0f} s", flush=True)
        if a.profile:
            t0 = time.perf_counter()
            top = profile(tmp / "train.txt", tmp / "ds")
            Path(a.out).write_text(json.dumps({"machine": "2 CPU cores, 24 GB", "rows": a.rows, "file_bytes": size,
                                               "profiled_seconds": round(time.perf_counter() - t0, 2),
                                               "top_own_time": top}, indent=2) + "\n")
            return
        results = []
        with checkouts(a.baseline, tmp / "baseline") as readers:
            for rep in range(a.repeats):
                for name, root in readers.items():
                    out = tmp / f"ds-{rep}-{len(results)}"
                    r = {"reader": name, "repeat": rep, **timed([sys.executable, "-c", RUN, str(root),
                                                                 str(tmp / "train.txt"), str(out)])}
                    meta = json.loads((out / "meta.json").read_text())
                    r["rows_per_second"] = round(a.rows / r["seconds"])
                    r["vocabulary_rows"] = sum(t["rows"] for t in meta["tables"])
                    results.append(r)
                    print(json.dumps(r), flush=True)
                    shutil.rmtree(out)
    Path(a.out).write_text(json.dumps({"machine": "2 CPU cores, 24 GB", "rows": a.rows, "file_bytes": size,
                                       "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
