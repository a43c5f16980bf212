"""The request-path counters and histograms render as Prometheus text that its own parser reads
back with the values observed; bad labels never add series."""

from __future__ import annotations

from durable.core.metrics import OTHER, RouterMetrics, WorkerMetrics, render

from tests.helpers.ops import samples, value


def test_histogram_buckets_are_cumulative_and_sum_what_was_observed() -> None:
    m = WorkerMetrics(["Counter"])
    s = m.series("Counter", ["rpc", "increment"])
    for seconds in (0.0004, 0.0005, 0.002, 0.3, 20.0):
        s.total.observe(seconds)
    s.ok.inc()
    parsed = samples(render(m.registry).decode())
    bucket = "durable_request_seconds_bucket"
    assert value(parsed, bucket, namespace="Counter", le="0.0005") == 2  # le: a value on the bound counts
    assert value(parsed, bucket, namespace="Counter", le="0.0025") == 3
    assert value(parsed, bucket, namespace="Counter", le="0.5") == 4
    assert value(parsed, bucket, namespace="Counter", le="10.0") == 4
    assert value(parsed, bucket, namespace="Counter", le="+Inf") == 5
    assert value(parsed, "durable_request_seconds_count", namespace="Counter") == 5
    assert abs(value(parsed, "durable_request_seconds_sum", namespace="Counter") - 20.3029) < 1e-9
    assert value(parsed, "durable_requests_total", namespace="Counter", method="rpc.increment", outcome="ok") == 1
    # families without labels show zero before their first update
    assert value(parsed, "durable_flush_seconds_count") == 0
    assert value(parsed, "durable_flush_rows_total") == 0


def test_unbound_namespaces_share_one_series() -> None:
    m = WorkerMetrics(["Counter"])
    assert m.series("Nope", ["rpc", "x"]) is m.other is m.series("Other", ["fetch"])
    assert m.series("Counter", ["fetch"]) is m.series("Counter", ["fetch"])
    assert m.series("Counter", ["rpc", "fetch"]) is not m.series("Counter", ["fetch"])


def test_router_counts_by_method_and_status_class() -> None:
    r = RouterMetrics()
    r.request("POST", 200, 0.01)
    r.request("POST", 201, 0.01)
    r.request("BREW", 418, 0.01)
    parsed = samples(render(r.registry).decode())
    assert value(parsed, "durable_http_requests_total", method="POST", status="2xx") == 2
    assert value(parsed, "durable_http_requests_total", method=OTHER, status="4xx") == 1
    assert value(parsed, "durable_http_request_seconds_count") == 3
