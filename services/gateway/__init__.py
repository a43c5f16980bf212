"""The WebSocket gateway: client sockets on one side, objects over NATS on the other."""

from .gateway import Gateway

__all__ = ["Gateway"]
