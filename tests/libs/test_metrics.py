"""The kit's metrics as a scraper sees them: a real server on port 0 with its /metrics endpoint,
real calls through the kit's client channel, and the liveness probe apart from readiness."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from corral.libs.grpc.client import create_channel
from corral.libs.grpc.health import DependencyCheck
from corral.libs.grpc.server import LIVENESS, CorralServer, ServerConfig
from corral.libs.metrics import configure_metrics

HEALTH = "grpc.health.v1.Health"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        return str(response.read().decode())


def sample(text: str, family: str, **labels: str) -> float:
    """The sum of ``family``'s samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(family)}\{{(.*)\}} (\S+)$", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


class Dependency:
    def __init__(self) -> None:
        self.up = True

    async def probe(self) -> None:
        if not self.up:
            raise ConnectionError("database down")


@pytest.fixture
async def server() -> AsyncIterator[tuple[CorralServer, Dependency]]:
    configure_metrics("corral-test")
    dependency = Dependency()
    srv = CorralServer(
        ServerConfig(
            name="probe",
            checks=[DependencyCheck("database", dependency.probe)],
            health_interval=3600,
            tracing=False,
            metrics_port=0,
            metrics_shared=False,
        ),
        [],
    )
    await srv.start()
    try:
        yield srv, dependency
    finally:
        await srv.stop(0)


async def test_server_and_client_calls_are_counted_by_service_method_and_code(
    server: tuple[CorralServer, Dependency],
) -> None:
    srv, _ = server
    assert srv.metrics_port
    before = await asyncio.to_thread(scrape, srv.metrics_port)
    channel = create_channel(srv.address, token_provider=None, tracing=False)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(3):
            await stub.Check(health_pb2.HealthCheckRequest(service=""))
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=LIVENESS))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        ended = asyncio.Event()
        watch.add_done_callback(lambda _: ended.set())
        watch.cancel()
        await ended.wait()
        # The stream's client-side outcome is recorded by a task its end starts.
        for _ in range(10):
            await asyncio.sleep(0)
    finally:
        await channel.close()
    after = await asyncio.to_thread(scrape, srv.metrics_port)

    def delta(family: str, **labels: str) -> float:
        return sample(after, family, **labels) - sample(before, family, **labels)

    ok = {"service": HEALTH, "method": "Check", "code": "OK"}
    missing = {"service": HEALTH, "method": "Check", "code": "NOT_FOUND"}
    assert delta("corral_rpc_server_requests_total", **ok) == 3
    assert delta("corral_rpc_server_requests_total", **missing) == 1
    assert delta("corral_rpc_server_errors_total", **missing) == 1
    assert delta("corral_rpc_server_errors_total", **ok) == 0
    assert delta("corral_rpc_server_duration_seconds_count", **ok) == 3
    assert delta("corral_rpc_server_duration_seconds_bucket", le="+Inf", **ok) == 3
    assert delta("corral_rpc_client_requests_total", **ok) == 3
    assert delta("corral_rpc_client_requests_total", **missing) == 1
    assert delta("corral_rpc_client_duration_seconds_count", **missing) == 1
    watched = {"service": HEALTH, "method": "Watch", "code": "CANCELLED"}
    assert delta("corral_rpc_client_requests_total", **watched) == 1
    assert sample(after, "corral_process_memory_bytes") > 0
    assert sample(after, "corral_process_cpu_seconds_total") > 0


async def test_liveness_stays_serving_while_readiness_follows_the_database(
    server: tuple[CorralServer, Dependency],
) -> None:
    srv, dependency = server
    async with grpc.aio.insecure_channel(srv.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def status(name: str) -> int:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            return int(reply.status)

        serving = health_pb2.HealthCheckResponse.SERVING
        assert await status("") == serving
        assert await status(LIVENESS) == serving
        dependency.up = False
        assert await srv.readiness.refresh() is False
        assert await status("") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await status(LIVENESS) == serving
        dependency.up = True
        assert await srv.readiness.refresh() is True
        assert await status("") == serving


async def test_the_endpoint_answers_only_metrics(server: tuple[CorralServer, Dependency]) -> None:
    srv, _ = server
    with pytest.raises(urllib.error.HTTPError) as missing:
        await asyncio.to_thread(
            urllib.request.urlopen, f"http://127.0.0.1:{srv.metrics_port}/admin", timeout=5
        )
    assert missing.value.code == 404


def test_a_served_certificate_reports_when_it_expires(tmp_path: Path) -> None:
    from cryptography import x509

    from corral.libs.config import Settings
    from corral.libs.metrics import exposition
    from corral.libs.tls import server_credentials
    from tests.edge.test_tls import _make_pki

    configure_metrics("corral-test")
    pki = _make_pki(tmp_path)
    cert = tmp_path / "metrics-test-cert.pem"  # a name no other test's certificate has
    cert.write_bytes(pki.cert.read_bytes())
    assert server_credentials(Settings(tls_cert_file=cert, tls_key_file=pki.key)) is not None
    expires = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
    text = exposition().decode()
    assert sample(
        text, "corral_tls_certificate_expiry_seconds", use="service", file=cert.name
    ) == pytest.approx(expires.timestamp())


@pytest.mark.postgres
async def test_pool_metrics_show_connections_in_use_and_units_of_work_waiting(
    postgres_url: str,
) -> None:
    from corral.libs import db
    from corral.libs.metrics import exposition

    configure_metrics("corral-test")
    engine = db.create_engine(postgres_url, pool_size=1)  # and as many again in overflow
    service = f"pool-test-{id(engine)}"
    db.instrument_engine(engine, service)

    def read(family: str, **labels: str) -> float:
        return sample(exposition().decode(), family, service=service, **labels)

    try:
        async with db.UnitOfWork(engine), db.UnitOfWork(engine):
            assert read("corral_db_pool_connections", state="in_use") == 2
            assert read("corral_db_pool_connections", state="size") == 1
            third = asyncio.create_task(db.UnitOfWork(engine).__aenter__())
            for _ in range(20):  # let it reach the pool and queue there
                await asyncio.sleep(0)
            assert read("corral_db_pool_waiting") == 1
        unit = await asyncio.wait_for(third, 10)  # a connection came back: it got one
        assert read("corral_db_pool_waiting") == 0
        await unit.__aexit__(None, None, None)
        assert read("corral_db_pool_acquire_duration_seconds_count") == 3
        assert read("corral_db_pool_connections", state="in_use") == 0
    finally:
        await engine.dispose()
