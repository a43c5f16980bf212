"""Traces over OTLP: a `durable worker` process configured only by OTEL_* variables exports its
spans to a collector (an OTLP/HTTP receiver in this test), parented across the NATS hop to the
caller's span in this process."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from durable.client import Env
from durable.core import telemetry
from durable.core.errors import ConfigError
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.helpers.waiting import assert_eventually
from tests.helpers.workers import WorkerProcess


class OtlpReceiver:
    """The trace endpoint of an OTLP/HTTP collector (``POST /v1/traces``, protobuf): every span
    received, with its resource's service.name."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:  # the exporter keeps its connection alive
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:] if h)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self._record(head[0], body)
                reply = ExportTraceServiceResponse().SerializeToString()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n"
                             + f"Content-Length: {len(reply)}\r\n\r\n".encode() + reply)
                await writer.drain()
        writer.close()

    def _record(self, request_line: str, body: bytes) -> None:
        assert request_line.startswith("POST /v1/traces "), request_line
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), None)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append({
                        "service": service, "name": span.name, "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                        "attributes": {a.key: a.value for a in span.attributes},
                    })

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[OtlpReceiver]:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        try:
            yield self
        finally:
            self._server.close()


_local = InMemorySpanExporter()


@pytest.fixture(scope="module")
def provider() -> None:
    """The process's recording provider (test_tracing.py may have installed it already), with
    an exporter that keeps this process's spans."""
    current = trace.get_tracer_provider()
    if not isinstance(current, TracerProvider):
        current = TracerProvider()
        trace.set_tracer_provider(current)
    current.add_span_processor(SimpleSpanProcessor(_local))


@pytest.mark.slow
async def test_a_worker_exports_its_spans_over_otlp_parented_across_nats(
        worker_process: Any, env: Env, provider: None) -> None:
    async with OtlpReceiver().running() as receiver:
        wp: WorkerProcess = worker_process()
        base_env = wp.env
        wp.env = lambda: {**base_env(), "OTEL_TRACES_EXPORTER": "otlp",  # type: ignore[method-assign]
                          "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{receiver.port}/v1/traces",
                          "OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_SERVICE_NAME": "worker-under-test"}
        await wp.start()
        counter = env.COUNTERS.get_by_name("otlp-traced")
        with trace.get_tracer("test").start_as_current_span("caller") as caller:
            await counter.increment(2)
        trace_id = format(caller.get_span_context().trace_id, "032x")

        def of_trace() -> dict[str, dict[str, Any]]:
            return {s["name"]: s for s in receiver.spans if s["trace_id"] == trace_id}

        async def exported() -> bool:
            return {"Counter rpc.increment", "flush"} <= set(of_trace())

        await assert_eventually(exported, 20, "the worker's spans reached the collector")
        spans = of_trace()
        event, flush = spans["Counter rpc.increment"], spans["flush"]
        assert event["service"] == flush["service"] == "worker-under-test"
        # the event's parent is this process's client span (the stub's request): the NATS hop
        [call] = [c for c in _local.get_finished_spans() if c.name == "call Counter rpc.increment"
                  and c.context.trace_id == caller.get_span_context().trace_id]
        assert event["parent"] == format(call.context.span_id, "016x")
        assert flush["parent"] == event["span_id"]
        assert event["attributes"]["do.object_id"].string_value == counter.id.hex
        assert flush["attributes"]["db.system"].string_value == "postgresql"


def test_the_exporter_is_chosen_by_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert telemetry.exporters_from_env({}) == []
    assert telemetry.exporters_from_env({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert telemetry.exporters_from_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) == []
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:1/v1/traces")
    [exporter] = telemetry.exporters_from_env({"OTEL_TRACES_EXPORTER": "otlp"})
    assert isinstance(exporter, OTLPSpanExporter)
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER: 'zipkin'"):
        telemetry.exporters_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ConfigError, match="http/protobuf or grpc"):
        telemetry.exporters_from_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
