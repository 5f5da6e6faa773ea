"""The shared gRPC kit on a real grpc.aio server on port 0: errors, auth, logs, health, shutdown.

The service under test is a small probe registered through the kit with real protobuf
serialisation (``google.protobuf.Struct``), so the kit is tested apart from any one context.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from corral.libs import errors
from corral.libs.auth import StaticJwksSource, TokenVerifier, require_caller
from corral.libs.grpc.client import create_channel
from corral.libs.grpc.health import DependencyCheck
from corral.libs.grpc.interceptors import AuthenticationHook
from corral.libs.grpc.server import CorralServer, ServerConfig, ServiceRegistration
from corral.libs.redis import create_redis
from tests.support.keys import AUDIENCE, ISSUER, SigningKey
from tests.support.proxy import TcpProxy

SERVICE = "corral.test.v1.ProbeService"


def _struct(**fields: Any) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(fields)
    return message


class Probe:
    """Handlers that exercise each path of the interceptor."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.slow_started = asyncio.Event()
        self.address = ""

    async def Public(self, request: struct_pb2.Struct, context: Any) -> struct_pb2.Struct:
        return _struct(ok=True)

    async def Whoami(self, request: struct_pb2.Struct, context: Any) -> struct_pb2.Struct:
        caller = require_caller()
        return _struct(
            subject=caller.subject, organization=caller.organization, roles=sorted(caller.roles)
        )

    async def Relay(self, request: struct_pb2.Struct, context: Any) -> struct_pb2.Struct:
        """Calls Whoami on this server through the kit's client: the caller's token travels on."""
        async with create_channel(self.address) as channel:
            return await channel.unary_unary(
                f"/{SERVICE}/Whoami",
                request_serializer=struct_pb2.Struct.SerializeToString,
                response_deserializer=struct_pb2.Struct.FromString,
            )(request)

    async def Missing(self, request: struct_pb2.Struct, context: Any) -> struct_pb2.Struct:
        raise errors.NotFound(
            "session 'sessions/x' does not exist",
            reason="SESSION_NOT_FOUND",
            metadata={"resource": "sessions/x"},
        )

    async def Validate(self, request: struct_pb2.Struct, context: Any) -> struct_pb2.Struct:
        check = errors.Validator()
        check.require(
            request.fields["display_name"].string_value if "display_name" in request.fields else "",
            "session.display_name",
        )
        check.check(False, "page_size", "must be between 0 and 1000")
        check.raise_if_any()
        return _struct()

    async def Crash(self, request: struct_pb2.Struct, context: Any) -> struct_pb2.Struct:
        raise RuntimeError("database password is hunter2")

    async def Slow(self, request: struct_pb2.Struct, context: Any) -> struct_pb2.Struct:
        self.slow_started.set()
        await self.release.wait()
        return _struct(finished=True)

    async def Count(
        self, request: struct_pb2.Struct, context: Any
    ) -> AsyncIterator[struct_pb2.Struct]:
        for i in range(3):
            yield _struct(i=i)
        raise errors.Aborted("the stream was overtaken", reason="STREAM_ABORTED")


def _registration(probe: Probe) -> ServiceRegistration:
    unary = {"Public", "Whoami", "Relay", "Missing", "Validate", "Crash", "Slow"}
    handlers: dict[str, grpc.RpcMethodHandler] = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(probe, name),
            request_deserializer=struct_pb2.Struct.FromString,
            response_serializer=struct_pb2.Struct.SerializeToString,
        )
        for name in unary
    }
    handlers["Count"] = grpc.unary_stream_rpc_method_handler(
        probe.Count,
        request_deserializer=struct_pb2.Struct.FromString,
        response_serializer=struct_pb2.Struct.SerializeToString,
    )
    generic = grpc.method_handlers_generic_handler(SERVICE, handlers)
    return ServiceRegistration(SERVICE, lambda server: server.add_generic_rpc_handlers((generic,)))


