"""durable: Durable Objects for Python, on NATS and PostgreSQL.

The public API is what this module exports (pinned by ``tests/test_public_api.py``)::

    from durable import DurableObject, Request, Response, WebSocket, AlarmInfo, Env, Client, connect

Errors live in :mod:`durable.errors`; the pytest plugin in :mod:`durable.testing`. Everything
else (``durable.core``, ``durable.objects.worker``, ...) is the runtime's own and may change.
"""

from .client import Client, Env
from .client.connect import connect
from .core.http import Headers, Request, Response
from .objects import AlarmInfo, Context, DurableObject, Storage, Transaction, WebSocket
from .objects.messages import Message

__all__ = [
    "AlarmInfo",
    "Client",
    "Context",
    "DurableObject",
    "Env",
    "Headers",
    "Message",
    "Request",
    "Response",
    "Storage",
    "Transaction",
    "WebSocket",
    "connect",
]
