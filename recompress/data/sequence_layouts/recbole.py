"""``recbole``: RecBole's sequential pipeline for atomic files (leave-one-out, time order): items numbered by
first appearance in the file (every item of the file has a row, the dropped users' too), each user's
interactions sorted by the timestamp min-max scaled to float32 (ties in file order), and full ranking excludes
only the padding item, not the user's history (RecBole masks only [PAD] for sequential models)."""

from __future__ import annotations

from typing import Any

from . import Layout, Plan, Read


class RecBole(Layout):
    name = "recbole"
    help = "RecBole's atomic-file pipeline: ids by first appearance in the file, its float32 time order, full " \
           "ranking over every item"
    order = "recbole"

    def plan(self, read: Read, *, min_items: int, **options: Any) -> Plan:
        return Plan(read.users, read.item_lists, read.time_lists, meta={"full_ranking_excludes": "padding"},
                    item_order=read.first_seen)


LAYOUT = RecBole()
