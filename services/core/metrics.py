"""Prometheus metrics: one registry per process component, never the global default.

Several workers (and a router) may live in one process (tests, ``durable dev``), so each
component owns a :class:`~prometheus_client.CollectorRegistry` and ``/metrics`` renders just
that one. Two kinds of series:

- On the request path, counters and histograms of this module (:class:`Counters`,
  :class:`Histograms`) whose label children are looked up once and cached
  (:meth:`WorkerMetrics.series`): an ``inc`` is an integer add and an ``observe`` a bisect and
  two adds, no lock (prometheus-client's own take a lock per bucket: ~2 us an observe, four per
  request), no new objects. They are updated and read on the event loop's thread only (the
  scrape runs on the same loop). Labels are bounded: namespaces are the bound classes, methods
  the ones a class defines (anything else is ``other``); object ids never become labels.
- Everything else (live objects, partitions, hand-overs, alarms, sockets) is read at scrape
  time from plain ``int`` fields the parts keep anyway, by a custom collector: nothing to do per
  event. Values that need Postgres (alarms pending, storage bytes) are refreshed by
  :meth:`ScrapeCache.refresh`, at most once per ``every`` seconds, before a scrape renders.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: request latencies: 0.5 ms .. 10 s (a request is a NATS round trip plus a Postgres commit)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: objects committed by one flush (group commit; the flusher takes at most 2000 at once)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
#: how late an alarm ran after its due time: 10 ms .. 5 min
LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: an alarm that starts more than this many seconds after its due time counts as late
LATE_AFTER = 1.0
#: the label value for methods and namespaces that are not bound (bad input never adds series)
OTHER = "other"


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry``."""
    return generate_latest(registry)


class _Callback(Collector):
    """A collector whose metrics are built at scrape time by a function."""

    def __init__(self, build: Callable[[], Iterable[Metric]]) -> None:
        self._build = build

    def collect(self) -> Iterator[Metric]:
        yield from self._build()


def register_callback(registry: CollectorRegistry, build: Callable[[], Iterable[Metric]]) -> None:
    registry.register(_Callback(build))


