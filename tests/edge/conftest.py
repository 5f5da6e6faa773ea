"""A real Envoy (rendered and run by corral.libs.envoy) in front of real grpc.aio servers.

The upstreams are built with the kit (``CorralServer``: health, reflection, the interceptor with
its real authentication hook) and serve the published protos. Session runs as two replicas behind
one cluster, so taking one out of rotation is observable. A hook on every upstream records each
call that reached it, so tests can prove what the edge stopped. Identity's own JWKS HTTP server
publishes the test signing key.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from corral.libs import errors
from corral.libs.auth import StaticJwksSource, TokenVerifier, require_caller
from corral.libs.config import Settings
from corral.libs.envoy import Envoy, write_config
from corral.libs.grpc.interceptors import AuthenticationHook, CallInfo
from corral.libs.grpc.server import CorralServer, ServerConfig, ServiceRegistration
from corral.services.identity.jwks_http import JwksHttpServer
from corral.session.v1 import event_pb2, session_pb2, session_service_pb2, session_service_pb2_grpc
from tests.support.keys import AUDIENCE, ISSUER, SigningKey

SESSION_SERVICE = "corral.session.v1.SessionService"
LOGIN = "/corral.identity.v1.IdentityService/Login"
HEALTH_INTERVAL = 0.25  # Envoy's active health checks, fast so rotation tests are quick
LONG_STREAM = "sessions/long"  # streams LONG_EVENTS events, LONG_INTERVAL seconds apart
LONG_EVENTS = 5
LONG_INTERVAL = 5.0


@dataclass(frozen=True)
class Seen:
    server: str
    method: str
    metadata: dict[str, str]


class Recorder:
    """A call hook that runs before authentication: every call that reached this upstream."""

    def __init__(self, server: str, seen: list[Seen]) -> None:
        self._server = server
        self._seen = seen

    async def before(self, call: CallInfo) -> None:
        if not call.method.startswith("/grpc.health."):
            self._seen.append(Seen(self._server, call.method, dict(call.metadata)))


class Sessions(session_service_pb2_grpc.SessionServiceServicer):
    """ListSessions answers with the caller's subject; StreamSessionEvents streams numbered
    events (slowly for LONG_STREAM); GetSession answers NOT_FOUND."""

    async def GetSession(
        self, request: session_service_pb2.GetSessionRequest, context: Any
    ) -> session_service_pb2.GetSessionResponse:
        raise errors.NotFound(f"session answered: no {request.name}", reason="TEST_ANSWER")

    async def ListSessions(
        self, request: session_service_pb2.ListSessionsRequest, context: Any
    ) -> session_service_pb2.ListSessionsResponse:
        caller = require_caller()
        session = session_pb2.Session(name="sessions/s1", owner=caller.subject, display_name="one")
        return session_service_pb2.ListSessionsResponse(sessions=[session], total_size=1)

    async def StreamSessionEvents(
        self, request: session_service_pb2.StreamSessionEventsRequest, context: Any
    ) -> AsyncIterator[session_service_pb2.StreamSessionEventsResponse]:
        require_caller()
        count, interval = (LONG_EVENTS, LONG_INTERVAL) if request.session == LONG_STREAM else (3, 0)
        for i in range(count):
            if i:
                await asyncio.sleep(interval)
            event = event_pb2.SessionEvent(
                session=request.session, sequence=request.after_sequence + i + 1
            )
            yield session_service_pb2.StreamSessionEventsResponse(event=event)


@dataclass
class Edge:
    envoy: Envoy
    servers: dict[str, CorralServer]
    seen: list[Seen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.envoy.url

    @property
    def target(self) -> str:
        return self.envoy.url.removeprefix("http://")

    async def set_session_health(self, server: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING
        if not serving:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        await self.servers[server].health.set(SESSION_SERVICE, status)

    async def wait_session_hosts(self, healthy: set[str]) -> None:
        """Until Envoy's view of the session cluster is exactly ``healthy`` (server names)."""
        wanted = {("session", self.servers[name].address) for name in healthy}
        await self.envoy.wait_healthy(wanted, within=10, exactly="session")


class Answering(grpc.GenericRpcHandler):
    """Every method of ``service`` answers NOT_FOUND naming the upstream that answered."""

    def __init__(self, service: str, server: str) -> None:
        self._service = service
        self._server = server

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = str(details.method)
        if not method.startswith(f"/{self._service}/"):
            return None

        async def answer(request: bytes, context: Any) -> bytes:
            raise errors.NotFound(f"{self._server} answered {method}", reason="TEST_ANSWER")

        return grpc.unary_unary_rpc_method_handler(answer)


def _answering(service: str, server: str) -> ServiceRegistration:
    handler = Answering(service, server)
    return ServiceRegistration(
        service, lambda grpc_server: grpc_server.add_generic_rpc_handlers((handler,))
    )


@pytest.fixture(scope="module")
async def edge(
    signing_key: SigningKey, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Edge]:
    directory: Path = tmp_path_factory.mktemp("edge")
    verifier = TokenVerifier(
        StaticJwksSource(signing_key.jwks()), issuer=ISSUER, audience=AUDIENCE, algorithms=["ES256"]
    )
    sessions = Sessions()
    session = ServiceRegistration(
        SESSION_SERVICE,
        lambda server: session_service_pb2_grpc.add_SessionServiceServicer_to_server(
            sessions, server
        ),
    )
    upstreams = {
        "identity": _answering("corral.identity.v1.IdentityService", "identity"),
        "session-a": session,
        "session-b": session,
        "task": _answering("corral.task.v1.TaskService", "task"),
        "storage": _answering("corral.storage.v1.StorageService", "storage"),
    }
    seen: list[Seen] = []
    servers = {
        name: CorralServer(
            ServerConfig(
                name=name,
                hooks=[Recorder(name, seen), AuthenticationHook(verifier, [LOGIN])],
                tracing=False,
            ),
            [registration],
        )
        for name, registration in upstreams.items()
    }
    jwks = JwksHttpServer(lambda: _keys(signing_key), host="127.0.0.1", port=0, max_age=300)
    await jwks.start()
    for server in servers.values():
        await server.start()
    settings = Settings(
        data_dir=directory,
        edge_port=0,
        jwks_url=f"http://127.0.0.1:{jwks.port}/.well-known/jwks.json",
        cors_origins=["http://localhost:5173"],
    )
    config = write_config(
        settings,
        directory,
        upstreams={
            "identity": [servers["identity"].address],
            "session": [servers["session-a"].address, servers["session-b"].address],
            "task": [servers["task"].address],
            "storage": [servers["storage"].address],
        },
        health_interval=HEALTH_INTERVAL,
    )
    envoy = Envoy(config, log_file=directory / "envoy.log")
    await envoy.start()
    edge = Edge(envoy, servers, seen)
    try:
        await edge.wait_session_hosts({"session-a", "session-b"})
        yield edge
    finally:
        await envoy.stop()
        await asyncio.gather(*(server.stop(0) for server in servers.values()))
        await jwks.stop()


async def _keys(signing_key: SigningKey) -> list[dict[str, str]]:
    return [signing_key.jwk()]


@pytest.fixture
def seen(edge: Edge) -> list[Seen]:
    """The calls upstreams saw during this test."""
    edge.seen.clear()
    return edge.seen
