"""The W3C trace context travels in NATS headers from the caller into the object's event, and
an HTTP request is one trace: router -> NATS request -> object event -> flush (Postgres)."""

import httpx
import pytest
from durable.client import Env
from durable.core.config import AppConfig
from durable.core.settings import Settings
from durable.core.wire import partition_of
from durable.objects import Worker
from durable.router.app import create_app
from durable.testing.app import serve_asgi
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.helpers import routes
from tests.helpers.settings import PARTITIONS
from tests.helpers.waiting import assert_eventually

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
    server, call = spans["Counter rpc.increment"], spans["call Counter rpc.increment"]
    assert server.context.trace_id == caller.get_span_context().trace_id
    # caller -> the NATS request (client span) -> the object's event (server span, in the worker)
    assert call.parent is not None and call.parent.span_id == caller.get_span_context().span_id
    assert server.parent is not None and server.parent.span_id == call.context.span_id
    assert server.attributes["do.object_id"] == counter.id.hex
    assert server.attributes["do.partition"] == partition_of(counter.id.hex, PARTITIONS)


async def test_an_untraced_call_adds_no_span(worker: Worker, env: Env) -> None:
    _exporter.clear()
    await env.COUNTERS.get_by_name("untraced").increment()
    assert [s.name for s in _exporter.get_finished_spans()] == []


@pytest.mark.parametrize("local", [False, True], ids=["nats", "local"])
async def test_an_http_request_is_one_trace_from_the_router_through_nats_to_the_flush(
        worker: Worker, settings: Settings, config: AppConfig, local: bool) -> None:
    """Over NATS, or (``local``) handed to the in-process worker as `durable dev` does: the
    trace context crosses the hop the same way."""
    _exporter.clear()
    app = create_app(settings, config, user_fetch=routes.fetch, websockets=False,
                     local=worker.local if local else None)
    taken = worker.local.taken
    async with serve_asgi(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        reply = await http.post("/counter/traced-http/increment")
    assert reply.status_code == 200, reply.text
    assert worker.local.taken == taken + local
    spans = {s.name: s for s in _exporter.get_finished_spans()}
    router = spans["POST /counter/traced-http/increment"]
    call, event, flush = spans["call Counter fetch"], spans["Counter fetch"], spans["flush"]
    assert router.parent is None  # the request carried no traceparent: the router starts the trace
    assert {s.context.trace_id for s in (call, event, flush)} == {router.context.trace_id}
    assert call.parent is not None and call.parent.span_id == router.context.span_id
    assert event.parent is not None and event.parent.span_id == call.context.span_id  # across the NATS hop
    assert event.parent.is_remote
    assert flush.parent is not None and flush.parent.span_id == event.context.span_id
    assert flush.attributes["db.system"] == "postgresql" and flush.attributes["do.flush.objects"] >= 1
    assert event.attributes["do.namespace"] == "Counter"
    # the event's span ends when its reply is sent, after the flush it waited for
    assert event.end_time >= flush.end_time


async def test_an_alarm_run_is_a_span_with_its_flush_below_it(worker: Worker, env: Env) -> None:
    alarmer = env.ALARMERS.get_by_name("traced-alarm")
    await alarmer.arm(0)
    _exporter.clear()

    async def ran() -> bool:
        return any(s.name == "Alarmer alarm" for s in _exporter.get_finished_spans())

    await assert_eventually(ran, 10, "the alarm's run was traced")
    spans = _exporter.get_finished_spans()
    run = next(s for s in spans if s.name == "Alarmer alarm")
    assert run.attributes["do.object_id"] == alarmer.id.hex
    assert run.attributes["do.alarm.outcome"] == "ran"

    async def flushed() -> bool:
        return any(s.name == "flush" and s.parent is not None and s.parent.span_id == run.context.span_id
                   for s in _exporter.get_finished_spans())

    await assert_eventually(flushed, 10, "the alarm run's writes were flushed under its span")
