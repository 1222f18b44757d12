"""``recompress`` / ``python -m recompress``: the command line, with Ctrl-C handled even during start-up."""

from __future__ import annotations

import sys


def entry() -> None:
    try:
        from .cli import main
        main(prog_name="recompress")
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; no partial output was kept\n")
        sys.exit(130)


if __name__ == "__main__":
    entry()
