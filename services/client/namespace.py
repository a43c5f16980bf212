"""Namespaces (bindings) and stubs: ``env.COUNTERS.get_by_name("a").increment(5)``."""

from __future__ import annotations

from typing import Any

from ..core import codec, wire
from ..core.config import AppConfig, Binding
from ..core.errors import UnknownMethod
from ..core.http import Request, Response
from ..core.ids import IdFactory, ObjectId, namespace_key
from ..core.wire import IDEMPOTENCY_HEADER
from .client import Client


class Stub:
    """A handle on one object. Making it costs nothing; the object is created on first use."""

    __slots__ = ("_client", "_headers", "_namespace", "id", "_name", "_subject")

    def __init__(self, client: Client, namespace: str, object_id: ObjectId) -> None:
        self._client = client
        self._namespace = namespace
        self.id = object_id
        self._subject = client.subject_base(namespace, object_id.hex)
        # the name rides in the payload (a header would cost every request a header block)
        self._name = object_id.name
        #: headers every call of this stub carries (an idempotency key); None: none
        self._headers: dict[str, str] | None = None

    def with_idempotency_key(self, key: str) -> Stub:
        """This object, with every call made through the returned stub carrying ``key`` as its
        ``Idempotency-Key``: the object runs it at most once within DURABLE_IDEMPOTENCY_TTL, a
        repeat gets the first call's reply, and a timeout is retried (safe now) until the retry
        deadline. Use one key per distinct call: ``stub.with_idempotency_key(order_id).pay(amount)``."""
        wire.idempotency_key({wire.IDEMPOTENCY_HEADER: key})  # a bad key fails here, not on the worker
        stub = Stub(self._client, self._namespace, self.id)
        stub._headers = {wire.IDEMPOTENCY_HEADER: key}
        return stub

    @property
    def name(self) -> str | None:
        return self.id.name

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise UnknownMethod(f"method {method!r} is private: methods starting with '_' are not callable")

        async def call(*args: Any, **kwargs: Any) -> Any:
            payload: dict[str, Any] = {}
            if args:
                payload["args"] = list(args)
            if kwargs:
                payload["kwargs"] = kwargs
            if self._name is not None:
                payload["name"] = self._name
            return await self._client.request(self._subject + "rpc." + method, codec.pack(payload), self._headers)

        call.__name__ = method
        return call

    async def fetch(self, request: Request | str, **init: Any) -> Response:
        if isinstance(request, str):
            request = Request(request, **init)
        wire = request.to_wire()
        if self._name is not None:
            wire["name"] = self._name
        headers = self._headers
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is not None and headers is None:  # an HTTP client's key reaches the object's worker
            headers = {IDEMPOTENCY_HEADER: key}
        reply = await self._client.request(self._subject + "fetch", codec.pack(wire), headers)
        return Response.from_wire(reply)

    def __repr__(self) -> str:
        return f"<Stub {self._namespace} {self.id.hex[:12]}… name={self.id.name!r}>"


class Namespace:
    """One binding: makes ids and stubs for its class."""

    def __init__(self, client: Client, binding: Binding) -> None:
        self.client = client
        self.binding = binding
        self.name = binding.class_name
        self.ids = IdFactory(binding.class_name, namespace_key(client.settings.id_secret, binding.identity))

    def id_from_name(self, name: str) -> ObjectId:
        return self.ids.from_name(name)

    def new_unique_id(self) -> ObjectId:
        return self.ids.unique()

    def id_from_string(self, value: str) -> ObjectId:
        return self.ids.from_string(value)

    def get(self, object_id: ObjectId) -> Stub:
        if not isinstance(object_id, ObjectId):
            raise TypeError(f"get() takes an ObjectId, not {type(object_id).__name__}")
        return Stub(self.client, self.name, object_id)

    def get_by_name(self, name: str) -> Stub:
        return self.get(self.id_from_name(name))


class Env:
    """The bindings of durable.toml as attributes: ``env.COUNTERS``."""

    def __init__(self, client: Client, config: AppConfig) -> None:
        self._client = client
        self._namespaces = {b.name: Namespace(client, b) for b in config.bindings}
        self._by_class = {ns.name: ns for ns in self._namespaces.values()}

    @property
    def client(self) -> Client:
        """The connection the stubs call through."""
        return self._client

    async def close(self) -> None:
        """Close the connection, if it is this Env's own (``durable.connect``)."""
        await self._client.close()

    async def __aenter__(self) -> Env:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __getattr__(self, name: str) -> Namespace:
        try:
            return self._namespaces[name]
        except KeyError:
            raise AttributeError(f"no binding {name!r} in durable.toml (have: {sorted(self._namespaces)})") from None

    def by_class(self, class_name: str) -> Namespace | None:
        return self._by_class.get(class_name)

    def __iter__(self) -> Any:
        return iter(self._namespaces.values())
