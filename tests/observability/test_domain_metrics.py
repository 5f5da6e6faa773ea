"""The domain metrics of issue 13, read as an operator's collector reads them: a MeterProvider
with an in-memory reader is installed for each test, a real session service (its runtime,
ledger and audit log faked at their ports) or a real runtime (the real SDK and CLI against the
offline model) is driven through known actions, and each family must hold what they add up to.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from prometheus_client import CollectorRegistry, generate_latest

from corral.identity.v1 import identity_service_pb2 as identity_pb
from corral.identity.v1 import identity_service_pb2_grpc as identity_rpc
from corral.identity.v1 import quota_pb2, usage_pb2
from corral.libs import db
from corral.libs.auth import StaticJwksSource, TokenVerifier
from corral.libs.auth.revocation import InMemoryRevocations
from corral.libs.config import Settings
from corral.libs.eventhub import InMemoryHub
from corral.libs.grpc.interceptors import AuthenticationHook
from corral.libs.grpc.server import CorralServer, ServerConfig
from corral.runtime.v1 import runtime_service_pb2 as runtime_pb
from corral.runtime.v1 import runtime_service_pb2_grpc as runtime_rpc
from corral.runtime.v1.runtime_event_pb2 import TurnResult
from corral.services.identity import metrics as identity_metrics
from corral.services.identity.config import IdentitySettings
from corral.services.identity.main import Dependencies, build_server
from corral.services.runtime import metrics as runtime_metrics
from corral.services.runtime import model_endpoint
from corral.services.runtime.main import compose
from corral.services.session import metrics as session_metrics
from corral.services.session.main import MIGRATIONS, wire
from corral.session.v1 import permission_pb2, session_pb2
from corral.session.v1 import session_service_pb2 as pb
from corral.session.v1 import session_service_pb2_grpc as rpc
from tests.identity.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, bearer
from tests.runtime.conftest import (
    MODEL,
    ORG,
    SANDBOX_READ_ONLY,
    directive,
    options,
    service_token,
)
from tests.session.conftest import TEST_KEYS
from tests.session.fakes import FakeAudit, FakeLedger, FakeRuntime, FakeWorkspaces
from tests.support.grpc_tools import free_port
from tests.support.keys import AUDIENCE, ISSUER, SigningKey

ENQUEUE = pb.SendMessageRequest.BUSY_STRATEGY_ENQUEUE
DEFAULT_ORG = "organizations/default"


class Metrics:
    """What the reader collects: one number per metric and label set."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])

    def meter(self, name: str) -> Any:
        return self.provider.get_meter(name)

    def points(self, name: str) -> list[NumberDataPoint | HistogramDataPoint]:
        data = self.reader.get_metrics_data()
        found: list[NumberDataPoint | HistogramDataPoint] = []
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)  # type: ignore[arg-type]
        return found

    def value(self, name: str, **labels: str) -> float:
        """A counter's or gauge's value (summed over the series matching ``labels``); for a
        histogram, its count."""
        total = 0.0
        for point in self.points(name):
            if all(point.attributes.get(k) == v for k, v in labels.items()):
                total += point.count if isinstance(point, HistogramDataPoint) else point.value
        return total

    def labels(self, name: str) -> list[dict[str, Any]]:
        return [dict(point.attributes) for point in self.points(name)]


# -- the session service -------------------------------------------------------------------------


@dataclass
class Session:
    stub: rpc.SessionServiceStub
    runtime: FakeRuntime
    ledger: FakeLedger
    metrics: Metrics
    key: SigningKey

    def auth(self) -> tuple[tuple[str, str], ...]:
        org = "organizations/acme"
        token = self.key.token(sub=f"{org}/users/alice", org=org, roles=["user"])
        return (("authorization", f"Bearer {token}"),)

    async def create(self) -> str:
        request = pb.CreateSessionRequest(session=session_pb2.Session())
        return str((await self.stub.CreateSession(request, metadata=self.auth())).session.name)

    async def send(self, session: str, text: str) -> None:
        request = pb.SendMessageRequest(session=session, text=text, busy_strategy=ENQUEUE)
        await self.stub.SendMessage(request, metadata=self.auth())


