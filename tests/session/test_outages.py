"""The session service through outages of its own PostgreSQL and Redis (a cluster and a
redis-server of the test's, stopped and started for real; the runtime, ledger and audit log
are fakes at their ports).

PostgreSQL stopped mid-turn: calls answer UNAVAILABLE (DATABASE_UNAVAILABLE, RetryInfo), never
INTERNAL; the open stream ends UNAVAILABLE (STREAM_RESTART); the turn whose driver lost the
database is ended FAILED once it is back (not left RUNNING, the session not busy) and its usage
settled; the client resumes by sequence and sees every event once. Redis stopped mid-stream:
nothing is lost and the stream does not even break. The times to recovery are printed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from corral.libs import db
from corral.libs.auth import StaticJwksSource, TokenVerifier
from corral.libs.eventhub import RedisStreamHub
from corral.libs.grpc.interceptors import AuthenticationHook
from corral.libs.grpc.server import CorralServer, ServerConfig
from corral.libs.redis import create_redis
from corral.services.session.main import MIGRATIONS, Wiring, wire
from corral.session.v1 import event_pb2, session_pb2
from corral.session.v1 import session_service_pb2 as pb
from corral.session.v1 import session_service_pb2_grpc as rpc
from tests.libs.stores import OwnRedis, own_postgres, own_redis
from tests.session.fakes import FakeAudit, FakeLedger, FakeRuntime, FakeWorkspaces
from tests.support.grpc_tools import error_reason
from tests.support.keys import AUDIENCE, ISSUER, SigningKey
from tests.support.topology import PostgresCluster

LIMIT = 60.0  # seconds any recovery may take before the test fails


@dataclass
class Served:
    stub: rpc.SessionServiceStub
    runtime: FakeRuntime
    ledger: FakeLedger
    wired: Wiring
    cluster: PostgresCluster
    redis: OwnRedis
    auth: tuple[tuple[str, str], ...]


@pytest.fixture
async def served(tmp_path: Path, signing_key: SigningKey) -> AsyncIterator[Served]:
    async with own_postgres(tmp_path) as cluster, own_redis(tmp_path) as redis_server:
        engine = db.create_engine(cluster.url, schema="session", pool_size=4)
        await db.migrate(engine, MIGRATIONS, schema="session")
        client = create_redis(redis_server.url)
        hub = RedisStreamHub(client)
        runtime, ledger = FakeRuntime(), FakeLedger()
        wired = wire(
            engine,
            hub,
            runtime,
            ledger,
            FakeAudit(),
            workspaces=FakeWorkspaces(),
            heartbeat_seconds=0.3,
            lease_seconds=30,
        )
        verifier = TokenVerifier(
            StaticJwksSource(signing_key.jwks()), issuer=ISSUER, audience=AUDIENCE
        )
        server = CorralServer(
            ServerConfig(name="session", hooks=[AuthenticationHook(verifier)], tracing=False),
            [wired.registration],
        )
        await server.start()
        channel = grpc.aio.insecure_channel(server.address)
        token = signing_key.token(
            sub="organizations/acme/users/alice", org="organizations/acme", roles=["user"]
        )
        try:
            yield Served(
                rpc.SessionServiceStub(channel),
                runtime,
                ledger,
                wired,
                cluster,
                redis_server,
                (("authorization", f"Bearer {token}"),),
            )
        finally:
            await channel.close()
            await wired.service.close()
            await server.stop(0)
            await hub.close()
            await client.aclose()
            await engine.dispose()


def _retry_info(error: grpc.aio.AioRpcError) -> bool:
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    return status is not None and any(
        d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details
    )


class Watcher:
    """A client that follows a session's stream, resuming by sequence when it is told to."""

    def __init__(self, s: Served, session: str) -> None:
        self.s, self.session = s, session
        self.events: list[event_pb2.SessionEvent] = []
        self.restarts: list[grpc.aio.AioRpcError] = []
        self.changed = asyncio.Condition()
        self.task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            after = self.events[-1].sequence if self.events else 0
            call = self.s.stub.StreamSessionEvents(
                pb.StreamSessionEventsRequest(session=self.session, after_sequence=after),
                metadata=self.s.auth,
            )
            try:
                async for response in call:
                    if not response.event.HasField("heartbeat"):
                        async with self.changed:
                            self.events.append(response.event)
                            self.changed.notify_all()
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                async with self.changed:
                    self.restarts.append(error)
                    self.changed.notify_all()
                await asyncio.sleep(0.1)

    async def until(self, check: Any) -> None:
        async with asyncio.timeout(LIMIT), self.changed:
            await self.changed.wait_for(lambda: check(self))

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def _kinds(events: list[event_pb2.SessionEvent]) -> list[str]:
    return [e.WhichOneof("payload") or "" for e in events]


