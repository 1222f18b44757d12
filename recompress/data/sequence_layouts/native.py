"""``recompress`` (the default layout): items numbered 1..N by first appearance in the kept users' sequences,
each user's interactions in time order (ties in file order); evaluation by recompress's rules."""

from __future__ import annotations

from . import Layout


class Native(Layout):
    name = "recompress"
    help = "ids numbered by first appearance"


LAYOUT = Native()
