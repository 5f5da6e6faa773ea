"""Hostile input on every RPC of every built service: never INTERNAL, never UNKNOWN.

Hypothesis builds request messages from each method's descriptor: strings with NUL and control
characters, over-long strings, path traversal and resource names of every shape, extreme and
out-of-range integers, unknown enum values, timestamps and durations out of range, field masks
naming unknown paths, garbage page tokens, nested messages and maps. Every call goes to the
real services (identity, session, runtime on SQLite, as `corral dev` runs them) with the
bootstrap superuser's token (the runtime: the platform's own service principal's), with rate
limits out of the way, so the requests get past authentication and reach validation;
whatever the answer, it must be a status a caller can act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from corral.identity.v1 import identity_service_pb2
from corral.identity.v1 import identity_service_pb2 as ipb
from corral.identity.v1 import identity_service_pb2_grpc as irpc
from corral.runtime.v1 import runtime_service_pb2
from corral.session.v1 import session_service_pb2
from tests.conftest import require_postgres
from tests.support.platform import Platform, running_platform

EXAMPLES = int(os.environ.get("CORRAL_FUZZ_EXAMPLES", "25"))
FORBIDDEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
SERVICES = {
    "identity": identity_service_pb2.DESCRIPTOR.services_by_name["IdentityService"],
    "session": session_service_pb2.DESCRIPTOR.services_by_name["SessionService"],
    "runtime": runtime_service_pb2.DESCRIPTOR.services_by_name["RuntimeService"],
}
# Methods that would start real work on a valid-looking request are still fuzzed: their
# requests name resources that do not exist, so they stop at validation or look-up.

NAMES = [
    "organizations/default",
    "organizations/default/users/u1",
    "organizations/default/quota",
    "organizations/default/agentPolicy",
    "organizations/-",
    "organizations/default/serviceAccounts/sa/keys/k",
    "sessions/abc",
    "sessions/abc/turns/t1",
    "sessions/../../etc/passwd",
    "sessions/a/../b",
    "sessions/%2e%2e",
    "workspaces/abc",
    "workspaces/..",
    "signingKeys/k1",
    "/",
    "*",
]
HOSTILE_TEXT = [
    "",
    "\x00",
    "a\x00b",
    "\x1b[31mred",
    "\u202eevil",
    "x" * 70,
    "y" * 5_000,
    "z" * 200_001,
    "../../../../etc/passwd",
    "' OR 1=1 --",
    "{{ 7 * 7 }}",
    "${jndi:ldap://x}",
    "null",
    "-1",
    "9" * 40,
    "\ufeff",
    "🦀" * 300,
    "a b",
    "*",
]
INT_EDGES = {
    "int32": [0, -1, 1, 2**31 - 1, -(2**31)],
    "int64": [0, -1, 1, 2**63 - 1, -(2**63), 2**53 + 1],
    "uint32": [0, 1, 2**32 - 1],
    "uint64": [0, 1, 2**64 - 1],
}
_INT_KIND = {
    d.FieldDescriptor.TYPE_INT32: "int32",
    d.FieldDescriptor.TYPE_SINT32: "int32",
    d.FieldDescriptor.TYPE_SFIXED32: "int32",
    d.FieldDescriptor.TYPE_INT64: "int64",
    d.FieldDescriptor.TYPE_SINT64: "int64",
    d.FieldDescriptor.TYPE_SFIXED64: "int64",
    d.FieldDescriptor.TYPE_UINT32: "uint32",
    d.FieldDescriptor.TYPE_FIXED32: "uint32",
    d.FieldDescriptor.TYPE_UINT64: "uint64",
    d.FieldDescriptor.TYPE_FIXED64: "uint64",
}


def _text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(HOSTILE_TEXT + NAMES),
        st.text(max_size=40),
        st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=80),
    )


def _scalar(field: d.FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == d.FieldDescriptor.TYPE_STRING:
        return _text()
    if kind == d.FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.just(b"\x00" * 2048))
    if kind == d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (d.FieldDescriptor.TYPE_DOUBLE, d.FieldDescriptor.TYPE_FLOAT):
        return st.one_of(
            st.floats(allow_nan=True, allow_infinity=True, width=32),
            st.sampled_from([0.0, -1.0, 1e308]),
        )
    if kind == d.FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.sampled_from([-1, 99, 2**31 - 1]))
    edges = INT_EDGES[_INT_KIND[kind]]
    return st.one_of(
        st.sampled_from(edges), st.integers(min_value=max(min(edges), -1000), max_value=1000)
    )


def _well_known(message: d.Descriptor) -> st.SearchStrategy[dict[str, Any]] | None:
    name = message.full_name
    if name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        return st.fixed_dictionaries(
            {
                "seconds": st.sampled_from(
                    [0, -1, 1, 10**10, -(10**10), 253402300800, -62135596801, 2**62]
                ),
                "nanos": st.sampled_from([0, 1, 999_999_999, 10**9, -1]),
            }
        )
    if name == "google.protobuf.FieldMask":
        return st.fixed_dictionaries(
            {"paths": st.lists(st.one_of(st.sampled_from(["*", "", "name", "a.b.c"]), _text()))}
        )
    if name in ("google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"):
        return st.just({})
    return None


def _message(message: d.Descriptor, depth: int) -> st.SearchStrategy[dict[str, Any]]:
    special = _well_known(message)
    if special is not None:
        return special
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in message.fields:
        value = _field(field, depth)
        if value is not None:
            fields[field.name] = value
    return st.fixed_dictionaries({}, optional=fields)


def _field(field: d.FieldDescriptor, depth: int) -> st.SearchStrategy[Any] | None:
    if field.type == d.FieldDescriptor.TYPE_MESSAGE:
        entry = field.message_type
        if entry.GetOptions().map_entry:
            key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
            inner = _field(value, depth + 1)
            if inner is None:
                return None
            return st.dictionaries(_scalar(key), inner, max_size=3)
        if depth >= 3:
            return None
        single = _message(entry, depth + 1)
        return st.lists(single, max_size=3) if _repeated(field) else single
    single_scalar = _scalar(field)
    return st.lists(single_scalar, max_size=4) if _repeated(field) else single_scalar


def _repeated(field: d.FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _fill(target: Message, values: dict[str, Any]) -> None:
    for name, value in values.items():
        field = target.DESCRIPTOR.fields_by_name[name]
        try:
            _assign(target, field, value)
        except (ValueError, TypeError, OverflowError):
            continue  # a value the client library itself refuses to send


def _assign(target: Message, field: d.FieldDescriptor, value: Any) -> None:
    container = getattr(target, field.name)
    if field.type == d.FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            inner = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                if inner.type == d.FieldDescriptor.TYPE_MESSAGE:
                    _fill(container[key], item)
                else:
                    container[key] = item
        elif _repeated(field):
            for item in value:
                _fill(container.add(), item)
        else:
            _fill(container, value)
            if not value:
                container.SetInParent()
    elif _repeated(field):
        container.extend(value)
    else:
        setattr(target, field.name, value)


def _request_type(method: d.MethodDescriptor) -> type[Message]:
    pool = descriptor_pool.Default()
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(method.input_type.full_name))


def _methods() -> Iterator[tuple[str, d.MethodDescriptor]]:
    for service, descriptor in SERVICES.items():
        for method in descriptor.methods:
            yield service, method


@contextlib.asynccontextmanager
async def _fresh_database(url: str) -> AsyncIterator[str]:
    """A database of its own (each service makes its schema in it), dropped afterwards."""
    name = f"fuzz_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as connection:
        await connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        async with admin.connect() as connection:
            await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
async def platform(  # type: ignore[misc]
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Platform:
    """The platform on SQLite, and on PostgreSQL (which refuses NUL bytes in text: a string
    that reaches it unchecked would be an INTERNAL there)."""
    async with contextlib.AsyncExitStack() as stack:
        database = ""
        if request.param == "postgresql":
            database = await stack.enter_async_context(_fresh_database(await require_postgres()))
        # Rate limits high enough that every fuzzed request reaches validation.
        yield await stack.enter_async_context(
            running_platform(
                Path(tmp_path_factory.mktemp("fuzz")),
                database_url=database,
                rate_limit_per_minute=10**6,
                rate_limit_burst=10**6,
            )
        )


@pytest.fixture(scope="module")
async def service_auth(platform: Platform) -> tuple[tuple[str, str], ...]:
    """The platform's own service principal (the runtime answers nobody else)."""
    async with grpc.aio.insecure_channel(platform.settings.target_for("identity")) as channel:
        reply = await irpc.IdentityServiceStub(channel).ExchangeApiKey(
            ipb.ExchangeApiKeyRequest(api_key=platform.settings.resolved_service_api_key())
        )
    return (("authorization", f"Bearer {reply.token.access_token}"),)


