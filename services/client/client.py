"""How any process calls an object: a NATS request to the object's partition subject.

A request that met no responder (the partition is between owners) is retried with jittered
exponential backoff until the retry deadline; a request that timed out after it may have
been delivered is reported as a RequestTimeout (outcome unknown: not retryable) and never
repeated silently, unless it carries an idempotency key: then a repeat cannot run it twice
(services/objects/idempotency.py), and timeouts are retried too until the retry deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from nats.errors import MaxPayloadError, NoRespondersError
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_random_exponential

from ..core import telemetry
from ..core.config import AppConfig
from ..core.context import current_event
from ..core.errors import (
    ConfigError,
    NotOwner,
    PayloadTooLarge,
    RequestTimeout,
    Unavailable,
)
from ..core.nats_options import connect_hint, connect_options
from ..core.settings import Settings
from ..core.wire import IDEMPOTENCY_HEADER, decode_reply, partition_of, partition_of_subject, request_subject
from .owners import OwnerWatch

log = logging.getLogger("durable.client")
#: seconds between the client's PINGs to its NATS server; two unanswered and the connection is
#: given up (then the next server of DURABLE_NATS_URL is tried), as nats-server does with ours
CLIENT_PING_INTERVAL = 2


class _Retry(Exception):
    """A reply that proves the request was not executed (no responder, not the owner)."""

    def __init__(self, cause: Exception) -> None:
        self.cause = cause


class LocalDispatch(Protocol):
    """A worker in this process that takes requests without NATS (services/objects/local.py).

    ``dispatch`` starts the request and returns the future of its reply, the (headers, body)
    a NATS reply would carry, if that worker serves the subject's partition now; otherwise None,
    and the request goes over NATS."""

    def dispatch(self, subject: str, payload: bytes,
                 headers: dict[str, str] | None) -> asyncio.Future[tuple[dict[str, str] | None, bytes]] | None: ...


_NOT_RUNNING = (" Is nats-server running there? `durable dev` starts one on nats://127.0.0.1:4222; "
                "elsewhere set DURABLE_NATS_URL to your NATS server(s).")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"


async def close_nats(nc: NatsClient) -> None:
    """Drain if we can, close if we cannot (the server may already be gone)."""
    if nc.is_closed:
        return
    try:
        await nc.drain()
    except Exception:  # noqa: BLE001 - reconnecting or closed: nothing left to drain
        await nc.close()


class Client:
    """A NATS connection plus the deployment's partitioning and timeouts."""

    def __init__(self, nc: NatsClient, settings: Settings, config: AppConfig | None = None) -> None:
        self.nc = nc
        self.settings = settings
        self.config = config
        self.partitions = settings.partitions
        self._owns_connection = False
        #: a worker in this process to hand requests to directly (``durable dev`` sets it; None: NATS)
        self.local: LocalDispatch | None = None
        #: the requests in flight per partition, ended early when their partition changes hands
        #: (connect() starts it; None: every request waits for its own timeout)
        self.owners: OwnerWatch | None = None
        #: keyed calls repeated after a timeout (their outcome was unknown; the key makes it safe)
        self.timeouts_retried = 0

    def _note_retry(self, exc: BaseException | None) -> None:
        if isinstance(exc, RequestTimeout):
            self.timeouts_retried += 1

    @classmethod
    async def connect(cls, settings: Settings, config: AppConfig | None = None, **nats_options: Any) -> Client:
        """Connect to ``DURABLE_NATS_URL``. The first connection is bounded: no server reached within
        ``DURABLE_NATS_CONNECT_TIMEOUT`` seconds is an Unavailable naming the URL; once connected,
        a lost connection is retried for ever (each failure logged as one line)."""
        servers = settings.nats_servers
        if not servers:
            raise ConfigError("no NATS server to connect to: set DURABLE_NATS_URL "
                              "(for example nats://127.0.0.1:4222, where `durable dev` listens)")
        limit = settings.nats_connect_timeout
        errors: list[Exception] = []
        connected = False
        user_error_cb = nats_options.pop("error_cb", None)

        async def error_cb(exc: Exception) -> None:
            # nats-py's own callback logs a traceback for every failed attempt, for ever
            if user_error_cb is not None:
                await user_error_cb(exc)
            elif connected:
                log.warning("NATS connection error (%s): %s", ", ".join(servers), _describe(exc))
            else:
                errors.append(exc)

        nc = NatsClient()
        options: dict[str, Any] = {"name": "durable-client", "max_reconnect_attempts": -1,
                                   "connect_timeout": max(1, min(2, int(limit))),
                                   # a dead (black-holed) connection is given up after a few
                                   # seconds, not nats-py's 2 x 120 s, so a process cut from its
                                   # NATS node reconnects to another one while the cut lasts
                                   "ping_interval": CLIENT_PING_INTERVAL, "max_outstanding_pings": 2,
                                   **connect_options(settings)}
        options.update(nats_options)
        try:
            async with asyncio.timeout(limit):
                await nc.connect(servers=servers, error_cb=error_cb, **options)
        except (TimeoutError, OSError, NatsError) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            # the error that says what to set (credentials, TLS), else the last one
            last = next((e for e in reversed(errors) if connect_hint(e)), errors[-1] if errors else exc)
            raise Unavailable(
                f"cannot connect to NATS at {', '.join(servers)} (DURABLE_NATS_URL) within {limit:g}s: "
                f"{_describe(last)}.{connect_hint(last) or _NOT_RUNNING}"
            ) from None
        connected = True
        client = cls(nc, settings, config)
        client._owns_connection = True
        owners = OwnerWatch()
        try:
            await owners.start(nc, settings.deployment_key)
            client.owners = owners
        except Exception as exc:  # noqa: BLE001 - only a hint: requests then wait for their own timeout
            log.warning("cannot watch partitions changing hands (%s); requests to a stopped owner wait "
                        "out DURABLE_REQUEST_TIMEOUT", _describe(exc))
        return client

    async def close(self) -> None:
        if self._owns_connection:
            await close_nats(self.nc)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _attempt(self, subject: str, payload: bytes, headers: dict[str, str] | None,
                       timeout: float) -> Any:
        headers = telemetry.inject(headers)
        if self.local is not None:
            if len(payload) > self.nc.max_payload:  # as over NATS: the same limit, the same error
                raise PayloadTooLarge(
                    f"request of {len(payload)} bytes is over the NATS server's max_payload of "
                    f"{self.nc.max_payload} bytes"
                )
            reply = self.local.dispatch(subject, payload, headers)
            if reply is not None:
                return await self._local_reply(subject, reply, timeout)
        partition = partition_of_subject(subject) if self.owners is not None else None
        ended: asyncio.Timeout | None = None
        try:
            if partition is None or self.owners is None:
                msg = await self.nc.request(subject, payload, timeout=timeout, headers=headers)
            else:  # ended early if the partition changes hands meanwhile (owners.py)
                async with asyncio.timeout(None) as ended:
                    self.owners.add(partition, ended)
                    try:
                        msg = await self.nc.request(subject, payload, timeout=timeout, headers=headers)
                    finally:
                        self.owners.discard(partition, ended)
        except NoRespondersError as exc:
            raise _Retry(exc) from None
        except MaxPayloadError:
            raise PayloadTooLarge(
                f"request of {len(payload)} bytes is over the NATS server's max_payload of "
                f"{self.nc.max_payload} bytes"
            ) from None
        except TimeoutError:  # nats-py's timeout, or the owner changed
            if ended is not None and ended.expired():
                raise RequestTimeout(
                    f"no reply from {subject}: its partition was taken by another worker while the request "
                    "was in flight (its previous owner stopped or lost its lease); it may have run, so it "
                    "was not repeated"
                ) from None
            raise RequestTimeout(
                f"no reply from {subject} in {timeout}s; the request may have been delivered, "
                "so it was not repeated"
            ) from None
        try:
            return decode_reply(msg.headers, msg.data)
        except NotOwner as exc:
            raise _Retry(exc) from None

    async def _local_reply(self, subject: str, reply: asyncio.Future[tuple[dict[str, str] | None, bytes]],
                           timeout: float) -> Any:
        """A local call's reply, decoded as a NATS reply is (the same errors, the same retries)."""
        try:
            async with asyncio.timeout(timeout):
                headers, data = await reply
        except TimeoutError:
            raise RequestTimeout(
                f"no reply from {subject} in {timeout}s; the request may have been delivered, "
                "so it was not repeated"
            ) from None
        try:
            return decode_reply(headers, data)
        except NotOwner as exc:
            raise _Retry(exc) from None

    def subject_base(self, namespace: str, object_id: str) -> str:
        """``dop.<partition>.<namespace>.<object-id>.``: stubs compute it once, verbs are appended."""
        return request_subject(partition_of(object_id, self.partitions), namespace, object_id, "")

    async def call(self, namespace: str, object_id: str, verb: str, payload: bytes,
                   headers: dict[str, str] | None = None, timeout: float | None = None) -> Any:
        """Send one request to an object and return the decoded reply value."""
        return await self.request(self.subject_base(namespace, object_id) + verb, payload, headers, timeout)

    async def request(self, subject: str, payload: bytes, headers: dict[str, str] | None = None,
                      timeout: float | None = None) -> Any:
        """Send one request to a partition subject, retrying only what provably did not run.
        Inside a recording span, the request is a client span of its own (the NATS hop)."""
        if not trace.get_current_span().is_recording():
            return await self._request(subject, payload, headers, timeout)
        parts = subject.split(".", 4)
        with telemetry.tracer.start_as_current_span(
            f"call {parts[2]} {parts[4]}" if len(parts) == 5 else f"call {subject}", kind=SpanKind.CLIENT,
            attributes={"messaging.system": "nats", "messaging.destination.name": subject},
        ):
            return await self._request(subject, payload, headers, timeout)

    async def _request(self, subject: str, payload: bytes, headers: dict[str, str] | None,
                       timeout: float | None) -> Any:
        timeout = timeout or self.settings.request_timeout
        guard = current_event.get()
        reopened = False
        try:
            if guard is not None:
                reopened = await guard.before_outgoing()
            # with an idempotency key a timeout is safe to repeat: the object runs the call once
            retryable: tuple[type[Exception], ...] = \
                (_Retry, RequestTimeout) if headers and IDEMPOTENCY_HEADER in headers else (_Retry,)
            try:
                return await self._attempt(subject, payload, headers, timeout)
            except retryable as exc:
                self._note_retry(exc)
            retrying = AsyncRetrying(
                retry=retry_if_exception_type(retryable),
                before_sleep=lambda state: self._note_retry(state.outcome.exception() if state.outcome else None),
                wait=wait_random_exponential(multiplier=0.01, max=0.5),
                stop=stop_after_delay(self.settings.retry_deadline),
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        return await self._attempt(subject, payload, headers, timeout)
            except RequestTimeout as exc:
                if RequestTimeout not in retryable:
                    raise
                # still unknown after the retries, but a keyed call is safe to repeat later
                raise RequestTimeout(exc.message, retryable=True) from None
            except _Retry as exc:
                namespace, object_id = subject.split(".", 4)[2:4]
                raise Unavailable(
                    f"no worker serves {namespace}/{object_id} after retrying for "
                    f"{self.settings.retry_deadline}s ({type(exc.cause).__name__})"
                ) from None
            raise AssertionError("unreachable")
        finally:
            if guard is not None:
                await guard.after_outgoing(reopened)
