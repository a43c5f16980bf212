"""How any process calls an object: namespaces, ids and stubs over NATS."""

from .client import Client
from .namespace import Env, Namespace, Stub

__all__ = ["Client", "Env", "Namespace", "Stub"]
