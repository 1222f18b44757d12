"""``sasrec``: SASRec.pytorch's ``data_partition``: ids are the file's own integers (item N is row N; the table has
max id + 1 rows), users with fewer than 4 interactions are train-only there and are left out here (3 with
``--min-items 3``, its rule before 2025-09), and the sampled protocol draws its negatives as its ``evaluate``
does: uniform over 1..max id, redrawn while in the user's training items (so the validation item may be drawn,
and a negative may repeat)."""

from __future__ import annotations

from typing import Any

from . import Layout, Plan, Read


class SASRecPytorch(Layout):
    name = "sasrec"
    help = ("SASRec.pytorch's data_partition and evaluate: the file's own ids, users with 4+ items, negatives not "
            "in the user's training items")
    min_items = 4

    def plan(self, read: Read, *, min_items: int, **options: Any) -> Plan:
        return Plan(read.users, read.item_lists, read.time_lists, meta={"sampled_negatives": "not in train"},
                    keep_ids=True)


LAYOUT = SASRecPytorch()
