"""Outages of a service's backing stores answer UNAVAILABLE with a retry delay, never INTERNAL.

A probe service on the kit's server reads a real PostgreSQL cluster and a real redis-server of
the test's own (tests/libs/stores.py), which the test stops and starts: every call made while a
store is down fails UNAVAILABLE with ErrorInfo DATABASE_UNAVAILABLE / REDIS_UNAVAILABLE and a
RetryInfo, and the first call after the store is back succeeds (the time it took is printed).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy.ext.asyncio import AsyncEngine

from corral.libs import db, errors
from corral.libs.auth import TokenVerifier
from corral.libs.grpc.server import CorralServer, ServerConfig, ServiceRegistration
from corral.libs.redis import create_redis
from tests.libs.stores import own_postgres, own_redis
from tests.support.grpc_tools import error_reason
from tests.support.keys import AUDIENCE, ISSUER, SigningKey

SERVICE = "corral.test.v1.StoreProbe"


class StoreProbe:
    def __init__(self, engine: AsyncEngine, redis: aioredis.Redis) -> None:
        self.engine = engine
        self.redis = redis

    async def Read(self, request: struct_pb2.Struct, context: Any) -> struct_pb2.Struct:
        async with db.UnitOfWork(self.engine) as uow:
            value = (await uow.connection.execute(sa.text("SELECT 41 + 1"))).scalar_one()
        out = struct_pb2.Struct()
        out.update({"value": value})
        return out

    async def Cached(self, request: struct_pb2.Struct, context: Any) -> struct_pb2.Struct:
        await self.redis.set(b"probe", b"1")
        out = struct_pb2.Struct()
        out.update({"value": int(await self.redis.get(b"probe") or 0)})
        return out

    async def Rows(
        self, request: struct_pb2.Struct, context: Any
    ) -> AsyncIterator[struct_pb2.Struct]:
        """A stream that reads the database before each message."""
        while True:
            out = await self.Read(request, context)
            yield out
            await asyncio.sleep(0.05)


def _registration(probe: StoreProbe) -> ServiceRegistration:
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(probe, name),
            request_deserializer=struct_pb2.Struct.FromString,
            response_serializer=struct_pb2.Struct.SerializeToString,
        )
        for name in ("Read", "Cached")
    }
    handlers["Rows"] = grpc.unary_stream_rpc_method_handler(
        probe.Rows,
        request_deserializer=struct_pb2.Struct.FromString,
        response_serializer=struct_pb2.Struct.SerializeToString,
    )
    generic = grpc.method_handlers_generic_handler(SERVICE, handlers)
    return ServiceRegistration(SERVICE, lambda server: server.add_generic_rpc_handlers((generic,)))


def _retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds() / 1e9)
    return None


async def _until_ok(call: Any, reason: str) -> float:
    """Seconds until ``call()`` succeeds; every failure before must be UNAVAILABLE (``reason``)
    with a retry delay."""
    started = time.monotonic()
    while True:
        failure: grpc.aio.AioRpcError | None = None
        try:
            await call()
        except grpc.aio.AioRpcError as exc:
            failure = exc
        if failure is None:
            return time.monotonic() - started
        assert failure.code() == grpc.StatusCode.UNAVAILABLE, (failure.code(), failure.details())
        assert error_reason(failure) == reason
        assert _retry_delay(failure) is not None
        assert time.monotonic() - started < 60, "the service did not recover"
        await asyncio.sleep(0.05)


@pytest.fixture
async def probe(tmp_path: Path) -> AsyncIterator[tuple[grpc.aio.Channel, Any, Any]]:
    async with own_postgres(tmp_path) as cluster, own_redis(tmp_path) as redis_server:
        engine = db.create_engine(cluster.url, pool_size=2)
        client = create_redis(redis_server.url)
        server = CorralServer(
            ServerConfig(name="probe", tracing=False, metrics=False),
            [_registration(StoreProbe(engine, client))],
        )
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                yield channel, cluster, redis_server
        finally:
            await server.stop(0)
            await client.aclose()
            await engine.dispose()


def _unary(channel: grpc.aio.Channel, method: str) -> Any:
    return channel.unary_unary(
        f"/{SERVICE}/{method}",
        request_serializer=struct_pb2.Struct.SerializeToString,
        response_deserializer=struct_pb2.Struct.FromString,
    )


async def test_a_database_outage_answers_unavailable_and_recovers(
    probe: tuple[grpc.aio.Channel, Any, Any],
) -> None:
    channel, cluster, _ = probe
    read = _unary(channel, "Read")
    assert (await read(struct_pb2.Struct(), timeout=10))["value"] == 42  # pooled connections
    stream = channel.unary_stream(
        f"/{SERVICE}/Rows",
        request_serializer=struct_pb2.Struct.SerializeToString,
        response_deserializer=struct_pb2.Struct.FromString,
    )(struct_pb2.Struct())
    assert (await stream.read())["value"] == 42

    await cluster.stop("fast")  # the pool's connections die under it
    with pytest.raises(grpc.aio.AioRpcError) as broken:
        while True:  # the open stream ends with the outage
            await stream.read()
    assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(broken.value) == "DATABASE_UNAVAILABLE"
    for _ in range(3):  # dead pooled connections, then refused connects: all the same answer
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read(struct_pb2.Struct(), timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
        assert error_reason(caught.value) == "DATABASE_UNAVAILABLE"
        assert _retry_delay(caught.value) == errors.OUTAGE_RETRY_SECONDS

    await cluster.start()
    seconds = await _until_ok(lambda: read(struct_pb2.Struct(), timeout=10), "DATABASE_UNAVAILABLE")
    print(f"\nkit: PostgreSQL back, first OK call after {seconds:.2f} s")


async def test_a_redis_outage_answers_unavailable_and_recovers(
    probe: tuple[grpc.aio.Channel, Any, Any],
) -> None:
    channel, _, redis_server = probe
    cached = _unary(channel, "Cached")
    assert (await cached(struct_pb2.Struct(), timeout=10))["value"] == 1
    await redis_server.stop()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cached(struct_pb2.Struct(), timeout=20)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert error_reason(caught.value) == "REDIS_UNAVAILABLE"
    assert _retry_delay(caught.value) == errors.OUTAGE_RETRY_SECONDS

    redis_server.start()
    await redis_server.ready()
    seconds = await _until_ok(lambda: cached(struct_pb2.Struct(), timeout=20), "REDIS_UNAVAILABLE")
    print(f"\nkit: Redis back, first OK call after {seconds:.2f} s")


def _wrapped(exc: BaseException) -> BaseException:
    """``exc`` as SQLAlchemy hands it on (a DBAPIError around the driver's error)."""
    try:
        try:
            raise exc
        except BaseException as inner:
            raise sa.exc.OperationalError("SELECT 1", {}, inner) from inner
    except sa.exc.OperationalError as outer:
        return outer


class _PgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("exc", "category", "reason"),
    [
        (_wrapped(_PgError("57P01")), errors.Unavailable, "DATABASE_UNAVAILABLE"),  # admin shutdown
        (_wrapped(_PgError("57P03")), errors.Unavailable, "DATABASE_UNAVAILABLE"),  # starting up
        (_wrapped(_PgError("08006")), errors.Unavailable, "DATABASE_UNAVAILABLE"),
        (_wrapped(_PgError("53300")), errors.Unavailable, "DATABASE_UNAVAILABLE"),  # too many
        (_wrapped(_PgError("40P01")), errors.Aborted, "ABORTED"),  # deadlock: rolled back
        (_wrapped(sqlite3.OperationalError("database is locked")), errors.Unavailable, None),
        (sa.exc.TimeoutError("QueuePool limit reached"), errors.Unavailable, None),
        (ConnectionRefusedError(111, "refused"), errors.Unavailable, "DEPENDENCY_FAILED"),
    ],
)
def test_driver_errors_have_one_meaning(
    exc: BaseException, category: type[errors.CorralError], reason: str | None
) -> None:
    mapped = errors.outage(exc)
    assert isinstance(mapped, category)
    assert mapped.reason == (reason or "DATABASE_UNAVAILABLE")


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("a bug"),
        _wrapped(_PgError("23505")),  # unique violation: a bug or a race, not an outage
        _wrapped(sqlite3.OperationalError("no such table: notes")),
        KeyError("x"),
    ],
)
def test_other_errors_are_not_outages(exc: BaseException) -> None:
    assert errors.outage(exc) is None


class _DownJwks:
    async def fetch(self) -> Any:
        raise ConnectionRefusedError(111, "identity is down")


async def test_signing_keys_out_of_reach_mean_retry_not_sign_in_again(
    signing_key: SigningKey,
) -> None:
    verifier = TokenVerifier(_DownJwks(), issuer=ISSUER, audience=AUDIENCE)
    with pytest.raises(errors.Unavailable) as caught:
        await verifier.verify(signing_key.token())
    assert caught.value.reason == "JWKS_UNAVAILABLE"
    assert caught.value.retry_after_seconds == errors.OUTAGE_RETRY_SECONDS