class Healthy:
    def __init__(self) -> None:
        self.up = True

    async def probe(self) -> None:
        if not self.up:
            raise ConnectionError("down")


@pytest.fixture
async def probe_server(signing_key: SigningKey) -> AsyncIterator[tuple[CorralServer, Probe]]:
    probe = Probe()
    verifier = TokenVerifier(StaticJwksSource(signing_key.jwks()), issuer=ISSUER, audience=AUDIENCE)
    server = CorralServer(
        ServerConfig(
            name="probe",
            hooks=[AuthenticationHook(verifier, public_methods=[f"/{SERVICE}/Public"])],
            shutdown_grace=5.0,
        ),
        [_registration(probe)],
    )
    await server.start()
    probe.address = server.address
    yield server, probe
    probe.release.set()
    await server.stop(0)


def _call(channel: grpc.aio.Channel, method: str) -> Callable[..., Any]:
    return channel.unary_unary(
        f"/{SERVICE}/{method}",
        request_serializer=struct_pb2.Struct.SerializeToString,
        response_deserializer=struct_pb2.Struct.FromString,
    )


@pytest.fixture
async def channel(probe_server: tuple[CorralServer, Probe]) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(probe_server[0].address) as ch:
        yield ch


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _details(error: grpc.aio.AioRpcError) -> list[Any]:
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries no google.rpc.Status"
    found = []
    for detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found.append(message)
    return found


async def test_domain_error_becomes_code_and_error_info(
    channel: grpc.aio.Channel, signing_key: SigningKey
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(channel, "Missing")(_struct(), metadata=_bearer(signing_key.token()))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = _details(caught.value)[0]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "SESSION_NOT_FOUND",
        "corral.dev",
        {"resource": "sessions/x"},
    )


