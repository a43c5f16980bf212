"""Which partitions each live worker should own: balanced to within one of P / N, and stable.

Every worker computes the same assignment from the same set of live workers, so no
coordinator is needed: Postgres (the advisory locks) arbitrates while views briefly differ.
A partition prefers workers in rendezvous-hash order, so a membership change moves few
partitions; capacities are exact (``P mod N`` workers take one more than ``P // N``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def _rank(partition: int, worker: str) -> int:
    digest = hashlib.blake2b(f"{partition}:{worker}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign(partitions: int, workers: Iterable[str]) -> dict[str, set[int]]:
    """Partition sets by worker; every partition has exactly one worker."""
    names = sorted(set(workers))
    if not names:
        return {}
    base, extra = divmod(partitions, len(names))
    owned: dict[str, set[int]] = {w: set() for w in names}
    bigger = 0  # workers already holding base + 1
    for p in range(partitions):
        for w in sorted(names, key=lambda w: _rank(p, w), reverse=True):
            n = len(owned[w])
            if n < base or (n == base and bigger < extra):
                if n == base:
                    bigger += 1
                owned[w].add(p)
                break
    return owned
