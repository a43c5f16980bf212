"""The W3C trace context travels in NATS headers from the caller into the object's event."""

import pytest
from durable.client import Env
from durable.core.wire import partition_of
from durable.objects import Worker
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.helpers.settings import PARTITIONS

_exporter = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def provider() -> None:
    current = trace.get_tracer_provider()
    if not isinstance(current, TracerProvider):
        current = TracerProvider()
        trace.set_tracer_provider(current)
    current.add_span_processor(SimpleSpanProcessor(_exporter))


async def test_an_rpc_made_inside_a_span_is_traced_into_the_object(worker: Worker, env: Env) -> None:
    _exporter.clear()
    counter = env.COUNTERS.get_by_name("traced")
    with trace.get_tracer("test").start_as_current_span("caller") as caller:
        await counter.increment(3)
    spans = {s.name: s for s in _exporter.get_finished_spans()}
    server = spans["Counter rpc.increment"]
    assert server.context.trace_id == caller.get_span_context().trace_id
    assert server.parent is not None and server.parent.span_id == caller.get_span_context().span_id
    assert server.attributes["do.object_id"] == counter.id.hex
    assert server.attributes["do.partition"] == partition_of(counter.id.hex, PARTITIONS)


async def test_an_untraced_call_adds_no_span(worker: Worker, env: Env) -> None:
    _exporter.clear()
    await env.COUNTERS.get_by_name("untraced").increment()
    assert [s.name for s in _exporter.get_finished_spans()] == []