async def test_invalid_request_lists_field_violations(
    channel: grpc.aio.Channel, signing_key: SigningKey
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(channel, "Validate")(_struct(), metadata=_bearer(signing_key.token()))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, bad_request = _details(caught.value)
    assert info.reason == "INVALID_ARGUMENT"
    assert [(v.field, v.description) for v in bad_request.field_violations] == [
        ("session.display_name", "is required"),
        ("page_size", "must be between 0 and 1000"),
    ]


async def test_unexpected_exception_is_internal_without_leaking(
    channel: grpc.aio.Channel, signing_key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(channel, "Crash")(_struct(), metadata=_bearer(signing_key.token()))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in (caught.value.details() or "")
    assert "hunter2" not in repr(caught.value.trailing_metadata())
    assert _details(caught.value)[0].reason == "INTERNAL"


def _raw(channel: grpc.aio.Channel, method: str) -> Callable[..., Any]:
    """A call that sends bytes as they are (what a broken or hostile client can send)."""
    return channel.unary_unary(f"/{SERVICE}/{method}")


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x04\x0a\x02\xc3\x28"])
async def test_an_undecodable_message_is_invalid_argument_without_internals(
    channel: grpc.aio.Channel, signing_key: SigningKey, garbage: bytes
) -> None:
    """Bytes that are not a message of the method's type (truncated, a wrong wire type,
    invalid UTF-8 in a string) get INVALID_ARGUMENT with ErrorInfo, not grpc's INTERNAL."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _raw(channel, "Whoami")(garbage, metadata=_bearer(signing_key.token()))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Exception" not in (caught.value.details() or "")
    assert _details(caught.value)[0].reason == "INVALID_ARGUMENT"
    # Authentication still comes first: without a token the same bytes are UNAUTHENTICATED.
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await _raw(channel, "Whoami")(garbage)
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_nul_character_anywhere_in_a_request_is_invalid_argument(
    channel: grpc.aio.Channel, signing_key: SigningKey
) -> None:
    """Before any handler (and so any database) sees it: NUL is no text, and PostgreSQL would
    refuse it with an error that reached clients as INTERNAL."""
    request = _struct(name="ok", nested={"inner": "bad\x00value"})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(channel, "Whoami")(request, metadata=_bearer(signing_key.token()))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, bad = _details(caught.value)
    assert info.reason == "INVALID_ARGUMENT"
    assert [v.field for v in bad.field_violations] == [
        "fields['nested'].struct_value.fields['inner'].string_value"
    ]


async def test_stream_error_after_messages(
    channel: grpc.aio.Channel, signing_key: SigningKey
) -> None:
    stream = channel.unary_stream(
        f"/{SERVICE}/Count",
        request_serializer=struct_pb2.Struct.SerializeToString,
        response_deserializer=struct_pb2.Struct.FromString,
    )(_struct(), metadata=_bearer(signing_key.token()))
    seen = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for message in stream:
            seen.append(int(message.fields["i"].number_value))
    assert seen == [0, 1, 2]
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert _details(caught.value)[0].reason == "STREAM_ABORTED"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = (
        b"" if secret is None else hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    )
    return f"{signing_input}.{_b64(signature)}"


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "organizations/acme/users/mallory",
        "org": "organizations/acme",
        "roles": ["superuser"],
        "typ": "access",
        "iat": now,
        "exp": now + 600,
        "jti": "j1",
        **overrides,
    }


def _bad_tokens(key: SigningKey) -> dict[str, str | None]:
    public_pem = key.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    other = SigningKey.generate()
    now = int(time.time())
    return {
        "missing": None,
        "expired": key.token(iat=now - 3600, exp=now - 1800),
        "alg none": _forge({"alg": "none", "kid": key.kid, "typ": "JWT"}, _claims(), None),
        "HS256 with the public key": _forge(
            {"alg": "HS256", "kid": key.kid, "typ": "JWT"}, _claims(), public_pem
        ),
        "wrong audience": key.token(aud="someone-else"),
        "wrong issuer": key.token(iss="https://evil.example"),
        "unknown kid": other.token(),
        "known kid, other key": other.token(kid=key.kid),
        "refresh token": key.token(typ="refresh"),
        "garbage": "not.a.jwt",
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "expired",
        "alg none",
        "HS256 with the public key",
        "wrong audience",
        "wrong issuer",
        "unknown kid",
        "known kid, other key",
        "refresh token",
        "garbage",
    ],
)
async def test_bad_tokens_are_unauthenticated(
    channel: grpc.aio.Channel, signing_key: SigningKey, case: str
) -> None:
    token = _bad_tokens(signing_key)[case]
    metadata = _bearer(token) if token else ()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(channel, "Whoami")(_struct(), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, case
    assert _details(caught.value)[0].reason.startswith("TOKEN_")


async def test_valid_token_exposes_caller_and_public_method_needs_none(
    channel: grpc.aio.Channel, signing_key: SigningKey
) -> None:
    reply = await _call(channel, "Whoami")(
        _struct(), metadata=_bearer(signing_key.token(roles=["admin"]))
    )
    assert reply.fields["subject"].string_value == "organizations/acme/users/alice"
    assert reply.fields["organization"].string_value == "organizations/acme"
    assert [v.string_value for v in reply.fields["roles"].list_value.values] == ["admin"]
    assert (await _call(channel, "Public")(_struct())).fields["ok"].bool_value


async def test_client_forwards_callers_token(
    channel: grpc.aio.Channel, signing_key: SigningKey
) -> None:
    reply = await _call(channel, "Relay")(
        _struct(), metadata=_bearer(signing_key.token(sub="organizations/acme/users/bob"))
    )
    assert reply.fields["subject"].string_value == "organizations/acme/users/bob"


async def test_request_id_is_echoed_and_logged(
    channel: grpc.aio.Channel, signing_key: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="corral.rpc")
    call = _call(channel, "Whoami")(
        _struct(), metadata=(*_bearer(signing_key.token()), ("x-request-id", "req-123"))
    )
    await call
    assert ("x-request-id", "req-123") in tuple(await call.trailing_metadata())
    [record] = [r for r in caplog.records if getattr(r, "request_id", None) == "req-123"]
    assert record.method == f"/{SERVICE}/Whoami"
    assert record.status == "OK"
    assert record.caller == "organizations/acme/users/alice"
    assert record.duration_ms >= 0


async def _health(address: str, service: str = "") -> str:
    async with grpc.aio.insecure_channel(address) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service)
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def _until(predicate: Callable[[], Any], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@pytest.mark.redis
async def test_health_follows_a_real_redis_outage(redis_url: str) -> None:
    """NOT_SERVING while Redis is cut off (through a proxy we control), SERVING once it is back."""
    from redis.asyncio.connection import parse_url

    target = parse_url(redis_url)
    proxy = TcpProxy(target.get("host", "127.0.0.1"), int(target.get("port", 6379)))
    await proxy.start()
    client = create_redis(f"redis://127.0.0.1:{proxy.port}/0")
    client.connection_pool.connection_kwargs["socket_timeout"] = 0.5
    server = CorralServer(
        ServerConfig(
            name="probe",
            checks=[DependencyCheck("redis", client.ping, timeout=0.5)],
            health_interval=0.1,
        ),
        [_registration(Probe())],
    )
    await server.start()
    try:
        assert await _health(server.address) == "SERVING"
        assert await _health(server.address, SERVICE) == "SERVING"
        await proxy.cut()

        async def not_serving() -> bool:
            return await _health(server.address, SERVICE) == "NOT_SERVING"

        await _until(not_serving)
        await proxy.start()

        async def serving() -> bool:
            return await _health(server.address, SERVICE) == "SERVING"

        await _until(serving)
    finally:
        await server.stop(0)
        await client.aclose()
        await proxy.cut()


async def test_graceful_shutdown_drains_in_flight_calls(
    probe_server: tuple[CorralServer, Probe], signing_key: SigningKey
) -> None:
    server, probe = probe_server
    async with grpc.aio.insecure_channel(server.address) as ch:
        in_flight = asyncio.ensure_future(
            _call(ch, "Slow")(_struct(), metadata=_bearer(signing_key.token()))
        )
        await asyncio.wait_for(probe.slow_started.wait(), 10)
        stopping = asyncio.create_task(server.stop(5.0))

        async def not_serving() -> bool:
            status = server.health._server_status[""]
            return bool(status == health_pb2.HealthCheckResponse.NOT_SERVING)

        await _until(not_serving)
        assert not in_flight.done()  # draining: the call in flight is still being served
        probe.release.set()
        assert (await in_flight).fields["finished"].bool_value
        await stopping


async def test_a_port_belongs_to_one_server() -> None:
    """A second server cannot bind a port a live one holds (gRPC would share it through
    SO_REUSEPORT): a process named after its port, as the session service's are, is unique."""
    first = CorralServer(ServerConfig(name="first", tracing=False, metrics=False), [])
    port = await first.start()
    try:
        second = CorralServer(
            ServerConfig(name="second", port=port, tracing=False, metrics=False), []
        )
        with pytest.raises((OSError, RuntimeError)):
            await second.start()
    finally:
        await first.stop(0)


async def test_stop_lets_each_service_drain_before_calls_are_cut() -> None:
    """``on_drain`` runs once NOT_SERVING is set and while calls still run: a service ends its
    long-lived streams there with its own status (the session service: STREAM_RESTART)."""
    seen: list[str] = []
    server: CorralServer | None = None

    async def on_drain() -> None:
        assert server is not None
        seen.append(await _health(server.address, SERVICE))

    probe = Probe()
    registration = _registration(probe)
    server = CorralServer(
        ServerConfig(name="probe", tracing=False, metrics=False),
        [ServiceRegistration(registration.full_name, registration.add_to_server, on_drain)],
    )
    await server.start()
    await server.stop(0)
    assert seen == ["NOT_SERVING"]