async def _call(
    platform: Platform,
    auth: tuple[tuple[str, str], ...],
    service: str,
    method: d.MethodDescriptor,
    request: Message,
) -> grpc.StatusCode:
    channel = platform.channel(service)
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            call = channel.unary_stream(path, request_serializer=type(request).SerializeToString)
            stream = call(request, metadata=auth, timeout=2)
            async for _ in stream:
                break
            stream.cancel()
        else:
            unary = channel.unary_unary(path, request_serializer=type(request).SerializeToString)
            await unary(request, metadata=auth, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    finally:
        await channel.close()
        platform.channels.remove(channel)
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("service", "method"), list(_methods()), ids=lambda v: getattr(v, "name", v)
)
async def test_hostile_requests_never_get_internal_or_unknown(
    platform: Platform,
    service_auth: tuple[tuple[str, str], ...],
    service: str,
    method: d.MethodDescriptor,
) -> None:
    loop = asyncio.get_running_loop()
    request_type = _request_type(method)

    def build(values: dict[str, Any]) -> Message:
        request = request_type()
        _fill(request, values)
        return request

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    @given(_message(method.input_type, 0).map(build))
    def check(request: Message) -> None:
        auth = service_auth if service == "runtime" else platform.auth
        future = asyncio.run_coroutine_threadsafe(
            _call(platform, auth, service, method, request), loop
        )
        code = future.result(timeout=60)
        assert code not in FORBIDDEN, f"{code.name} for {request!r}"[:2000]

    run: Callable[[], None] = check
    await asyncio.to_thread(run)
