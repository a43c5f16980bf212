"""Fixtures of the cluster fault tests: a NATS cluster, and a Postgres the tests may restart."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from durable.core.embedded import EmbeddedPostgres

from tests.helpers.cluster import EmbeddedNatsCluster
from tests.helpers.partition_checks import HEADER, RESULTS
from tests.helpers.postgres import create_database, dedicated_postgres
from tests.helpers.settings import PARTITIONS


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[EmbeddedNatsCluster]:
    """Three clustered nats-servers on loopback (full mesh of routes, JetStream on each with its
    own store and server_name, the partition mapping on each). Clients take ``cluster.urls``;
    ``cluster.nodes[i]`` stops, kills, pauses and restarts (``cluster.start_node(i)``) one node."""
    async with EmbeddedNatsCluster(tmp_path / "nats-cluster", partitions=PARTITIONS) as cluster:
        yield cluster


@pytest.fixture(scope="module")
async def fault_postgres(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedPostgres]:
    """A Postgres of the module's own, which its tests stop and restart (on the same port)."""
    async with dedicated_postgres(tmp_path_factory.mktemp("fault-pg")) as server:
        yield server


@pytest.fixture
async def fault_database_url(fault_postgres: EmbeddedPostgres) -> str:
    """A fresh database on ``fault_postgres`` for this test."""
    return await create_database(fault_postgres, "f")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The partition tests' results table (test_partitions.py), at the end of any run that ran them."""
    if RESULTS:
        terminalreporter.write_sep("-", "partition tests: acknowledged increments under network faults")
        terminalreporter.write_line(HEADER)
        for row in RESULTS:
            terminalreporter.write_line(row)
