"""What an operator's command points at: a binding (its name or class) and an object in it
(a name, or the 64-hex id ``durable id`` prints)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import AppConfig, Binding
from ..core.errors import InvalidId
from ..core.ids import IdFactory, ObjectId, namespace_key
from ..core.settings import Settings


class UsageError(Exception):
    """Bad input to a command: one line for the operator, exit code 2."""


@dataclass(frozen=True)
class Namespace:
    binding: Binding
    ids: IdFactory

    @property
    def name(self) -> str:
        """The namespace token of subjects and of the storage tables: the class name."""
        return self.binding.class_name

    def object(self, name_or_id: str) -> ObjectId:
        """An id of this namespace given as its 64 hex digits, else a name (so a name that merely
        looks like an id, a sha256 digest say, still names its object)."""
        if len(name_or_id) == 64 and all(c in "0123456789abcdef" for c in name_or_id):
            try:
                return self.ids.from_string(name_or_id)
            except InvalidId:
                pass  # not an id of this namespace: a name
        try:
            return self.ids.from_name(name_or_id)
        except InvalidId as exc:
            raise UsageError(exc.message) from None


def namespace(settings: Settings, config: AppConfig, target: str) -> Namespace:
    """The binding named ``target`` (COUNTERS) or bound to the class ``target`` (Counter)."""
    for b in config.bindings:
        if target in (b.name, b.class_name):
            return Namespace(b, IdFactory(b.class_name, namespace_key(settings.id_secret, b.identity)))
    known = ", ".join(f"{b.name} ({b.class_name})" for b in config.bindings) or "none"
    raise UsageError(f"no binding or class named {target!r} in {settings.config_file}; bindings: {known}")
