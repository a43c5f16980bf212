"""NATS subjects of durable.

Canonical subject: ``do.<namespace>.<object-id>.<verb>`` (verb: ``rpc.<method>``, ``fetch``, ...).
Workers subscribe per partition to ``dop.<partition>.<namespace>.<object-id>.<verb>``; the
partition is ``fnv1a_32(object-id) mod P``, the same hash as the NATS ``partition(P, n)``
subject transform, so callers compute it themselves and raw publishers (``nats req``) reach the
same place through the server mapping in ``infra/nats-server.conf``.
"""

from __future__ import annotations

import re

CANONICAL_PREFIX = "do"
PARTITIONED_PREFIX = "dop"
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")


def fnv1a_32(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h ^= b
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def partition_of(object_id: str, partitions: int) -> int:
    return fnv1a_32(object_id.encode()) % partitions


def is_token(value: str) -> bool:
    """Namespaces and method names must be one safe subject token."""
    return bool(_TOKEN.fullmatch(value))


def request_subject(partition: int, namespace: str, object_id: str, verb: str) -> str:
    return f"{PARTITIONED_PREFIX}.{partition}.{namespace}.{object_id}.{verb}"


def partition_filter(partition: int) -> str:
    return f"{PARTITIONED_PREFIX}.{partition}.>"


def partition_queue(partition: int) -> str:
    """The queue group named for the partition: in a hand-over overlap one subscriber gets each request."""
    return f"p{partition}"


def server_mapping(partitions: int) -> str:
    """The nats-server ``mappings`` entry that routes canonical subjects to partitions."""
    return (
        f'"{CANONICAL_PREFIX}.*.*.>": '
        f'"{PARTITIONED_PREFIX}.{{{{partition({partitions},2)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}.>"'
    )
