"""durable.objects.balance.assign: the partition assignment every worker computes alone."""

from __future__ import annotations

import random

import pytest
from durable.objects.balance import assign

P = 256


def owners(assignment: dict[str, set[int]]) -> dict[int, str]:
    """Partition -> its worker; fails if a partition has two."""
    out: dict[int, str] = {}
    for worker, parts in assignment.items():
        for p in parts:
            assert p not in out, f"partition {p} owned by {out[p]} and {worker}"
            out[p] = worker
    return out


def moved(before: dict[str, set[int]], after: dict[str, set[int]]) -> int:
    a, b = owners(before), owners(after)
    return sum(a.get(p) != b.get(p) for p in range(P))


@pytest.mark.parametrize("partitions", [1, 7, 16, 256])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 16, 40])
def test_every_partition_has_exactly_one_owner_and_shares_differ_by_at_most_one(partitions: int, n: int) -> None:
    names = [f"worker-{i}" for i in range(n)]
    assignment = assign(partitions, names)
    assert set(assignment) == set(names)
    assert set(owners(assignment)) == set(range(partitions))
    sizes = sorted(len(s) for s in assignment.values())
    base, extra = divmod(partitions, n)
    assert sizes == [base] * (n - extra) + [base + 1] * extra  # exact capacities: within one of P / N


def test_no_workers_own_nothing() -> None:
    assert assign(P, []) == {}


def test_the_same_set_gives_the_same_assignment_in_any_order_and_with_repeats() -> None:
    names = [f"host-{i}-{i * 7919 % 1000}" for i in range(6)]
    expected = assign(P, names)
    rng = random.Random(5)
    for _ in range(5):
        shuffled = names + rng.sample(names, 3)
        rng.shuffle(shuffled)
        assert assign(P, shuffled) == expected
    assert assign(P, iter(reversed(names))) == expected  # any iterable


@pytest.mark.parametrize("n", range(2, 9))
@pytest.mark.parametrize("family", range(3))
def test_a_worker_joining_or_leaving_moves_about_p_over_n_partitions(n: int, family: int) -> None:
    """Rendezvous order keeps most partitions where they were: a joining worker takes about its
    share, a leaving one's share is spread; a few more move to keep the shares within one (the
    bound holds for P much larger than N, as with the default 256 partitions)."""
    names = [f"worker-{family}-{i}" for i in range(n)]
    now = assign(P, names)
    joined = assign(P, [*names, "joining"])
    assert P // (n + 1) <= moved(now, joined) <= 1.5 * P / (n + 1)
    left = assign(P, names[1:])
    assert len(now[names[0]]) <= moved(now, left) <= 1.5 * P / n
    assert names[0] not in left
