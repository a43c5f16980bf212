"""Object ids: 64 lowercase hex characters, a 16-byte base and a 16-byte keyed checksum.

As in Cloudflare, the base is a keyed hash of the name (or random bytes) and the checksum is
a keyed hash of the base, both keyed by the namespace. So ``id_from_string`` rejects malformed
ids *and* ids of another namespace, and one name gives different ids in different namespaces.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re

from .errors import InvalidId

_HEX64 = re.compile(r"[0-9a-f]{64}")
#: Cloudflare drops ``id.name`` for names longer than this; we refuse them instead of hashing silently.
MAX_NAME_BYTES = 1024


def namespace_key(secret: str, identity: str) -> bytes:
    """The HMAC key of a namespace: stable across class renames because ``identity`` is."""
    return hmac.new(secret.encode(), b"namespace:" + identity.encode(), hashlib.sha256).digest()


class ObjectId:
    """The address of one object. ``name`` is set when it was made from a name."""

    __slots__ = ("hex", "name")

    def __init__(self, hex_: str, name: str | None = None) -> None:
        self.hex = hex_
        self.name = name

    def __str__(self) -> str:
        return self.hex

    def __repr__(self) -> str:
        return f"ObjectId({self.hex!r}, name={self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectId) and other.hex == self.hex

    def __hash__(self) -> int:
        return hash(self.hex)


class IdFactory:
    """Makes and checks ids of one namespace."""

    __slots__ = ("_key", "namespace")

    def __init__(self, namespace: str, key: bytes) -> None:
        self.namespace = namespace
        self._key = key

    def _checksum(self, base: bytes) -> bytes:
        return hmac.new(self._key, base, hashlib.sha256).digest()[:16]

    def from_name(self, name: str) -> ObjectId:
        if not isinstance(name, str):
            raise InvalidId(f"object name must be str, not {type(name).__name__}")
        if len(name.encode()) > MAX_NAME_BYTES:
            raise InvalidId(
                f"object names cannot be longer than {MAX_NAME_BYTES} bytes; "
                f"a name of {len(name.encode())} bytes was provided"
            )
        base = hmac.new(self._key, b"name:" + name.encode(), hashlib.sha256).digest()[:16]
        return ObjectId((base + self._checksum(base)).hex(), name)

    def unique(self) -> ObjectId:
        base = os.urandom(16)
        return ObjectId((base + self._checksum(base)).hex())

    def from_string(self, value: str) -> ObjectId:
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            raise InvalidId(f"Invalid Durable Object ID: must be 64 hex digits (got {value!r:.80})")
        raw = bytes.fromhex(value)
        if not hmac.compare_digest(raw[16:], self._checksum(raw[:16])):
            raise InvalidId(f"Durable Object ID is not valid for namespace {self.namespace!r}")
        return ObjectId(value)

    def name_matches(self, oid: str, name: str) -> bool:
        """Whether ``oid`` is the id of ``name`` here (so a claimed ``id.name`` can be trusted)."""
        try:
            return self.from_name(name).hex == oid
        except InvalidId:
            return False