@pytest.fixture
async def session_stack(
    tmp_path: Path, signing_key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Session]:
    monkeypatch.setenv("CORRAL_ENCRYPTION_KEYS", TEST_KEYS)
    engine = db.create_engine(f"sqlite+aiosqlite:///{tmp_path}/session.db", schema="session")
    await db.migrate(engine, MIGRATIONS, schema="session")
    hub, runtime, ledger = InMemoryHub(), FakeRuntime(), FakeLedger()
    metrics = Metrics()
    wired = wire(
        engine,
        hub,
        runtime,
        ledger,
        FakeAudit(),
        workspaces=FakeWorkspaces(),
        heartbeat_seconds=0.3,
        lease_seconds=30.0,
        meter=metrics.meter("corral.session"),
    )
    verifier = TokenVerifier(StaticJwksSource(signing_key.jwks()), issuer=ISSUER, audience=AUDIENCE)
    server = CorralServer(
        ServerConfig(
            name="session", hooks=[AuthenticationHook(verifier)], tracing=False, metrics=False
        ),
        [wired.registration],
    )
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    try:
        yield Session(rpc.SessionServiceStub(channel), runtime, ledger, metrics, signing_key)
    finally:
        await channel.close()
        await wired.service.close()
        await server.stop(0)
        await hub.close()
        await engine.dispose()
        metrics.provider.shutdown()


async def first_event(stack: Session, session: str) -> grpc.aio.UnaryStreamCall[Any, Any]:
    """A watcher of ``session``, once it has its first event (the server is streaming)."""
    call = stack.stub.StreamSessionEvents(
        pb.StreamSessionEventsRequest(session=session), metadata=stack.auth()
    )
    async with asyncio.timeout(10):
        await call.read()
    return call


async def read_until(call: grpc.aio.UnaryStreamCall[Any, Any], kind: str) -> None:
    """Read a watcher's events up to one of ``kind``."""
    async with asyncio.timeout(10):
        while (await call.read()).event.WhichOneof("payload") != kind:
            pass


async def test_session_metrics_follow_sessions_turns_watchers_and_permissions(
    session_stack: Session,
) -> None:
    stack, m = session_stack, session_stack.metrics
    first, second = await stack.create(), await stack.create()
    assert m.value("corral.session.sessions.created") == 2

    # Two turns that succeed, one after the other.
    for n in range(2):
        await stack.send(first, f"hello {n}")
        turn = await stack.runtime.next_turn()
        turn.text("hi")
        turn.finish()
        await stack.ledger.wait_settled(n + 1)
    assert m.value("corral.session.turns.completed", status="succeeded") == 2
    assert m.value("corral.session.turn.duration", status="succeeded") == 2
    assert m.value("corral.session.turn.time_to_first_event") == 2
    assert m.value("corral.session.events.appended", type="user_message") == 2
    assert m.value("corral.session.events.appended", type="turn_result") == 2
    # turn_started, text_delta, text_block, turn_result and two state changes per turn, and a
    # user_message: every one counted once.
    assert m.value("corral.session.events.appended") == 2 * 7

    # A turn that runs and asks for a permission while two more wait behind it.
    watcher = await first_event(stack, second)
    assert m.value("corral.session.streams.live") == 1
    await stack.send(second, "run ls")
    running = await stack.runtime.next_turn()
    await stack.send(second, "then this")
    await stack.send(second, "and this")
    assert m.value("corral.session.turns.queued") == 2
    running.emit(permission_request={"id": "p1", "tool_name": "Bash", "input": {}})
    await read_until(watcher, "permission_request")
    assert m.value("corral.session.permission_requests.waiting") == 1
    await stack.stub.RespondToPermission(
        pb.RespondToPermissionRequest(
            session=second,
            permission_request_id="p1",
            decision=permission_pb2.PermissionDecision.DECISION_ALLOW,
        ),
        metadata=stack.auth(),
    )
    await read_until(watcher, "permission_decision")
    assert m.value("corral.session.permission_requests.waiting") == 0
    running.crash()  # the runtime breaks off: the turn FAILED
    await stack.ledger.wait_settled(3)
    for _ in range(2):
        queued = await stack.runtime.next_turn()
        queued.finish()
    await stack.ledger.wait_settled(5)
    assert m.value("corral.session.turns.queued") == 0
    assert m.value("corral.session.turns.completed", status="failed") == 1
    assert m.value("corral.session.turns.completed", status="succeeded") == 4
    assert m.value("corral.session.turn.duration") == 5
    # The watcher's stream ends (its session is deleted): it is no longer counted.
    await stack.stub.DeleteSession(pb.DeleteSessionRequest(name=second), metadata=stack.auth())
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await read_until(watcher, "never")
    assert ended.value.code() == grpc.StatusCode.NOT_FOUND
    assert m.value("corral.session.streams.live") == 0

    # Never a session, turn or user id as a label.
    for name in ("corral.session.turns.completed", "corral.session.events.appended"):
        assert all(set(labels) <= {"status", "type"} for labels in m.labels(name)), name


