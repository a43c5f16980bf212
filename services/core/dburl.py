"""What a ``DURABLE_DATABASE_URL`` names: one Postgres, or (libpq's multi-host form) a primary and
its standbys, of which a connection must pick the one that accepts writes.

``postgresql://user@h1:5432,h2:5432/db?target_session_attrs=read-write`` makes asyncpg (as
libpq) try the hosts in order and keep the first that is not read-only, so after a standby is
promoted every new connection finds it. Without ``target_session_attrs`` the first host that
answers wins, a read-only standby included; durable's lock sessions would then take advisory
locks on a standby (Postgres allows that, and they lock nothing the primary knows about). So a
URL naming several hosts must ask for a read-write session, and :func:`check_database_url` says
so at start-up.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs, urlsplit

#: ``target_session_attrs`` values that only ever connect to a server that accepts writes
WRITABLE_ATTRS = ("read-write", "primary")


def database_hosts(url: str) -> list[str]:
    """The ``host[:port]`` entries a Postgres URL names, in the order they are tried (the
    authority's comma-separated list, or a ``host=`` query parameter, which wins, as in libpq)."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    if "host" in query:
        return [h for value in query["host"] for h in value.split(",") if h]
    authority = parts.netloc.rsplit("@", 1)[-1]
    return [h for h in authority.split(",") if h]


def target_session_attrs(url: str) -> str | None:
    """The URL's ``target_session_attrs`` (else the ``PGTARGETSESSIONATTRS`` environment variable
    asyncpg also reads), or None."""
    values = parse_qs(urlsplit(url).query).get("target_session_attrs")
    return values[-1] if values else os.environ.get("PGTARGETSESSIONATTRS") or None


def check_database_url(url: str) -> None:
    """Refuse a URL naming several hosts unless it asks for a read-write session."""
    if not url:
        return
    hosts = database_hosts(url)
    if len(hosts) > 1 and target_session_attrs(url) not in WRITABLE_ATTRS:
        raise ValueError(
            f"database_url names {len(hosts)} hosts ({', '.join(hosts)}) but no "
            "target_session_attrs=read-write: a connection could land on a read-only standby, and "
            "durable takes its partition locks and writes on the primary only. Add "
            "?target_session_attrs=read-write (or primary) to the URL"
        )
