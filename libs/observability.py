"""Structured logs and OpenTelemetry tracing, configured once per process."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and every ``extra=`` field."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if "trace_id" not in entry:
            # Whenever tracing is on, a line written inside a span names its trace.
            context = trace.get_current_span().get_span_context()
            if context.is_valid:
                entry["trace_id"] = format(context.trace_id, "032x")
                entry["span_id"] = format(context.span_id, "016x")
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Migrations announce every step at INFO; a start-up is not the place for that.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))


_tracing_configured = False


def configure_tracing(service_name: str, otlp_endpoint: str) -> None:
    """Install a tracer provider; spans are exported over OTLP only when an endpoint is set."""
    global _tracing_configured
    if _tracing_configured:
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    trace.set_tracer_provider(provider)
    _tracing_configured = True


# Request fields naming a session or a turn, and the span attributes they become.
_SPAN_FIELDS = (("session", "corral.session"), ("turn_id", "corral.turn"), ("turn", "corral.turn"))


def annotate_span(request: Any) -> None:
    """Put the session and turn a request names on the current span (when one is recording):
    ``corral.session`` (``sessions/...``) and ``corral.turn``. Span attributes, never metric
    labels: a trace may carry ids, a metric must not."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    for field, attribute in _SPAN_FIELDS:
        value = getattr(request, field, None)
        if isinstance(value, str) and value:
            span.set_attribute(attribute, value)
    name = getattr(request, "name", None)
    if isinstance(name, str) and name.startswith("sessions/"):
        span.set_attribute("corral.session", "/".join(name.split("/", 2)[:2]))


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""