# -- the runtime ---------------------------------------------------------------------------------


@dataclass
class Runtime:
    stub: runtime_rpc.RuntimeServiceStub
    health: health_pb2_grpc.HealthStub
    service: Any
    token: str
    metrics: Metrics
    workspaces: Path  # storage's folder of workspaces
    turns: int = 0

    async def turn(self, session: str, prompt: str, *, organization: str = ORG) -> list[Any]:
        return [response.event async for response in self.call(session, prompt, organization)]

    def call(
        self, session: str, prompt: str, organization: str = ORG
    ) -> grpc.aio.UnaryStreamCall[Any, Any]:
        self.turns += 1
        (self.workspaces / session).mkdir(parents=True, exist_ok=True)  # as storage makes it
        request = runtime_pb.RunTurnRequest(
            session=f"sessions/{session}",
            turn_id=f"turn-{self.turns}",
            organization=organization,
            actor=f"{organization}/users/alice",
            workspace=f"workspaces/{session}",
            options=options(),
            prompt=prompt,
        )
        return self.stub.RunTurn(
            request, metadata=(("authorization", f"Bearer {self.token}"),), timeout=60
        )

    async def status(self, name: str) -> int:
        request = health_pb2.HealthCheckRequest(service=name)
        return int((await self.health.Check(request)).status)


@pytest.fixture
async def make_runtime(
    tmp_path: Path, signing_key: SigningKey
) -> AsyncIterator[Callable[..., Any]]:
    started: list[tuple[Any, grpc.aio.Channel]] = []

    async def make(**settings: Any) -> Runtime:
        settings.setdefault("anthropic_base_url", "")
        config = Settings(
            data_dir=tmp_path,
            runtime_root=tmp_path / f"runtime-{len(started)}",
            anthropic_api_key="",
            rate_limit_burst=1000,
            runtime_sandbox_read_only=SANDBOX_READ_ONLY,
            metrics_enabled=False,
            **settings,
        )
        metrics = Metrics()
        app, service = await compose(
            config,
            port=0,
            jwks_source=StaticJwksSource(signing_key.jwks()),
            meter=metrics.meter("corral.runtime"),
            model_check_seconds=3600,  # the test checks when it wants to
        )
        await app.start()
        channel = grpc.aio.insecure_channel(app.server.address)
        started.append((app, channel))
        return Runtime(
            runtime_rpc.RuntimeServiceStub(channel),
            health_pb2_grpc.HealthStub(channel),
            service,
            service_token(signing_key),
            metrics,
            config.workspaces_dir(),
        )

    yield make
    for app, channel in started:
        await channel.close()
        await app.stop(0)


def session_id() -> str:
    return f"s-{uuid.uuid4().hex[:12]}"


async def test_runtime_metrics_count_tokens_cost_processes_and_evictions(
    make_runtime: Callable[..., Any],
) -> None:
    runtime: Runtime = await make_runtime(runtime_pool_size=1)
    m = runtime.metrics
    acme, globex = ORG, "organizations/globex"

    first = await runtime.turn(
        session_id(), directive({"usage": {"input_tokens": 1000, "output_tokens": 20}})
    )
    result = first[-1].turn_result
    assert result.usage.input_tokens >= 1000 and result.usage.cost_usd_micros > 0
    # Its process stays warm: one live CLI, with its memory.
    assert m.value("corral.runtime.cli.processes") == 1
    assert m.value("corral.runtime.cli.memory") > 10 * 1024 * 1024
    # Another organisation's session needs the only slot: the idle process is evicted.
    second = await runtime.turn(
        session_id(),
        directive({"usage": {"input_tokens": 3000, "output_tokens": 5}}),
        organization=globex,
    )
    assert second[-1].turn_result.status == result.status

    def tokens(org: str, kind: str) -> float:
        return m.value("corral.runtime.tokens", organization=org, model=MODEL, kind=kind)

    assert tokens(acme, "input") == result.usage.input_tokens
    assert tokens(acme, "output") == result.usage.output_tokens
    assert tokens(globex, "input") == second[-1].turn_result.usage.input_tokens >= 3000
    cost = m.value("corral.runtime.cost.usd", organization=acme, model=MODEL)
    assert cost == pytest.approx(result.usage.cost_usd_micros / 1e6)
    assert m.value("corral.runtime.cost.usd", organization=globex, model=MODEL) > cost
    assert m.value("corral.runtime.pool.evictions", reason="lru") == 1
    assert m.value("corral.runtime.pool.evictions", reason="idle") == 0
    assert m.value("corral.runtime.pool.exhausted") == 0
    assert m.value("corral.runtime.cli.processes") == 1

    # The idle reaper's stops are evictions too, and leave no process (nor memory) behind.
    runtime.service.pool.idle_seconds = 0
    assert await runtime.service.reap_idle() == 1
    assert m.value("corral.runtime.pool.evictions", reason="idle") == 1
    assert m.value("corral.runtime.cli.processes") == 0
    assert m.value("corral.runtime.cli.memory") == 0
    for labels in m.labels("corral.runtime.tokens"):
        assert set(labels) == {"organization", "model", "kind"}


