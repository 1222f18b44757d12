"""Progress for every user-facing step that takes more than a moment (on stderr; stdout is for results).

On a terminal: a rich progress bar. Elsewhere (CI logs, pipes): a plain line when a step starts, then
about every 10 seconds, and when it ends, so a long step is never silent.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from rich.console import Console

from . import distributed

console = Console(stderr=True)
LOG_EVERY_S = 10.0


@contextlib.contextmanager
def progress(description: str, total: float | None) -> Iterator[Callable[[float], None]]:
    """``with progress("training", total=steps) as advance: advance(1)``. Silent on ranks other than 0."""
    if not distributed.is_main():
        yield lambda n=1: None
        return
    if console.is_terminal:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=console, transient=False) as p:
            task = p.add_task(description, total=total)
            yield lambda n=1: p.advance(task, n)
        return
    done, t0 = 0.0, time.monotonic()
    last = t0

    def line(state: str) -> None:
        share = f" {done / total:.0%}" if total else ""
        sys.stderr.write(f"{description}:{share} ({done:,.0f}/{total or 0:,.0f}) {time.monotonic() - t0:.0f}s {state}\n")
        sys.stderr.flush()

    def advance(n: float = 1) -> None:
        nonlocal done, last
        done += n
        if time.monotonic() - last >= LOG_EVERY_S:
            last = time.monotonic()
            line("")

    sys.stderr.write(f"{description}: started\n")
    yield advance
    line("done")


def say(message: str) -> None:
    """A status line on stderr (stdout is reserved for results)."""
    console.print(message, highlight=False)
