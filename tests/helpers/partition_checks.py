"""The books of a partition test: what the independent client (netns_load.py) recorded, checked
against what Postgres holds.

- lost: an acknowledged increment missing from storage. Per object, the stored value must be at
  least the number of acknowledgements and at least every acknowledged value (each reply
  reported a value that was durable when it left).
- double-applied: two acknowledgements reporting the same value (one increment applied over
  another's result, or one applied twice), or more stored than attempted.
- unavailability: per object, the longest stretch without an acknowledgement that overlaps the
  fault window; the recovery of a fault is the worst object's.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

RESULTS: list[str] = []


@dataclass
class Books:
    fault: str
    requests: int = 0
    acked: int = 0
    lost: int = 0
    double_applied: int = 0
    #: per object, seconds without an acknowledgement around the fault
    unavailable: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)

    @property
    def recovery(self) -> float:
        return max(self.unavailable.values(), default=0.0)

    def row(self) -> str:
        median = statistics.median(self.unavailable.values()) if self.unavailable else 0.0
        return (f"{self.fault:<44} {self.requests:>8} {self.acked:>8} {self.lost:>5} {self.double_applied:>7} "
                f"{self.recovery:>9.2f} {median:>7.2f}  {dict(sorted(self.errors.items()))}")


HEADER = (f"{'fault':<44} {'requests':>8} {'acked':>8} {'lost':>5} {'double':>7} "
          f"{'recovery':>9} {'median':>7}  errors")


def check(fault: str, record: dict[str, Any], stored: dict[str, int], window: tuple[float, float]) -> Books:
    """The books of one run; ``window`` is the fault's (start, end) on the wall clock."""
    books = Books(fault)
    start, end = window
    for oid, rec in record["objects"].items():
        acks = rec["acks"]
        books.requests += rec["attempted"]
        books.acked += len(acks)
        for e in rec["errors"]:
            books.errors[e[0]] = books.errors.get(e[0], 0) + 1
        value = stored.get(oid, 0)
        final = record["final"].get(oid)
        if final is not None and final != value:
            books.violations.append(f"{oid[:12]}: read {final} through the object, {value} in do_storage")
        values = [v for _, v in acks]
        top = max(values, default=0)
        lost = max(0, len(acks) - value, top - value)
        if lost:
            books.violations.append(f"{oid[:12]}: {len(acks)} acknowledged (highest {top}), {value} stored")
        books.lost += lost
        dup = len(values) - len(set(values))
        over = max(0, value - rec["attempted"])
        if dup or over:
            books.violations.append(f"{oid[:12]}: {dup} repeated acknowledged values, {over} stored beyond attempted")
        books.double_applied += dup + over
        times = sorted(t for t, _ in acks)
        gap = 0.0
        prev = None
        for t in times:
            if prev is not None and t >= start and prev <= end:
                gap = max(gap, t - max(prev, start))
            prev = t
        if prev is None or prev < end:  # never answered again after the fault
            gap = float("inf")
        books.unavailable[oid] = gap
    RESULTS.append(books.row())
    return books