async def test_a_full_pool_counts_as_exhausted(make_runtime: Callable[..., Any]) -> None:
    # No turn may wait for a process: the second is refused at once.
    runtime: Runtime = await make_runtime(runtime_pool_size=1, runtime_pool_queue_size=0)
    # A turn that waits for a person holds the only process.
    write = {"tool": "Bash", "input": {"command": "echo yes > asked.txt"}}
    waiting = runtime.call(session_id(), directive(write, {"text": "done"}))
    async with asyncio.timeout(60):
        async for response in waiting:
            if response.event.HasField("permission_request"):
                break
    assert runtime.metrics.value("corral.runtime.pool.exhausted") == 0
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await runtime.turn(session_id(), directive({"text": "hi"}))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert runtime.metrics.value("corral.runtime.pool.exhausted") == 1
    waiting.cancel()


async def test_the_model_endpoint_has_a_health_name_and_a_gauge_of_its_own(
    make_runtime: Callable[..., Any],
) -> None:
    # The offline model answers (a 404 for "/" still proves it is there).
    up: Runtime = await make_runtime()
    assert await up.status(model_endpoint.SERVICE_NAME) in (
        health_pb2.HealthCheckResponse.UNKNOWN,
        health_pb2.HealthCheckResponse.SERVING,
    )
    assert await up.service.model_endpoint.check() is True
    assert await up.status(model_endpoint.SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    assert up.metrics.value("corral.runtime.model_endpoint.up") == 1

    # A model endpoint nobody listens on: its name says so, the runtime stays in rotation.
    down: Runtime = await make_runtime(anthropic_base_url=f"http://127.0.0.1:{free_port()}")
    assert await down.service.model_endpoint.check() is False
    assert down.metrics.value("corral.runtime.model_endpoint.up") == 0
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert await down.status(model_endpoint.SERVICE_NAME) == not_serving
    serving = health_pb2.HealthCheckResponse.SERVING
    assert await down.status("") == serving
    assert await down.status("corral.runtime.v1.RuntimeService") == serving


# -- identity ------------------------------------------------------------------------------------


async def test_identity_counts_sign_ins_tokens_and_revocations(tmp_path: Path) -> None:
    m = Metrics()
    settings = IdentitySettings(
        env="development",
        identity_database_url=f"sqlite+aiosqlite:///{tmp_path}/identity.db",
        identity_database_schema="identity",
        data_dir=tmp_path,
        identity_port=0,
        identity_http_port=0,
        bootstrap_admin_email=ADMIN_EMAIL,
        bootstrap_admin_password=ADMIN_PASSWORD,
        identity_argon2_time_cost=1,
        identity_argon2_memory_kib=256,
        identity_argon2_parallelism=1,
        identity_key_encryption_key="",
        metrics_enabled=False,
    )
    deps = Dependencies(settings, revocations=InMemoryRevocations(), meter=m.meter("identity"))
    app = await build_server(deps, port=0)
    await app.start()
    channel = grpc.aio.insecure_channel(app.server.address)
    try:
        stub = identity_rpc.IdentityServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Login(identity_pb.LoginRequest(email=ADMIN_EMAIL, password="wrong"))
        signed_in = await stub.Login(
            identity_pb.LoginRequest(email=ADMIN_EMAIL, password=ADMIN_PASSWORD)
        )
        refreshed = await stub.RefreshToken(
            identity_pb.RefreshTokenRequest(refresh_token=signed_in.token.refresh_token)
        )
        root = bearer(signed_in.token.access_token)
        # The development service account's key (what the other services sign in with).
        key = (tmp_path / "service-api-key").read_text().strip()
        await stub.ExchangeApiKey(identity_pb.ExchangeApiKeyRequest(api_key=key))
        # One concurrent session allowed: a reservation, a refusal, a release.
        await stub.UpdateQuota(
            identity_pb.UpdateQuotaRequest(
                quota=quota_pb2.Quota(name=f"{DEFAULT_ORG}/quota", max_concurrent_sessions=1),
                update_mask=field_mask_pb2.FieldMask(paths=["max_concurrent_sessions"]),
            ),
            metadata=root,
        )
        held = await stub.ReserveUsage(reservation(), metadata=root)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ReserveUsage(reservation(), metadata=root)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await stub.ReleaseUsage(
            identity_pb.ReleaseUsageRequest(name=held.usage_reservation.name), metadata=root
        )
        await stub.Logout(identity_pb.LogoutRequest(refresh_token=refreshed.token.refresh_token))
    finally:
        await channel.close()
        await app.stop(0)

    sign_ins = "corral.identity.sign_ins"
    assert m.value(sign_ins, method="password", outcome="invalid_credentials") == 1
    assert m.value(sign_ins, method="password", outcome="succeeded") == 1
    assert m.value("corral.identity.tokens.issued", grant="password") == 1
    assert m.value("corral.identity.tokens.issued", grant="refresh_token") == 1
    assert m.value("corral.identity.revocations", kind="session", outcome="published") == 1
    assert m.value(sign_ins, method="api_key", outcome="succeeded") == 1
    assert m.value("corral.identity.tokens.issued", grant="api_key") == 1
    assert m.value("corral.identity.reservations", outcome="reserved") == 1
    assert m.value("corral.identity.reservations", outcome="quota_exceeded") == 1
    assert m.value("corral.identity.reservations.ended", how="released") == 1
    for name in ("corral.identity.sign_ins", "corral.identity.reservations"):
        assert all(set(labels) <= {"method", "outcome"} for labels in m.labels(name)), name


def reservation() -> identity_pb.ReserveUsageRequest:
    return identity_pb.ReserveUsageRequest(
        parent=DEFAULT_ORG,
        subject=DEFAULT_ORG,
        amounts=[usage_pb2.UsageAmount(kind=usage_pb2.USAGE_KIND_SESSIONS, amount=1)],
        ttl=duration_pb2.Duration(seconds=60),
        request_id=str(uuid.uuid4()),
    )


# -- the names an operator types -----------------------------------------------------------------


def test_every_family_is_exported_under_its_documented_prometheus_name() -> None:
    """Each EXPORTED name comes out of the Prometheus exporter, and each service's README table
    lists its own."""
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    session = session_metrics.for_meter(provider.get_meter("s"))
    runtime = runtime_metrics.for_meter(provider.get_meter("r"))
    identity = identity_metrics.for_meter(provider.get_meter("i"))
    session.sessions_created.add(1)
    session.turns_completed.add(1, {"status": "succeeded"})
    session.turn_duration.record(1.0, {"status": "succeeded"})
    session.time_to_first_event.record(0.5)
    session.events_appended.add(1, {"type": "text_delta"})
    result = TurnResult()
    result.usage.input_tokens, result.usage.cost_usd_micros = 10, 20
    runtime.turn_ended(ORG, MODEL, result)
    runtime.pool_wait.record(0.5)
    endpoint = model_endpoint.ModelEndpoint("http://127.0.0.1:1")
    endpoint.reachable = True
    runtime.track_endpoint(endpoint)
    identity.sign_in("password", None)
    identity.revocations.add(1, {"kind": "session", "outcome": "published"})
    identity.reservations.add(1, {"outcome": "reserved"})
    identity.reservations_ended.add(1, {"how": "settled"})

    exposition = generate_latest(registry).decode()
    families = {line.split()[2] for line in exposition.splitlines() if line.startswith("# TYPE")}
    readmes = Path(__file__).parents[2] / "services"
    for service, module in (
        ("session", session_metrics),
        ("runtime", runtime_metrics),
        ("identity", identity_metrics),
    ):
        table = (readmes / service / "README.md").read_text()
        for name in module.EXPORTED:
            assert name in families, name
            assert f"`{name}`" in table, f"{service} README lacks {name}"
    provider.shutdown()
