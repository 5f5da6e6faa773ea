"""The edge, end to end: Python clients -> a real Envoy (libs/envoy.py) -> real grpc.aio servers.

grpc-web (binary and text) and native gRPC reach the right service; a server stream outlives the
default 15 s route timeout; bad tokens stop at the edge with UNAUTHENTICATED (the upstream never
sees them); REST/JSON is transcoded; CORS answers browsers; identity headers from clients are
dropped; an upstream that reports NOT_SERVING leaves the rotation; the configs validate.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from corral.libs.config import SERVICE_NAMES, Settings
from corral.libs.envoy import start_edge, validate, write_config
from corral.services import registry
from corral.services.identity.config import IdentitySettings
from corral.session.v1 import session_service_pb2 as pb
from tests.edge.conftest import LOGIN, LONG_EVENTS, LONG_INTERVAL, LONG_STREAM, Edge, Seen
from tests.support import grpcweb
from tests.support.grpc_tools import free_port
from tests.support.keys import AUDIENCE, ISSUER, SigningKey

LIST = "/corral.session.v1.SessionService/ListSessions"
STREAM = "/corral.session.v1.SessionService/StreamSessionEvents"
ORIGIN = "http://localhost:5173"


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def bad_token(kind: str, key: SigningKey) -> str | None:
    now = int(time.time())
    if kind == "missing":
        return None
    if kind == "expired":
        return key.token(iat=now - 7200, exp=now - 3600)
    if kind == "forged":  # right kid and claims, signed with another key
        return SigningKey.generate().token(kid=key.kid)
    # Unsigned: the classic form (empty signature) and one with a signature part anyway.
    header = {"alg": "none", "typ": "JWT", "kid": key.kid}
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "organizations/acme/users/x", "exp": now + 900}
    unsigned = f"{_b64(header)}.{_b64(claims)}."
    return unsigned if kind == "alg-none" else unsigned + _b64({"sig": 1})


async def grpc_web(
    edge: Edge,
    method: str,
    request: bytes,
    *,
    text: bool = False,
    metadata: list[tuple[str, str]] | None = None,
) -> grpcweb.GrpcWebReply:
    return await asyncio.to_thread(
        grpcweb.call, edge.url, method, request, text=text, metadata=metadata or []
    )


async def http_request(
    edge: Edge, method: str, path: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    def send() -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(edge.target, timeout=10)
        try:
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            return (
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                response.read(),
            )
        finally:
            connection.close()

    return await asyncio.to_thread(send)


def _list_request() -> bytes:
    return pb.ListSessionsRequest(page_size=10).SerializeToString()


@pytest.mark.parametrize("text", [False, True], ids=["binary", "text"])
async def test_grpc_web_unary_and_stream(
    edge: Edge, seen: list[Seen], signing_key: SigningKey, text: bool
) -> None:
    token = signing_key.token(sub="organizations/acme/users/bob")
    reply = await grpc_web(edge, LIST, _list_request(), text=text, metadata=bearer(token))
    assert (reply.http_status, reply.status) == (200, 0), reply
    (message,) = reply.messages
    listed = pb.ListSessionsResponse.FromString(message)
    assert [(s.name, s.owner) for s in listed.sessions] == [
        ("sessions/s1", "organizations/acme/users/bob")
    ]
    # The token travels on (services verify it themselves).
    assert seen[0].metadata["authorization"] == f"Bearer {token}"

    request = pb.StreamSessionEventsRequest(session="sessions/s1", after_sequence=7)
    stream = await grpc_web(
        edge, STREAM, request.SerializeToString(), text=text, metadata=bearer(token)
    )
    assert stream.status == 0, stream
    events = [pb.StreamSessionEventsResponse.FromString(m).event for m in stream.messages]
    assert [e.sequence for e in events] == [8, 9, 10]


@pytest.mark.parametrize(
    ("method", "server"),
    [
        ("/corral.identity.v1.IdentityService/GetOrganization", "identity"),
        ("/corral.task.v1.TaskService/GetTask", "task"),
        ("/corral.storage.v1.StorageService/GetWorkspace", "storage"),
        ("/corral.session.v1.SessionService/GetSession", "session"),
    ],
)
async def test_native_grpc_is_routed_by_service(
    edge: Edge, seen: list[Seen], signing_key: SigningKey, method: str, server: str
) -> None:
    """Each service prefix reaches its own upstream (which answers NOT_FOUND, naming itself)."""
    async with grpc.aio.insecure_channel(edge.target) as channel:
        call = channel.unary_unary(method)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"", metadata=bearer(signing_key.token()), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value
    assert caught.value.details().startswith(server)
    assert [s.server.split("-")[0] for s in seen] == [server]


async def test_runtime_is_not_routed(edge: Edge, seen: list[Seen], signing_key: SigningKey) -> None:
    """The runtime service is internal: the edge has no route to it."""
    async with grpc.aio.insecure_channel(edge.target) as channel:
        call = channel.unary_unary("/corral.runtime.v1.RuntimeService/GetRuntimeStatus")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"", metadata=bearer(signing_key.token()), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert not seen


async def test_server_stream_outlives_the_default_route_timeout(
    edge: Edge, signing_key: SigningKey
) -> None:
    """Events 5 s apart for 20 s, over grpc-web and native gRPC at once: nothing is cut."""
    token = signing_key.token()
    request = pb.StreamSessionEventsRequest(session=LONG_STREAM)

    async def native() -> list[int]:
        async with grpc.aio.insecure_channel(edge.target) as channel:
            call = channel.unary_stream(
                STREAM,
                request_serializer=pb.StreamSessionEventsRequest.SerializeToString,
                response_deserializer=pb.StreamSessionEventsResponse.FromString,
            )
            return [r.event.sequence async for r in call(request, metadata=bearer(token))]

    started = time.monotonic()
    web, sequences = await asyncio.gather(
        grpc_web(edge, STREAM, request.SerializeToString(), metadata=bearer(token)), native()
    )
    elapsed = time.monotonic() - started
    expected = list(range(1, LONG_EVENTS + 1))
    assert web.status == 0, web
    assert [pb.StreamSessionEventsResponse.FromString(m).event.sequence for m in web.messages] == (
        expected
    )
    assert sequences == expected
    assert elapsed >= (LONG_EVENTS - 1) * LONG_INTERVAL > 15
    # The events arrived as they were sent, not buffered to the end.
    assert web.arrivals[-1] - web.arrivals[0] >= (LONG_EVENTS - 1) * LONG_INTERVAL - 1


@pytest.mark.parametrize("kind", ["missing", "expired", "forged", "alg-none", "alg-none-signed"])
async def test_bad_tokens_stop_at_the_edge(
    edge: Edge, seen: list[Seen], signing_key: SigningKey, kind: str
) -> None:
    token = bad_token(kind, signing_key)
    metadata = bearer(token) if token else []
    async with grpc.aio.insecure_channel(edge.target) as channel:
        call = channel.unary_unary(LIST)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(_list_request(), metadata=metadata, timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value
    for text in (False, True):
        reply = await grpc_web(edge, LIST, _list_request(), text=text, metadata=metadata)
        assert reply.status == grpc.StatusCode.UNAUTHENTICATED.value[0], reply
        assert reply.message, reply
    assert not seen, "a call with a bad token reached an upstream"


@pytest.mark.parametrize(
    "path",
    [
        "/grpc.health.v1.Health/../corral.session.v1.SessionService/ListSessions",
        "/corral.identity.v1.IdentityService/Login/../../corral.session.v1.SessionService/ListSessions",
        "//corral.session.v1.SessionService//ListSessions",
    ],
)
async def test_path_tricks_do_not_skip_the_token_check(
    edge: Edge, seen: list[Seen], path: str
) -> None:
    """Paths are normalised before jwt_authn matches its public rules."""
    reply = await grpc_web(edge, path, _list_request())
    assert reply.status == grpc.StatusCode.UNAUTHENTICATED.value[0], reply
    status, _, _ = await http_request(edge, "GET", "/v1/auth:login/../../v1/sessions", {})
    assert status == 401
    assert not seen


async def test_public_methods_pass_without_a_token(edge: Edge, seen: list[Seen]) -> None:
    """Login and health need no token: the edge lets them through to the service."""
    reply = await grpc_web(edge, LOGIN, b"")
    assert reply.status == grpc.StatusCode.NOT_FOUND.value[0], reply  # identity answered
    status, _, body = await http_request(edge, "POST", "/v1/auth:login", {})
    # Transcoded to Login; the gRPC status comes back as JSON, its ErrorInfo included.
    assert status == 404, body
    error = json.loads(body)
    assert error["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert error["details"][0]["reason"] == "TEST_ANSWER"
    assert [(s.server, s.method) for s in seen] == [("identity", LOGIN)] * 2
    async with grpc.aio.insecure_channel(edge.target) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="corral.session.v1.SessionService"), timeout=5
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_rest_json_needs_a_bearer_token(edge: Edge, signing_key: SigningKey) -> None:
    token = signing_key.token(sub="organizations/acme/users/carol")
    status, headers, body = await http_request(
        edge, "GET", "/v1/sessions?pageSize=5", {"authorization": f"Bearer {token}"}
    )
    assert status == 200, body
    assert headers["content-type"].startswith("application/json")
    listed = json.loads(body)
    assert listed["sessions"][0]["name"] == "sessions/s1"
    assert listed["sessions"][0]["owner"] == "organizations/acme/users/carol"
    assert listed["totalSize"] == 1
    assert "nextPageToken" not in listed  # proto3 JSON: default values are left out

    status, _, body = await http_request(
        edge, "GET", "/v1/sessions/s1/events:stream?afterSequence=2", bearer_header(token)
    )
    assert status == 200, body
    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    assert [line["event"]["sequence"] for line in lines] == ["3", "4", "5"]  # int64 as string

    status, headers, body = await http_request(edge, "GET", "/v1/sessions", {})
    assert status == 401, body
    assert headers.get("www-authenticate", "").startswith("Bearer")
    assert json.loads(body)["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]


def bearer_header(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_cors_for_browsers(edge: Edge, signing_key: SigningKey) -> None:
    preflight = {
        "origin": ORIGIN,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type,x-grpc-web,x-user-agent",
    }
    status, headers, _ = await http_request(edge, "OPTIONS", LIST, preflight)
    assert status == 200
    assert headers["access-control-allow-origin"] == ORIGIN
    allowed = {h.strip() for h in headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "x-grpc-web", "grpc-timeout"} <= allowed
    assert "POST" in headers["access-control-allow-methods"]

    status, headers, _ = await http_request(
        edge, "OPTIONS", LIST, {**preflight, "origin": "http://evil.example"}
    )
    assert "access-control-allow-origin" not in headers

    # Real answers, an edge refusal included, let the page read the gRPC status.
    for metadata in (bearer(signing_key.token()), []):
        reply = await grpc_web(
            edge, LIST, _list_request(), metadata=[("origin", ORIGIN), *metadata]
        )
        assert reply.headers["access-control-allow-origin"] == ORIGIN
        exposed = {h.strip() for h in reply.headers["access-control-expose-headers"].split(",")}
        assert {"grpc-status", "grpc-message", "grpc-status-details-bin"} <= exposed


async def test_client_identity_headers_are_stripped(
    edge: Edge, seen: list[Seen], signing_key: SigningKey
) -> None:
    forged = {
        "x-jwt-payload": _b64({"sub": "organizations/acme/users/root"}),
        "x-corral-caller": "root",
    }
    for method, token in ((LIST, signing_key.token()), (LOGIN, None)):
        metadata = [*forged.items(), *(bearer(token) if token else [])]
        await grpc_web(edge, method, b"", metadata=metadata)
    assert [s.method for s in seen] == [LIST, LOGIN]
    for call in seen:
        assert not set(forged) & set(call.metadata), call.metadata


async def test_not_serving_upstream_leaves_the_rotation(
    edge: Edge, seen: list[Seen], signing_key: SigningKey
) -> None:
    token = signing_key.token()

    async def list_sessions() -> grpcweb.GrpcWebReply:
        return await grpc_web(edge, LIST, _list_request(), metadata=bearer(token))

    try:
        await edge.set_session_health("session-a", serving=False)
        await edge.wait_session_hosts({"session-b"})
        seen.clear()
        for _ in range(6):
            assert (await list_sessions()).status == 0
        assert {s.server for s in seen} == {"session-b"}

        # No healthy replica left: the edge fails fast rather than fail open (panic threshold 0).
        await edge.set_session_health("session-b", serving=False)
        await edge.wait_session_hosts(set())
        seen.clear()
        started = time.monotonic()
        reply = await list_sessions()
        assert reply.status == grpc.StatusCode.UNAVAILABLE.value[0], reply
        assert time.monotonic() - started < 1
        # Over REST the same refusal is a google.rpc.Status body saying to retry.
        status, _, body = await http_request(edge, "GET", "/v1/sessions", bearer_header(token))
        error = json.loads(body)
        assert (status, error["code"]) == (503, grpc.StatusCode.UNAVAILABLE.value[0]), body
        assert error["details"][0]["reason"] == "UNAVAILABLE"
        assert not seen
    finally:
        await edge.set_session_health("session-a", serving=True)
        await edge.set_session_health("session-b", serving=True)
        await edge.wait_session_hosts({"session-a", "session-b"})
    seen.clear()
    for _ in range(6):
        assert (await list_sessions()).status == 0
    assert {s.server for s in seen} == {"session-a", "session-b"}  # both back in rotation


async def test_envoy_validates_dev_and_production_configs(edge: Edge, tmp_path: Path) -> None:
    await asyncio.to_thread(validate, edge.envoy.config)
    production = Settings(
        env="production",
        host="0.0.0.0",
        data_dir=tmp_path,
        jwks_url="http://identity:8081/.well-known/jwks.json",
        cors_origins=["https://console.corral.example"],
        identity_target="identity:50051",
        session_target="session:50052",
        task_target="task:50053",
        storage_target="storage:50055",
    )
    config = await asyncio.to_thread(
        write_config, production, tmp_path, descriptor_path=str(tmp_path / "corral.pb")
    )
    rendered = config.read_text()
    assert '{"address": "session", "port_value": 50052}' in rendered
    assert '"exact": "https://console.corral.example"' in rendered
    assert "StdoutAccessLog" in rendered  # production logs every request
    await asyncio.to_thread(validate, config)


async def test_corral_dev_puts_the_edge_in_front_of_the_real_services(tmp_path: Path) -> None:
    """What `corral dev` does (start_edge after the five services): sign in over REST through
    the edge with identity's bootstrap admin, then list sessions over grpc-web with that token
    (Envoy checks it against identity's real JWKS, then the session service checks it again)."""
    settings = IdentitySettings(
        data_dir=tmp_path,
        identity_http_port=free_port(),
        edge_port=0,
        bootstrap_admin_email="admin@corral.local",
        bootstrap_admin_password="edge-test-password",
        **{f"{name}_port": 0 for name in SERVICE_NAMES},
    )
    apps = [await registry.build(name, settings) for name in SERVICE_NAMES]
    try:
        for app in apps:
            await app.start()
        envoy = await start_edge(settings, apps)

        def login() -> tuple[int, bytes]:
            connection = http.client.HTTPConnection(envoy.url.removeprefix("http://"), timeout=10)
            body = json.dumps({"email": "admin@corral.local", "password": "edge-test-password"})
            connection.request("POST", "/v1/auth:login", body=body)
            response = connection.getresponse()
            return response.status, response.read()

        status, body = await asyncio.to_thread(login)
        assert status == 200, body
        token = json.loads(body)["token"]["accessToken"]
        # The user comes back without its input-only password, not even an empty one.
        signed_in = json.loads(body)["user"]
        assert signed_in["email"] == "admin@corral.local" and "password" not in signed_in
        reply = await asyncio.to_thread(
            grpcweb.call, envoy.url, LIST, _list_request(), metadata=bearer(token)
        )
        assert reply.status == 0, reply
        assert pb.ListSessionsResponse.FromString(reply.messages[0]).total_size == 0
    finally:
        await asyncio.gather(*(app.stop(0) for app in apps))
    assert not envoy.running  # stopped with the services
