"""Metrics: the OpenTelemetry metrics API, one MeterProvider per process, read out two ways.

* Prometheus' text format on an HTTP port (``GET /metrics``), served by the process's own event
  loop (a scrape that times out says the loop is stuck). ``CORRAL_METRICS_PORT`` opens one
  endpoint for the whole process (``corral dev`` runs every service in one process: one
  endpoint serves them all, each series labelled with its ``service``);
  ``CORRAL_<SERVICE>_METRICS_PORT`` gives one service a listener of its own (serving the same
  process-wide registry). ``0`` picks a free port; unset means no endpoint.
* OTLP (gRPC), every 15 s, when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.

Services take their meter from :meth:`corral.libs.app.Infrastructure.meter` (or :func:`meter`);
instruments created before the provider is configured start working once it is. Labels are
low-cardinality: never a session, user, turn or request id.

Names in Prometheus follow OpenTelemetry's translation: ``corral.rpc.server.requests``
(a counter) becomes ``corral_rpc_server_requests_total``, a histogram in ``s`` gets
``_seconds``. :data:`EXPORTED` lists every family the kit exports; the dashboard test checks
against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Meter, Observation

log = logging.getLogger("corral.metrics")

# Latency buckets in seconds: sub-millisecond kit calls up to minute-long turns.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

# Every family the kit itself exports (Prometheus names), for dashboards, alerts and tests.
EXPORTED: tuple[str, ...] = (
    "corral_rpc_server_requests_total",
    "corral_rpc_server_errors_total",
    "corral_rpc_server_duration_seconds",
    "corral_rpc_client_requests_total",
    "corral_rpc_client_duration_seconds",
    "corral_db_pool_connections",
    "corral_db_pool_waiting",
    "corral_db_pool_acquire_duration_seconds",
    "corral_redis_round_trips_total",
    "corral_eventhub_stream_lag_seconds",
    "corral_eventhub_fanout_lag_seconds",
    "corral_process_cpu_seconds_total",
    "corral_process_memory_bytes",
    "corral_tls_certificate_expiry_seconds",  # only in processes serving TLS
)


@dataclass
class _State:
    provider: Any = None
    registry: Any = None
    endpoints: dict[int | str, _Endpoint] = field(default_factory=dict)


_state = _State()


def meter(name: str) -> Meter:
    """A meter of the process's provider (a proxy until :func:`configure_metrics` runs)."""
    return metrics.get_meter(name)


def configure_metrics(service_name: str, otlp_endpoint: str = "") -> None:
    """Install the process's MeterProvider once: a Prometheus reader, plus OTLP when an endpoint
    is set. Later calls do nothing (one provider per process)."""
    if _state.provider is not None:
        return
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.resources import Resource
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=True)
    readers: list[MetricReader] = [PrometheusMetricReader(registry=registry)]
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(
            PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=otlp_endpoint), export_interval_millis=15_000
            )
        )
    provider = MeterProvider(
        metric_readers=readers, resource=Resource.create({"service.name": service_name})
    )
    metrics.set_meter_provider(provider)
    _state.provider = provider
    _state.registry = registry
    _process_instruments()


def exposition() -> bytes:
    """The process's metrics in Prometheus' text format."""
    from prometheus_client import generate_latest

    return generate_latest(_state.registry) if _state.registry is not None else b""


# ---- process CPU and memory ----------------------------------------------------------------


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _process_instruments() -> None:
    m = meter("corral.process")

    def cpu(_: CallbackOptions) -> Iterable[Observation]:
        times = os.times()
        yield Observation(times.user, {"mode": "user"})
        yield Observation(times.system, {"mode": "system"})

    def memory(_: CallbackOptions) -> Iterable[Observation]:
        yield Observation(_rss_bytes(), {"kind": "rss"})

    m.create_observable_counter(
        "corral.process.cpu", [cpu], unit="s", description="CPU time of this process"
    )
    m.create_observable_gauge(
        "corral.process.memory", [memory], unit="By", description="resident memory"
    )


# ---- the HTTP endpoint ------------------------------------------------------------------


class _Endpoint:
    """``GET /metrics`` over HTTP/1.1 on the event loop; shared by the services that use it."""

    def __init__(self, server: asyncio.Server) -> None:
        self.server = server
        self.users = 0
        sockets = server.sockets
        self.port: int = sockets[0].getsockname()[1] if sockets else 0

    @staticmethod
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readuntil(b"\r\n\r\n")
            line = request.split(b"\r\n", 1)[0].split()
            path = line[1].split(b"?", 1)[0] if len(line) > 1 else b""
            if line[:1] == [b"GET"] and path in (b"/metrics", b"/"):
                body, status = exposition(), b"200 OK"
                kind = b"text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, kind = b"not found\n", b"404 Not Found", b"text/plain"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind
                + b"\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n" + body
            )  # fmt: skip
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def open_endpoint(
    host: str, port: int, key: str | None = None
) -> tuple[int, Callable[[], Any]]:
    """Serve ``/metrics`` on ``host:port`` (shared by every caller passing the same ``key``, or
    the same fixed port); returns the bound port and an async ``close`` for this user."""
    ident: int | str = key if key is not None else port
    endpoint = _state.endpoints.get(ident)
    if endpoint is None:
        server = await asyncio.start_server(_Endpoint.handle, host, port)
        endpoint = _state.endpoints[ident] = _Endpoint(server)
        log.info("metrics endpoint", extra={"address": f"{host}:{endpoint.port}"})
    endpoint.users += 1
    closed = False

    async def close() -> None:
        nonlocal closed
        if closed:
            return
        closed = True
        endpoint.users -= 1
        if endpoint.users == 0 and _state.endpoints.get(ident) is endpoint:
            del _state.endpoints[ident]
            endpoint.server.close()
            with contextlib.suppress(Exception):
                await endpoint.server.wait_closed()

    return endpoint.port, close
