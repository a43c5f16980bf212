"""The WebSocket gateway: client sockets on one side, objects over NATS on the other."""

from .gateway import Gateway, client_headers

__all__ = ["Gateway", "client_headers"]
