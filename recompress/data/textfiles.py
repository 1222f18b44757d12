"""Text files the dataset readers take: plain or gzip, UTF-8 (a BOM skipped), CSV through one reader."""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recompress.errors import UserError


def open_text(path: Path) -> io.TextIOBase:
    """``path`` as text, gzip or plain."""
    raw = open(path, "rb")
    head = raw.read(2)
    raw.seek(0)
    return io.TextIOWrapper(gzip.GzipFile(fileobj=raw) if head == b"\x1f\x8b" else raw, encoding="utf-8-sig",
                            errors="strict")


def read_csv(path: Path, parse: Callable[[Any], Any], hint: str) -> Any:
    """``parse`` over a ``csv.reader`` of ``path`` (gzip or plain, a BOM skipped); a file that is not UTF-8 CSV
    is one message. Fields may be long: a user's whole history is one (pandas, which upstream reads with, has
    no limit)."""
    csv.field_size_limit(1 << 30)
    with open_text(path) as f:
        try:
            return parse(csv.reader(f))
        except (UnicodeDecodeError, csv.Error) as e:
            raise UserError(f"{path} is not a readable CSV ({str(e)[:80]})", hint) from None
