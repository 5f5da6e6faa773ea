"""One trace follows a turn across the services: an in-test OTLP receiver (a gRPC server
implementing the collector's TraceService Export) takes the spans the platform exports, and the
turn's spans, from SendMessage at the session service through identity and into the runtime's
RunTurn, share one trace id, with the session and turn as span attributes. Log lines written
inside a span carry its trace id."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from corral.libs.metrics import configure_metrics
from corral.libs.observability import JsonFormatter
from corral.session.v1 import session_pb2
from corral.session.v1 import session_service_pb2 as pb
from tests.support.platform import directive, running_platform

pytestmark = pytest.mark.timeout(180)


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it: (trace id, span id, parent id, name, attributes)."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        {
                            "trace": span.trace_id.hex(),
                            "id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "name": span.name,
                            "kind": span.kind,
                            "attributes": {a.key: a.value.string_value for a in span.attributes},
                        }
                    )
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    server = grpc.aio.server()
    found = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(found, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield found, f"http://127.0.0.1:{port}"
    finally:
        await server.stop(0)


class Detachable(SpanProcessor):
    """Forwards spans to ``inner`` until detached (a provider cannot remove a processor)."""

    def __init__(self, inner: SpanProcessor) -> None:
        self.inner: SpanProcessor | None = inner

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if self.inner is not None:
            self.inner.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if self.inner is not None:
            self.inner.on_end(span)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis) if self.inner is not None else True

    def detach(self) -> None:
        inner, self.inner = self.inner, None
        if inner is not None:
            inner.shutdown()


def tracer_provider(endpoint: str) -> tuple[TracerProvider, Detachable]:
    """The process's SDK tracer provider (installed here if none is), exporting to
    ``endpoint`` too until the processor is detached."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider(resource=Resource.create({"service.name": "corral-test"}))
        trace.set_tracer_provider(provider)
    processor = Detachable(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    provider.add_span_processor(processor)
    return provider, processor


async def test_a_turn_is_one_trace_across_session_identity_and_runtime(
    tmp_path: Path, receiver: tuple[Receiver, str]
) -> None:
    found, endpoint = receiver
    # The process's meter provider without an OTLP reader (this receiver takes traces only).
    configure_metrics("corral-test")
    provider, processor = tracer_provider(endpoint)
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())
    rpc_log = logging.getLogger("corral.rpc")
    rpc_log.addHandler(handler)
    previous_level = rpc_log.level
    rpc_log.setLevel(logging.INFO)
    try:
        async with running_platform(tmp_path, otel_exporter_otlp_endpoint=endpoint) as platform:
            created = await platform.sessions.CreateSession(
                pb.CreateSessionRequest(session=session_pb2.Session(display_name="traced")),
                metadata=platform.auth,
            )
            session = created.session.name
            sent = await platform.sessions.SendMessage(
                pb.SendMessageRequest(
                    session=session,
                    text=directive({"text": "traced answer"}),
                    request_id=str(uuid.uuid4()),
                ),
                metadata=platform.auth,
            )
            call = platform.sessions.StreamSessionEvents(
                pb.StreamSessionEventsRequest(session=session), metadata=platform.auth
            )
            async with asyncio.timeout(60):
                async for response in call:
                    if response.event.HasField("turn_result"):
                        call.cancel()
                        break
        await asyncio.to_thread(provider.force_flush)
    finally:
        rpc_log.removeHandler(handler)
        rpc_log.setLevel(previous_level)
        processor.detach()

    spans = found.spans
    by_id = {span["id"]: span for span in spans}
    [send] = [
        s
        for s in spans
        if s["name"] == "/corral.session.v1.SessionService/SendMessage" and s["kind"] == 2
    ]  # SPAN_KIND_SERVER
    assert send["attributes"]["corral.session"] == session
    in_trace = [s for s in spans if s["trace"] == send["trace"]]
    names = {s["name"] for s in in_trace}
    # The runtime ran the turn inside the same trace, called by the session service.
    [run] = [
        s
        for s in in_trace
        if s["name"] == "/corral.runtime.v1.RuntimeService/RunTurn" and s["kind"] == 2
    ]
    assert run["attributes"]["corral.session"] == session
    assert sent.turn.name.endswith("/turns/" + run["attributes"]["corral.turn"])
    client = by_id[run["parent"]]
    assert client["name"] == "/corral.runtime.v1.RuntimeService/RunTurn" and client["kind"] == 3
    # Identity took part too (the turn's budget is reserved there), in the same trace.
    assert any(name.startswith("/corral.identity.v1.IdentityService/") for name in names), names
    # The runtime's span descends from the session's SendMessage: one tree from the request.
    chain = [run]
    while chain[-1]["parent"] in by_id:
        chain.append(by_id[chain[-1]["parent"]])
    assert send in chain, [span["name"] for span in chain]

    # The session service's log line of that SendMessage names the same trace.
    entries = [json.loads(line) for line in lines.getvalue().splitlines()]
    sends = [e for e in entries if e.get("method", "").endswith("/SendMessage")]
    assert sends and sends[0]["trace_id"] == send["trace"]
