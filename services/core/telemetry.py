"""OpenTelemetry: W3C ``traceparent`` carried in NATS headers from caller to object.

Configured only by the standard ``OTEL_*`` variables. ``OTEL_TRACES_EXPORTER`` is a
comma-separated list: ``otlp`` exports over OTLP (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; ``OTEL_EXPORTER_OTLP_PROTOCOL``/``..._TRACES_PROTOCOL``
``http/protobuf``, the default, or ``grpc`` when opentelemetry-exporter-otlp-proto-grpc is
installed), ``console`` prints spans, ``none`` (or unset) leaves the API's no-op tracer in place
unless the host application installs its own provider. ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and the ``OTEL_BSP_*`` batch settings are
read by the SDK itself.

Tracing off costs ~nothing on the hot path: callers inject the context only when a span is
recording, so an untraced request carries no extra header, and the worker starts a span only
for a request that carries one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context

from .errors import ConfigError

TRACEPARENT = "traceparent"
tracer = trace.get_tracer("durable")
_KNOWN = ("otlp", "console", "none")
_enabled = False


def tracing_enabled() -> bool:
    """Whether a real tracer provider is installed (by us or the host application): spans that
    start a trace of their own (alarm runs, WebSocket frames) are made only then."""
    global _enabled
    if not _enabled:
        _enabled = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)
    return _enabled


def exporters_from_env(environ: Mapping[str, str] | None = None) -> list[Any]:
    """The span exporters ``OTEL_TRACES_EXPORTER`` asks for (none: an empty list); an unknown
    name or protocol is a :class:`ConfigError` naming the variable."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    exporters: list[Any] = []
    for name in names:
        if name not in _KNOWN:
            raise ConfigError(f"OTEL_TRACES_EXPORTER: {name!r} is not one of {', '.join(_KNOWN)}")
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter  # noqa: PLC0415

            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            exporters.append(_otlp_exporter(env))
    return exporters


def _otlp_exporter(env: Mapping[str, str]) -> Any:
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol == "http/protobuf":
        # the exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _HEADERS, _TIMEOUT, _COMPRESSION
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

        return OTLPSpanExporter()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError:
            raise ConfigError("OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the opentelemetry-exporter-otlp-proto-grpc "
                              "package (pip install opentelemetry-exporter-otlp-proto-grpc), or use "
                              "http/protobuf (the default; port 4318)") from None
        return GrpcExporter()
    raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not http/protobuf or grpc")


def configure_from_env(service_name: str) -> None:
    """Install a tracer provider exporting where ``OTEL_TRACES_EXPORTER`` says (batched);
    nothing when it names no exporter."""
    exporters = exporters_from_env()
    if not exporters:
        return
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME (which wins)
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)  # shut down (flushed) at exit by the SDK
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def inject(headers: dict[str, str] | None) -> dict[str, str] | None:
    """Headers plus ``traceparent`` when a span is recording; the same object otherwise."""
    if not trace.get_current_span().is_recording():
        return headers
    carrier = dict(headers) if headers else {}
    propagate.inject(carrier)
    return carrier


def extract(headers: Mapping[str, str]) -> Context | None:
    """The caller's trace context, if the request carried one."""
    if TRACEPARENT not in headers:
        return None
    return propagate.extract(dict(headers))
