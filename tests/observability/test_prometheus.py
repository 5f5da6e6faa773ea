"""What an operator's Prometheus sees: Debian's real `prometheus` scrapes a running platform
(identity, session and runtime in one process, one /metrics endpoint, Redis as the event hub)
through a few agent turns, and every metric family has non-zero values in its HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
import uuid
from pathlib import Path

import pytest

from corral.session.v1 import session_pb2
from corral.session.v1 import session_service_pb2 as pb
from tests.conftest import require_redis
from tests.observability.prom import Prometheus, family_names, running_prometheus
from tests.support.platform import Platform, directive, running_platform, until_turn_over

pytestmark = [pytest.mark.redis, pytest.mark.timeout(240)]

# The kit's families (libs/metrics.py EXPORTED) that a few turns make non-zero, as PromQL.
KIT = {
    "rpc server requests": 'sum(corral_rpc_server_requests_total{method="SendMessage",code="OK"})',
    "rpc server latency": "sum(corral_rpc_server_duration_seconds_count)",
    "rpc server errors": 'sum(corral_rpc_server_errors_total{code="NOT_FOUND"})',
    "rpc client requests": (
        'sum(corral_rpc_client_requests_total{service="corral.runtime.v1.RuntimeService"})'
    ),
    "rpc client latency": "sum(corral_rpc_client_duration_seconds_count)",
    "db pool size": 'sum(corral_db_pool_connections{state="size",service="session"})',
    "db pool acquire": "sum(corral_db_pool_acquire_duration_seconds_count)",
    "redis round trips": 'sum(corral_redis_round_trips_total{service="session"})',
    "event-hub stream lag": "sum(corral_eventhub_stream_lag_seconds_count)",
    "event-hub fan-out lag": "sum(corral_eventhub_fanout_lag_seconds_count)",
    "process cpu": "sum(corral_process_cpu_seconds_total)",
    "process memory": "sum(corral_process_memory_bytes)",
}
# Present (a series exists) though usually zero on an idle platform.
KIT_PRESENT = ("corral_db_pool_waiting", 'corral_db_pool_connections{state="in_use"}')

# The domain families of the services (the other half of issue 13) that turns make non-zero.
DOMAIN = {
    "sign-ins": 'sum(corral_identity_sign_ins_total{method="password"})',
    "tokens issued": "sum(corral_identity_tokens_issued_total)",
    "usage reservations": "sum(corral_identity_reservations_total)",
    "reservations ended": "sum(corral_identity_reservations_ended_total)",
    "agent tokens": "sum(corral_runtime_tokens_total)",
    "live CLI processes": "sum(corral_runtime_cli_processes)",
    "CLI memory": "sum(corral_runtime_cli_memory_bytes)",
    "model endpoint up": "min(corral_runtime_model_endpoint_up)",
    "sessions created": "sum(corral_session_sessions_created_total)",
    "turns completed": 'sum(corral_session_turns_completed_total{status="succeeded"})',
    "turn duration": "sum(corral_session_turn_duration_seconds_count)",
    "time to first event": "sum(corral_session_turn_time_to_first_event_seconds_count)",
    "events appended": "sum(corral_session_events_appended_total)",
}
DOMAIN_PRESENT = (
    "corral_runtime_cost_usd_total",  # the offline model's turns may cost nothing
    "corral_runtime_pool_evictions_total",
    "corral_session_turns_queued",
    "corral_session_streams_live",
    "corral_session_permission_requests_waiting",
)


async def run_turns(platform: Platform, count: int) -> None:
    """``count`` agent turns in one session, each waited for through the event stream."""
    created = await platform.sessions.CreateSession(
        pb.CreateSessionRequest(session=session_pb2.Session(display_name="metrics")),
        metadata=platform.auth,
    )
    session = created.session.name
    for turn in range(count):
        await platform.sessions.SendMessage(
            pb.SendMessageRequest(
                session=session,
                text=directive({"text": f"answer {turn}", "chunk": 3}),
                request_id=str(uuid.uuid4()),
            ),
            metadata=platform.auth,
        )
        call = platform.sessions.StreamSessionEvents(
            pb.StreamSessionEventsRequest(session=session), metadata=platform.auth
        )
        results = 0
        async with asyncio.timeout(60):
            async for response in call:
                if response.event.HasField("turn_result"):
                    results += 1
                    if results == turn + 1:
                        call.cancel()
                        break
        await until_turn_over(platform, session)


async def a_not_found(platform: Platform) -> None:
    with pytest.raises(Exception, match="NOT_FOUND"):
        await platform.sessions.GetSession(
            pb.GetSessionRequest(name="sessions/does-not-exist"), metadata=platform.auth
        )


async def until_all_present(prom: Prometheus, missing: dict[str, str]) -> None:
    """Until every family has its values in Prometheus; ``missing`` says what is not (yet)."""
    while True:
        missing.clear()
        for what, query in {**KIT, **DOMAIN}.items():
            if await prom.value(query) <= 0:
                missing[what] = query
        for name in (*KIT_PRESENT, *DOMAIN_PRESENT):
            reply = await prom.api("/api/v1/query", query=name)
            if not reply["data"]["result"]:
                missing[name] = name
        if not missing:
            return
        # Prometheus scrapes each second: poll its API, bounded by the caller's timeout.
        await asyncio.sleep(0.5)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return str(response.read().decode())


async def test_prometheus_scrapes_every_family_through_agent_turns(tmp_path: Path) -> None:
    redis_url = await require_redis()
    async with running_platform(tmp_path / "platform", metrics_port=0, redis_url=redis_url) as p:
        ports = {app.server.metrics_port for app in p.apps.values()}
        assert len(ports) == 1, "one process, one shared endpoint"
        (port,) = ports
        assert port
        async with running_prometheus(tmp_path / "prometheus", [f"127.0.0.1:{port}"]) as prom:
            await run_turns(p, 3)
            await a_not_found(p)

            missing: dict[str, str] = {}
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(60):
                    await until_all_present(prom, missing)
            text = await asyncio.to_thread(scrape, port)
            assert not missing, [line for line in text.splitlines() if "bucket" not in line]

            assert [t["labels"]["job"] for t in await prom.targets_up()] == ["corral"]
            # Labels stay low-cardinality: no series names a session, a user or a request.
            series = await prom.api("/api/v1/series", **{"match[]": '{__name__=~"corral_.+"}'})
            labels = {key for item in series["data"] for key in item}
            assert not labels & {"session", "session_id", "user", "request_id", "turn"}
    from corral.libs.metrics import EXPORTED

    exported = family_names(text)
    plaintext = set(EXPORTED) - {"corral_tls_certificate_expiry_seconds"}  # TLS serving only
    assert plaintext <= {name.removesuffix("_total") for name in exported} | exported
