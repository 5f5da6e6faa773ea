"""Benchmark: event fan-out. One turn's events reach 1 watcher, then 100 watchers, of the same
session over real gRPC (SQLite log + in-process hub, the `make run` defaults); the runtime is
a fake at its port that emits as fast as the session service takes them.

Reports each run's delivered event rate per watcher and the ratio 100-watcher / 1-watcher
(the design's budget: >= 80%), and the write throughput of the event log.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import grpc

from corral.libs import db
from corral.libs.auth import StaticJwksSource, TokenVerifier
from corral.libs.eventhub import InMemoryHub
from corral.libs.grpc.interceptors import AuthenticationHook
from corral.libs.grpc.server import CorralServer, ServerConfig, ServiceRegistration
from corral.services.session.api import SessionApi
from corral.services.session.main import MIGRATIONS, SERVICE
from corral.services.session.repository import SessionUnitOfWork
from corral.services.session.service import SessionService
from corral.session.v1 import session_pb2
from corral.session.v1 import session_service_pb2 as pb
from corral.session.v1 import session_service_pb2_grpc as rpc
from tests.session.fakes import FakeAudit, FakeLedger, FakeRuntime, FakeWorkspaces
from tests.support.keys import AUDIENCE, ISSUER, SigningKey


async def _watch(
    stub: rpc.SessionServiceStub,
    session: str,
    metadata: object,
    expect: int,
    ready: asyncio.Event,
    counter: list[int],
) -> float:
    call = stub.StreamSessionEvents(
        pb.StreamSessionEventsRequest(session=session), metadata=metadata
    )
    seen = 0
    first = 0.0
    ready_sent = False
    async for response in call:
        if response.event.HasField("heartbeat"):
            if not ready_sent:
                counter[0] += 1
                ready_sent = True
                if counter[0] == counter[1]:
                    ready.set()
            continue
        if seen == 0:
            first = time.perf_counter()
        seen += 1
        if seen == expect:
            call.cancel()
            return time.perf_counter() - first
    return float("nan")


async def run(watchers: int, deltas: int, workdir: Path, pace: float) -> tuple[float, float]:
    key = SigningKey.generate()
    engine = db.create_engine(f"sqlite+aiosqlite:///{workdir}/bench-{watchers}.db")
    await db.migrate(engine, MIGRATIONS)
    hub = InMemoryHub(buffer=deltas * 2)
    runtime = FakeRuntime()
    service = SessionService(
        lambda: SessionUnitOfWork(engine),
        hub,
        runtime,
        FakeLedger(),
        FakeAudit(),
        workspaces=FakeWorkspaces(),
        heartbeat_seconds=0.2,
    )
    api = SessionApi(service)
    verifier = TokenVerifier(StaticJwksSource(key.jwks()), issuer=ISSUER, audience=AUDIENCE)
    server = CorralServer(
        ServerConfig(name="session", hooks=[AuthenticationHook(verifier)], tracing=False),
        [
            ServiceRegistration(
                SERVICE.full_name, lambda s: rpc.add_SessionServiceServicer_to_server(api, s)
            )
        ],
    )
    await server.start()
    metadata = (("authorization", f"Bearer {key.token()}"),)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = rpc.SessionServiceStub(channel)
            session = (
                await stub.CreateSession(
                    pb.CreateSessionRequest(session=session_pb2.Session(display_name="bench")),
                    metadata=metadata,
                )
            ).session.name
            ready = asyncio.Event()
            counter = [0, watchers]
            expect = deltas + 6  # user message, state, started, deltas, block, result, state
            tasks = [
                asyncio.create_task(_watch(stub, session, metadata, expect, ready, counter))
                for _ in range(watchers)
            ]
            await asyncio.wait_for(ready.wait(), 60)  # every watcher is tailing
            started = time.perf_counter()
            await stub.SendMessage(
                pb.SendMessageRequest(session=session, text="go"), metadata=metadata
            )
            turn = await runtime.next_turn()
            if pace:
                for i in range(deltas):  # at the model's pace: one delta every 1/pace s
                    turn.emit(text_delta={"text": f"token{i} ", "message_id": "m1"})
                    await asyncio.sleep(1 / pace)
                turn.emit(text_block={"text": "...", "message_id": "m1"})
            else:
                turn.text(*[f"token{i} " for i in range(deltas)])
            turn.finish()
            durations = await asyncio.wait_for(asyncio.gather(*tasks), 300)
            wall = time.perf_counter() - started
    finally:
        await service.close()
        await server.stop(0)
        await hub.close()
        await engine.dispose()
    per_watcher_rate = expect / max(durations)
    return per_watcher_rate, expect * watchers / wall


async def main(deltas: int, many: int, pace: float) -> None:
    print("event fan-out: one turn's deltas to N watchers over real gRPC (SQLite + in-process hub)")
    for label, rate, count in (("at a model's pace", pace, deltas // 4), ("flat out", 0.0, deltas)):
        with tempfile.TemporaryDirectory() as tmp:
            one_rate, _ = await run(1, count, Path(tmp), rate)
            many_rate, total = await run(many, count, Path(tmp), rate)
        paced = f"{rate:.0f} deltas/s produced" if rate else "producer unthrottled"
        print(f"  {label} ({count} deltas, {paced}):")
        print(f"    1 watcher      {one_rate:9.0f} events/s")
        print(
            f"    {many} watchers   {many_rate:9.0f} events/s each  ({total:.0f} events/s in all)"
        )
        print(f"    ratio {many}/1: {many_rate / one_rate:.0%} per watcher (budget >= 80%)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--deltas", type=int, default=2000)
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--pace", type=float, default=100.0, help="deltas per second a model emits")
    args = parser.parse_args()
    asyncio.run(main(args.deltas, args.watchers, args.pace))
