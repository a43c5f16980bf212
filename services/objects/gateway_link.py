"""The worker's side of the gateways: frames out, questions about sockets."""

from __future__ import annotations

import logging

import nats
from nats.aio.client import Client as NatsClient

from ..core import wire

log = logging.getLogger("durable.websockets")

#: how long an object waits for a gateway to confirm an auto-response change or answer a query
GATEWAY_ANSWER_TIMEOUT = 2.0


class GatewayLink:
    def __init__(self, nc: NatsClient, deployment_key: int) -> None:
        self.nc = nc
        self.deployment_key = deployment_key

    async def send(self, outbox: dict[str, list[wire.GatewayOp]]) -> None:
        """Frames an object sent, past its output gate: one NATS message per gateway (or a few,
        to fit max_payload), operations in the order the object made them."""
        for gateway, ops in outbox.items():
            subject = wire.gateway_subject(self.deployment_key, gateway)
            for chunk in wire.split_ops(ops):
                body = wire.encode_ops(chunk)
                try:
                    if any(isinstance(op, wire.AutoOp) for op in chunk):
                        # an auto-response applies to the frames that follow the event's reply:
                        # the gateway confirms it holds the pair before that reply goes out (the
                        # reply travels on another connection, which NATS does not order with this)
                        await self.nc.request(subject, body, timeout=GATEWAY_ANSWER_TIMEOUT)
                    else:
                        await self.nc.publish(subject, body)
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    log.warning("gateway %s did not confirm an auto-response change", gateway)
                except Exception as exc:  # noqa: BLE001 - a gateway we cannot reach has lost its sockets
                    log.warning("could not send to gateway %s: %s: %s", gateway, type(exc).__name__, exc)

    async def auto_response_timestamp(self, gateway: str, socket_id: str) -> int | None:
        try:
            msg = await self.nc.request(wire.gateway_query_subject(self.deployment_key, gateway),
                                        wire.socket_query(socket_id), timeout=GATEWAY_ANSWER_TIMEOUT)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            return None  # the gateway is gone, and the socket with it
        return wire.parse_socket_query_answer(msg.data)