async def _first_ok(call: Any) -> float:
    """Seconds until ``call()`` succeeds; every failure before is UNAVAILABLE with a reason
    and a retry delay, never INTERNAL."""
    started = time.monotonic()
    while True:
        failure: grpc.aio.AioRpcError | None = None
        try:
            await call()
        except grpc.aio.AioRpcError as error:
            failure = error
        if failure is None:
            return time.monotonic() - started
        assert failure.code() == grpc.StatusCode.UNAVAILABLE, (failure.code(), failure.details())
        assert error_reason(failure) == "DATABASE_UNAVAILABLE"
        assert _retry_info(failure)
        assert time.monotonic() - started < LIMIT
        await asyncio.sleep(0.05)


async def test_postgres_stopped_mid_turn(served: Served) -> None:
    s = served
    session = (
        await s.stub.CreateSession(
            pb.CreateSessionRequest(session=session_pb2.Session()), metadata=s.auth
        )
    ).session
    turn = (
        await s.stub.SendMessage(
            pb.SendMessageRequest(session=session.name, text="hello"), metadata=s.auth
        )
    ).turn
    fake = await s.runtime.next_turn()
    watcher = Watcher(s, session.name)
    fake.text("before")
    await watcher.until(lambda w: "text_block" in _kinds(w.events))

    await s.cluster.stop("fast")
    stopped = time.monotonic()
    fake.text("during")  # the driver cannot write it: it dies, its turn is ended later
    await watcher.until(lambda w: w.restarts)  # the open stream is told to reconnect
    restart = watcher.restarts[0]
    assert error_reason(restart) == "STREAM_RESTART"
    assert _retry_info(restart)
    for call in (
        lambda: s.stub.GetSession(pb.GetSessionRequest(name=session.name), metadata=s.auth),
        lambda: s.stub.ListSessions(pb.ListSessionsRequest(), metadata=s.auth),
        lambda: s.stub.CreateSession(
            pb.CreateSessionRequest(session=session_pb2.Session()), metadata=s.auth
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
        assert error_reason(caught.value) == "DATABASE_UNAVAILABLE"
        assert _retry_info(caught.value)

    down = time.monotonic() - stopped
    await s.cluster.start()
    back = time.monotonic()
    first_ok = await _first_ok(
        lambda: s.stub.GetSession(pb.GetSessionRequest(name=session.name), metadata=s.auth)
    )
    # The turn is ended (its driver died with the database), and the session goes on.
    await watcher.until(lambda w: "turn_result" in _kinds(w.events))
    turn_ended = time.monotonic() - back
    [result] = [e.turn_result for e in watcher.events if e.HasField("turn_result")]
    assert result.status == event_pb2.TurnResult.STATUS_FAILED
    assert result.error.reason == "TURN_ABORTED"
    assert "DATABASE_UNAVAILABLE" in result.error.message
    assert fake.id in s.runtime.interrupted
    await s.ledger.wait(lambda: not s.ledger.held and not s.ledger.budget_holds)
    await s.stub.SendMessage(
        pb.SendMessageRequest(session=session.name, text="again"), metadata=s.auth
    )
    second = await s.runtime.next_turn()
    second.text("after")
    second.finish()
    await watcher.until(lambda w: _kinds(w.events).count("turn_result") == 2)
    await watcher.close()
    sequences = [e.sequence for e in watcher.events]
    assert sequences == list(range(1, len(sequences) + 1))  # every event once, in order
    assert turn.name.endswith(fake.id)
    print(
        f"\nsession: PostgreSQL down {down:.1f} s; first OK call {first_ok:.2f} s after it"
        f" returned; the orphaned turn ended {turn_ended:.2f} s after it returned"
    )


async def test_redis_restarted_mid_stream_loses_nothing(served: Served) -> None:
    s = served
    session = (
        await s.stub.CreateSession(
            pb.CreateSessionRequest(session=session_pb2.Session()), metadata=s.auth
        )
    ).session
    await s.stub.SendMessage(
        pb.SendMessageRequest(session=session.name, text="hello"), metadata=s.auth
    )
    fake = await s.runtime.next_turn()
    watcher = Watcher(s, session.name)
    fake.text("before")
    await watcher.until(lambda w: "text_block" in _kinds(w.events))

    await s.redis.stop()
    stopped = time.monotonic()
    fake.text("while redis is away")  # written to PostgreSQL; the publish fails
    await watcher.until(lambda w: _kinds(w.events).count("text_block") == 2)  # from the log
    during = time.monotonic() - stopped
    s.redis.start()
    await s.redis.ready()
    back = time.monotonic()
    fake.text("after")
    fake.finish()
    await watcher.until(lambda w: "turn_result" in _kinds(w.events))
    after = time.monotonic() - back
    await watcher.close()
    assert watcher.restarts == []  # the stream never broke
    sequences = [e.sequence for e in watcher.events]
    assert sequences == list(range(1, len(sequences) + 1))
    texts = [e.text_block.text for e in watcher.events if e.HasField("text_block")]
    assert texts == ["before", "while redis is away", "after"]
    print(
        f"\nsession: Redis down; an event written meanwhile reached the watcher {during:.2f} s"
        f" after Redis stopped (from the log); the turn's end {after:.2f} s after it returned"
    )
