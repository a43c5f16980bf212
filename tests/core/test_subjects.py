"""durable.core.wire: the partition hash (FNV-1a 32, as nats-server's ``partition()``
transform computes it) and the subjects built on it."""

from __future__ import annotations

import pytest
from durable.core.wire import (
    fnv1a_32,
    is_token,
    partition_filter,
    partition_of,
    partition_queue,
    request_subject,
    server_mapping,
)


@pytest.mark.parametrize(("data", "expected"), [
    (b"", 0x811C9DC5),  # the offset basis
    (b"a", 0xE40C292C),
    (b"foobar", 0xBF9CF968),
    (b"\x00", 0x050C5D1F),  # published vectors of the FNV test suite
])
def test_fnv1a_32_known_vectors(data: bytes, expected: int) -> None:
    assert fnv1a_32(data) == expected


def test_partition_of_is_the_hash_of_the_id_text_modulo_the_partitions() -> None:
    oid = "0f" * 32
    for partitions in (1, 16, 256, 1000):
        assert partition_of(oid, partitions) == fnv1a_32(oid.encode()) % partitions
    assert partition_of(oid, 1) == 0


def test_partitions_of_many_ids_spread_over_every_partition() -> None:
    ids = [f"{i:064x}" for i in range(4096)]
    counts = [0] * 16
    for oid in ids:
        counts[partition_of(oid, 16)] += 1
    assert min(counts) > 4096 / 16 / 2  # no partition starved


def test_subjects_filters_and_queues() -> None:
    oid = "ab" * 32
    assert request_subject(7, "Counter", oid, "rpc.increment") == f"dop.7.Counter.{oid}.rpc.increment"
    assert partition_filter(7) == "dop.7.>"
    assert partition_queue(7) == "p7"
    assert server_mapping(256) == '"do.*.*.>": "dop.{{partition(256,2)}}.{{wildcard(1)}}.{{wildcard(2)}}.>"'


@pytest.mark.parametrize(("token", "ok"), [
    ("Counter", True), ("rate_limiter-2", True), ("", False), ("a.b", False), ("a b", False), ("*", False),
    (">", False), ("é", False), ("a\n", False),
])
def test_only_safe_subject_tokens_are_tokens(token: str, ok: bool) -> None:
    assert is_token(token) is ok
