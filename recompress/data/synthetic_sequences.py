"""SYNTHETIC item sequences with a planted structure a sequential model can learn.

Items fall into ``clusters``; each cluster orders its items in a cycle. A user starts in a random
cluster, and each next item is, with probability ``follow``, the successor of the previous item in its
cluster's cycle (so the history predicts the next item), with probability ``switch`` the start of a
walk in another random cluster, and otherwise a popular item (Zipf over all items). Timestamps grow
with exponential gaps that are short inside a walk and long after a switch, so a model with a time bias
(HSTU) has a real signal too. Every output says ``synthetic: true``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recompress.errors import UserError

from .sequences import write_sequences


def make_synthetic_sequences(out: str | Path, *, users: int = 5000, items: int = 2000, mean_len: int = 20,
                             clusters: int = 40, follow: float = 0.7, switch: float = 0.1, zipf: float = 1.1,
                             seed: int = 0, overwrite: bool = False) -> Path:
    if users < 1 or items < clusters or clusters < 1 or mean_len < 3 or not 0 <= follow + switch <= 1:
        raise UserError("synthetic sequences need users >= 1, items >= clusters >= 1, mean_len >= 3 and "
                        "follow + switch <= 1", "fix the generator options")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(items) + 1
    members = np.array_split(perm, clusters)
    cluster_of = np.empty(items + 1, dtype=np.int64)
    position = np.empty(items + 1, dtype=np.int64)
    for c, m in enumerate(members):
        cluster_of[m], position[m] = c, np.arange(len(m))
    popular = rng.permutation(items) + 1
    weights = 1.0 / np.arange(1, items + 1) ** zipf
    weights /= weights.sum()
    draws = iter(popular[rng.choice(items, size=users * mean_len * 4, p=weights)].tolist())
    seqs, times = [], []
    for _ in range(users):
        n = max(3, int(rng.geometric(1.0 / mean_len)))
        c = int(rng.integers(clusters))
        cur = int(members[c][rng.integers(len(members[c]))])
        seq, t, clock = [cur], [0], 0.0
        for _ in range(n - 1):
            u = rng.random()
            if u < follow:
                m = members[cluster_of[cur]]
                cur = int(m[(position[cur] + 1) % len(m)])
                clock += rng.exponential(600.0)
            elif u < follow + switch:
                c = int(rng.integers(clusters))
                cur = int(members[c][rng.integers(len(members[c]))])
                clock += rng.exponential(86_400.0)
            else:
                cur = next(draws, int(popular[0]))
                clock += rng.exponential(3_600.0)
            seq.append(cur)
            t.append(int(clock))
        seqs.append(seq)
        times.append(t)
    return write_sequences(out, list(range(users)), seqs, times, overwrite=overwrite,
                           meta={"source": "synthetic", "format": "synthetic", "synthetic": True,
                                 "generator": {"users": users, "items": items, "mean_len": mean_len,
                                               "clusters": clusters, "follow": follow, "switch": switch,
                                               "zipf": zipf, "seed": seed}})
