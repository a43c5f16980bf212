"""DURABLE_DATABASE_URL naming a primary and its standbys (libpq's multi-host form): the hosts are
read in order, and a URL naming several must ask for a read-write session, or a lock session
could land on a read-only standby."""

from __future__ import annotations

import pytest
from durable.core.dburl import check_database_url, database_hosts, target_session_attrs
from durable.core.settings import Settings
from pydantic import ValidationError

TWO = "postgresql://app:secret@db-a:5432,db-b:5433/durable"


def test_the_hosts_of_a_url_are_listed_in_the_order_they_are_tried() -> None:
    assert database_hosts("postgresql://postgres@127.0.0.1:5433/postgres") == ["127.0.0.1:5433"]
    assert database_hosts(TWO + "?target_session_attrs=read-write") == ["db-a:5432", "db-b:5433"]
    assert database_hosts("postgresql:///durable?host=db-a,db-b&port=5432,5433") == ["db-a", "db-b"]
    assert database_hosts("postgresql://db-a,db-b,db-c/durable") == ["db-a", "db-b", "db-c"]


def test_a_url_naming_several_hosts_must_ask_for_the_writable_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGTARGETSESSIONATTRS", raising=False)
    with pytest.raises(ValueError, match=r"names 2 hosts \(db-a:5432, db-b:5433\) but no target_session_attrs"):
        check_database_url(TWO)
    with pytest.raises(ValueError, match="target_session_attrs=read-write"):
        check_database_url(TWO + "?target_session_attrs=any")
    with pytest.raises(ValueError, match="read-only standby"):
        check_database_url(TWO + "?target_session_attrs=prefer-standby")
    check_database_url(TWO + "?target_session_attrs=read-write")
    check_database_url(TWO + "?sslmode=require&target_session_attrs=primary")
    check_database_url("postgresql://postgres@127.0.0.1:5433/postgres")  # one host: whatever it is
    check_database_url("")  # durable dev's own server
    # asyncpg (as libpq) also takes the attribute from the environment
    monkeypatch.setenv("PGTARGETSESSIONATTRS", "read-write")
    assert target_session_attrs(TWO) == "read-write"
    check_database_url(TWO)


def test_the_setting_refuses_such_a_url_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGTARGETSESSIONATTRS", raising=False)
    monkeypatch.setenv("DURABLE_DATABASE_URL", TWO)
    with pytest.raises(ValidationError, match="target_session_attrs=read-write"):
        Settings()
    monkeypatch.setenv("DURABLE_DATABASE_URL", TWO + "?target_session_attrs=read-write")
    assert Settings().database_url.endswith("read-write")
