"""OpenTelemetry: W3C ``traceparent`` carried in NATS headers from caller to object.

Configured only by the standard ``OTEL_*`` variables: ``OTEL_TRACES_EXPORTER=console`` prints
spans; anything else leaves the API's no-op tracer in place unless the host application
installs its own provider. Callers inject the context only when a span is recording, so an
untraced request carries no extra header and costs nothing extra on the hot path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context

TRACEPARENT = "traceparent"
tracer = trace.get_tracer("durable")


def configure_from_env(service_name: str) -> None:
    """Install a console exporter when ``OTEL_TRACES_EXPORTER=console`` (others need their own package)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return
    if os.environ.get("OTEL_TRACES_EXPORTER", "").lower() != "console":
        return
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter  # noqa: PLC0415

    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME",
                                                                                          service_name)}))
    provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
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
