"""Shared by the memory benchmarks: one command's wall time and peak memory, from ``/usr/bin/time -v``."""

from __future__ import annotations

import re
import subprocess
import time


def timed(cmd: list[str], digits: int = 2) -> dict:
    """Run ``cmd`` (exit on failure, with its stderr): wall seconds and maximum resident set size."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024
    return {"seconds": round(wall, digits), "peak_rss_bytes": peak}