def counter(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> Metric:
    """A counter family with one sample (``name`` without ``_total``: the family adds it)."""
    family = CounterMetricFamily(name, doc, labels=list(labels) if labels else None)
    family.add_metric(list(labels.values()) if labels else [], value)
    return family


def gauge(name: str, doc: str, values: dict[str, float] | float, label: str | None = None) -> Metric:
    """A gauge family: one sample, or one per ``label`` value."""
    if isinstance(values, dict):
        family = GaugeMetricFamily(name, doc, labels=[label or "namespace"])
        for key, value in sorted(values.items()):
            family.add_metric([key], value)
        return family
    return GaugeMetricFamily(name, doc, value=values)


class Count:
    """One counter child: a plain number."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class Buckets:
    """One histogram child: a count per bucket (``le`` bounds) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Family(Collector):
    def __init__(self, name: str, doc: str, labels: tuple[str, ...], registry: CollectorRegistry) -> None:
        self.name, self.doc, self.labelnames = name, doc, list(labels)
        self.children: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def _unlabelled(self) -> None:
        """A family without labels shows 0 before its first update (absent is not zero to an alert)."""
        if not self.labelnames:
            self.labels()

    def labels(self, *values: str) -> Any:
        raise NotImplementedError


class Counters(_Family):
    """A counter family (``name`` without ``_total``) with cached children."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...], registry: CollectorRegistry) -> None:
        super().__init__(name, doc, labels, registry)
        self._unlabelled()

    def labels(self, *values: str) -> Count:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = Count()
        return child

    def inc(self, amount: float = 1) -> None:
        """The family without labels."""
        self.labels().inc(amount)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, child in self.children.items():
            family.add_metric(list(values), child.value)
        yield family


class Histograms(_Family):
    """A histogram family with cached children."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        super().__init__(name, doc, labels, registry)
        self.buckets = tuple(float(b) for b in buckets)
        self._unlabelled()

    def labels(self, *values: str) -> Buckets:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = Buckets(self.buckets)
        return child

    def observe(self, value: float) -> None:
        """The family without labels."""
        self.labels().observe(value)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, child in self.children.items():
            cumulative, total = [], 0
            for bound, count in zip((*self.buckets, float("inf")), child.counts, strict=True):
                total += count
                cumulative.append(("+Inf" if bound == float("inf") else repr(bound), total))
            family.add_metric(list(values), cumulative, child.sum)
        yield family


@dataclass
class ScrapeCache:
    """Values that cost a query, refreshed at most once per ``every`` seconds, on scrape."""

    fetch: Callable[[], Awaitable[dict[str, Any]]]
    every: float = 15.0
    values: dict[str, Any] = field(default_factory=dict)
    at: float = float("-inf")

    async def refresh(self) -> None:
        now = time.monotonic()
        if now - self.at < self.every:
            return
        self.at = now  # a failing query is not retried at every scrape either
        self.values = await self.fetch()


class RequestSeries:
    """The cached label children of one (namespace, method): what a request updates."""

    __slots__ = ("ok", "error", "server_error", "queue", "handler", "durable", "total")

    def __init__(self, m: WorkerMetrics, namespace: str, method: str) -> None:
        self.ok = m.requests.labels(namespace, method, "ok")
        self.error = m.requests.labels(namespace, method, "error")
        self.server_error = m.requests.labels(namespace, method, "server_error")
        self.queue = m.queue_seconds.labels(namespace)
        self.handler = m.handler_seconds.labels(namespace)
        self.durable = m.durable_seconds.labels(namespace)
        self.total = m.request_seconds.labels(namespace)


class WorkerMetrics:
    """A worker's metrics on the request path (the rest is read at scrape: see worker.py)."""

    def __init__(self, namespaces: Iterable[str], registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.namespaces = frozenset(namespaces)
        r = self.registry
        ns = ("namespace",)
        self.requests = Counters("durable_requests", "Requests answered by objects, by outcome (ok; error: the "
                                 "caller's or the object's; server_error: status >= 500)",
                                 ("namespace", "method", "outcome"), r)
        self.queue_seconds = Histograms("durable_request_queue_seconds", "From arrival to the event's start "
                                        "(waiting for the object's input gate)", ns, LATENCY_BUCKETS, r)
        self.handler_seconds = Histograms("durable_request_handler_seconds", "The event itself (the handler)",
                                          ns, LATENCY_BUCKETS, r)
        self.durable_seconds = Histograms("durable_request_flush_wait_seconds", "From the handler's end to the "
                                          "reply (its writes committed: the output gate)", ns, LATENCY_BUCKETS, r)
        self.request_seconds = Histograms("durable_request_seconds", "From arrival to the reply (end to end in "
                                          "the worker)", ns, LATENCY_BUCKETS, r)
        self.flush_seconds = Histograms("durable_flush_seconds", "One group commit: the Postgres round trip",
                                        (), LATENCY_BUCKETS, r)
        self.flush_objects = Histograms("durable_flush_batch_objects", "Objects committed by one flush",
                                        (), BATCH_BUCKETS, r)
        self.flush_rows = Counters("durable_flush_rows", "Storage rows written by flushes", (), r)
        self.alarm_lateness = Histograms("durable_alarm_lateness_seconds", "How long after its due time an "
                                         "alarm's handler started", (), LATENESS_BUCKETS, r)
        #: namespace -> the verb's first word -> its last word -> series: three lookups, no key built
        self._series: dict[str, dict[str, dict[str, RequestSeries]]] = {}
        self.other = RequestSeries(self, OTHER, OTHER)

    def series(self, namespace: str, verb: list[str]) -> RequestSeries:
        """The children for a request of ``verb`` (``["rpc", name]``, ``["fetch"]``, ``["alarm"]``,
        ``["ws", "message"]`` ...) to ``namespace``; call only with a verb the class handles."""
        by_kind = self._series.get(namespace)
        if by_kind is not None:
            by_name = by_kind.get(verb[0])
            if by_name is not None:
                s = by_name.get(verb[-1])
                if s is not None:
                    return s
        if namespace not in self.namespaces:
            return self.other
        s = RequestSeries(self, namespace, ".".join(verb))
        self._series.setdefault(namespace, {}).setdefault(verb[0], {})[verb[-1]] = s
        return s


class RouterMetrics:
    """The router's and gateway's request-path metrics (sockets are read at scrape)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counters("durable_http_requests", "HTTP requests answered by the router, by method and "
                                 "status class", ("method", "status"), r)
        self.seconds = Histograms("durable_http_request_seconds", "HTTP requests end to end in the router (the "
                                  "app's routing code and the objects it calls)", (), LATENCY_BUCKETS, r)
        self._all = self.seconds.labels()
        #: method -> status class -> counter child (no key built per request)
        self._children: dict[str, dict[int, Count]] = {}
        self._methods = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}

    def request(self, method: str, status: int, seconds: float) -> None:
        by_status = self._children.get(method)
        child = by_status.get(status // 100) if by_status is not None else None
        if child is None:
            label = method if method in self._methods else OTHER
            child = self.requests.labels(label, f"{status // 100}xx")
            self._children.setdefault(method if label != OTHER else OTHER, {})[status // 100] = child
        child.inc()
        self._all.observe(seconds)
