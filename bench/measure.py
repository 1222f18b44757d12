"""Shared by the benchmarks: running a command (exit on failure), and one command's wall time and peak memory
from ``/usr/bin/time -v``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def timed(cmd: list[str], digits: int = 2, may_fail: bool = False) -> dict:
    """Run ``cmd`` (exit on failure, with its stderr, unless ``may_fail``: then its exit status and the end of
    its stderr are the result): wall seconds and maximum resident set size."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if p.returncode and may_fail:
        said = p.stderr.split("\tCommand being timed")[0].strip()  # the command's own words, not time's report
        return {"seconds": round(wall, digits), "failed": p.returncode, "stderr_tail": said[-600:]}
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024
    return {"seconds": round(wall, digits), "peak_rss_bytes": peak}


# Python that makes ``import recompress`` (and its stage packages recompress.compress/.evaluate/.export/.recipes,
# which live in top-level folders) come from the checkout at ``CHECKOUT``; an editable install of another
# checkout would otherwise supply the stages. A child process sets CHECKOUT (a path) and execs it first.
IMPORT_CHECKOUT = """
import sys
from importlib.util import spec_from_file_location
from pathlib import Path
sys.path.insert(0, CHECKOUT)
class _Stages:
    @staticmethod
    def find_spec(name, path=None, target=None):
        parts = name.split(".")
        if len(parts) == 2 and parts[0] == "recompress" and parts[1] in ("compress", "evaluate", "export", "recipes"):
            folder = Path(CHECKOUT, parts[1])
            return spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
        return None
sys.meta_path.insert(0, _Stages)
"""


# Runs recompress's CLI (argv[3:]) from the checkout argv[1] while a thread samples the process's own
# (anonymous) memory every 5 ms, which is what a copy of a table costs (pages mapped from files are the page
# cache's, which /usr/bin/time's maximum RSS counts too); writes the peak in bytes to the file argv[2].
ANON_PEAK = """
import re, sys, threading, time
CHECKOUT = sys.argv[1]
exec(IMPORT_CHECKOUT)
peak, done = [0], [False]
def sample():
    while not done[0]:
        s = open("/proc/self/status").read()
        peak[0] = max(peak[0], int(re.search(r"RssAnon:\\s+(\\d+)", s).group(1)) << 10)
        time.sleep(0.005)
t = threading.Thread(target=sample)
t.start()
from recompress.cli import main
try:
    main(sys.argv[3:], standalone_mode=False)
finally:
    done[0] = True
    t.join()
    open(sys.argv[2], "w").write(str(peak[0]))
"""


def anon_peak_command(checkout: Path, peak_file: Path, args: list[str]) -> list[str]:
    """The command that runs ``recompress ARGS`` of ``checkout`` and writes its peak anonymous memory to
    ``peak_file`` (:data:`ANON_PEAK`)."""
    return [sys.executable, "-c", f"IMPORT_CHECKOUT = {IMPORT_CHECKOUT!r}\n{ANON_PEAK}", str(checkout),
            str(peak_file), *map(str, args)]


class MemoryLimit:
    """A memory cgroup (v1, ``/sys/fs/cgroup/memory``; needs root) that holds a command to ``limit`` bytes, page
    cache included, as a machine with that much memory would: file pages beyond it are written back and
    dropped, and the command is killed if its own memory cannot fit. ``prefix`` runs a command in it;
    ``usage()`` reads the group's peak and how often it hit the limit since the last ``reset()``."""

    ROOT = Path("/sys/fs/cgroup/memory")

    def __init__(self, limit: int) -> None:
        if not (self.ROOT / "memory.limit_in_bytes").exists():
            raise SystemExit(f"--memory-limit needs cgroup v1's memory controller at {self.ROOT} (and root)")
        self.group = self.ROOT / f"recompress-bench-{os.getpid()}"
        self.group.mkdir()
        (self.group / "memory.limit_in_bytes").write_text(str(limit))
        self.limit = limit
        self.prefix = ["sh", "-c", f'echo $$ > {self.group}/cgroup.procs && exec "$@"', "sh"]

    def reset(self) -> None:
        for f in ("memory.max_usage_in_bytes", "memory.failcnt"):
            (self.group / f).write_text("0")

    def usage(self) -> dict:
        read = lambda f: int((self.group / f).read_text())
        return {"memory_limit_bytes": self.limit, "group_peak_bytes": read("memory.max_usage_in_bytes"),
                "times_at_limit": read("memory.failcnt")}

    def close(self) -> None:
        self.group.rmdir()


@contextmanager
def checkouts(baseline: str | None, at: Path) -> Iterator[dict[str, Path]]:
    """{"this checkout": the repository, "baseline REV": a git worktree of REV made at ``at``} (the worktree only
    when ``baseline`` is given, and removed afterwards), for benchmarks that compare revisions in one run."""
    here = Path(__file__).resolve().parents[1]
    trees = {"this checkout": here}
    if baseline:
        subprocess.run(["git", "-C", str(here), "worktree", "add", "--detach", str(at), baseline], check=True,
                       capture_output=True)
        trees[f"baseline {baseline}"] = at
    try:
        yield trees
    finally:
        if baseline:
            subprocess.run(["git", "-C", str(here), "worktree", "remove", "--force", str(at)], check=False)


def run(cmd: list[str], cwd: Path | None = None) -> str:
    """Run ``cmd`` (echoed), its stdout; on failure exit with the command and the tails of its output."""
    print("$", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def recompress(*args: str) -> str:
    """``python -m recompress ARGS`` in this interpreter, through :func:`run`."""
    return run([sys.executable, "-m", "recompress", *args])
