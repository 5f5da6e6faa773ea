"""Benchmark: the platform's cost on the agent path, each figure a ratio to the direct SDK.

Both sides drive the real Claude CLI through the real Agent SDK against the same offline
model server in this process, with the same scripted answer (text deltas at a fixed pace):

* direct: one warm ClaudeSDKClient, ``query()`` then ``receive_response()``;
* platform: identity + session + runtime over gRPC on SQLite (the `make run` defaults), the
  client calls SendMessage and reads StreamSessionEvents, the runtime's client process warm.

Per-event overhead: for each text delta, its arrival at the platform's client minus the
runtime's stamp on it (taken when the SDK handed it over); p50/p99 over every delta.
Time to first event: start of the turn -> first text delta. Then memory: 1,000 open sessions
on a runtime pool of 8 (RSS of this process plus its CLI children, against the same process
before any session).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient
from claude_agent_sdk.types import StreamEvent

from corral.libs.envoy import start_edge
from corral.services.runtime.offline_model import start as start_model
from corral.session.v1 import session_pb2
from corral.session.v1 import session_service_pb2 as pb
from corral.session.v1 import session_service_pb2_grpc as srpc
from tests.support.platform import Platform, directive, running_platform

MODEL = "claude-sonnet-4-5"


def script(deltas: int, pace: float) -> str:
    return directive({"text": "x" * deltas, "chunk": 1, "delay": 1 / pace})


async def direct_turns(turns: int, prompt: str, workdir: Path) -> list[list[float]]:
    server, port = await start_model("127.0.0.1", 0)
    config = workdir / "direct-config"
    config.mkdir()
    options = ClaudeAgentOptions(
        model=MODEL,
        cwd=workdir,
        include_partial_messages=True,
        setting_sources=[],
        env={
            "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}",
            "ANTHROPIC_API_KEY": "offline",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CONFIG_DIR": str(config),
            "HOME": str(config),
        },
    )
    arrivals: list[list[float]] = []
    try:
        async with ClaudeSDKClient(options) as client:
            for turn in range(turns + 1):  # the first turn warms the process up
                started = time.perf_counter()
                seen: list[float] = []
                await client.query(prompt)
                async with asyncio.timeout(TURN_LIMIT_SECONDS):
                    async for message in client.receive_response():
                        if isinstance(message, StreamEvent):
                            delta = message.event.get("delta", {})
                            if (
                                message.event.get("type") == "content_block_delta"
                                and delta.get("type") == "text_delta"
                            ):
                                seen.append(time.perf_counter() - started)
                if turn:
                    arrivals.append(seen)
    finally:
        server.close()
    return arrivals


STAGES: dict[str, list[float]] = {}
TURN_LIMIT_SECONDS = 120.0  # a turn that takes longer fails the benchmark rather than hanging it


async def platform_turns(
    platform: Platform,
    turns: int,
    prompt: str,
    *,
    via: str = "",
    latency: list[float] | None = None,
) -> list[list[float]]:
    """Turns as a client sees them, straight to the session service or ``via`` the edge."""
    stub = srpc.SessionServiceStub(
        platform.channel("session") if not via else _edge_channel(platform, via)
    )
    latency = LATENCY if latency is None else latency
    session = (
        await stub.CreateSession(
            pb.CreateSessionRequest(session=session_pb2.Session(display_name="bench")),
            metadata=platform.auth,
        )
    ).session.name
    arrivals: list[list[float]] = []
    cursor = 0
    for turn in range(turns + 1):
        seen: list[float] = []
        call = stub.StreamSessionEvents(
            pb.StreamSessionEventsRequest(session=session, after_sequence=cursor),
            metadata=platform.auth,
        )
        started = time.perf_counter()
        wall = time.time()
        await stub.SendMessage(
            pb.SendMessageRequest(session=session, text=prompt), metadata=platform.auth
        )
        sent = time.time()
        kinds: list[str] = []
        try:
            async with asyncio.timeout(TURN_LIMIT_SECONDS):  # bounded: never hangs
                cursor = await _turn_events(call, kinds, seen, started, wall, turn, latency)
        except TimeoutError as exc:
            history = await stub.ListSessionEvents(
                pb.ListSessionEventsRequest(parent=session, after_sequence=max(0, cursor - 5)),
                metadata=platform.auth,
            )
            state = await stub.GetSession(
                pb.GetSessionRequest(name=session), metadata=platform.auth
            )
            logged = [(e.sequence, e.WhichOneof("payload")) for e in history.session_events]
            raise TimeoutError(
                f"turn {turn} stalled: cursor {cursor}, streamed {kinds[:6]}..., log {logged},"
                f" session {session_pb2.Session.State.Name(state.session.state)}"
                f" last_sequence {state.session.last_sequence}"
            ) from exc
        if turn:
            arrivals.append(seen)
            STAGES.setdefault("SendMessage returned", []).append((sent - wall) * 1000)
    return arrivals


async def _turn_events(
    call: Any,
    kinds: list[str],
    seen: list[float],
    started: float,
    wall: float,
    turn: int,
    latency: list[float],
) -> int:
    """Read one turn's events until the session is idle again; returns the last sequence."""
    cursor = 0
    async for response in call:
        event = response.event
        kind = event.WhichOneof("payload") or ""
        kinds.append(kind)
        if kind == "heartbeat":
            continue
        cursor = event.sequence
        stamp = event.create_time.ToNanoseconds() / 1e9
        first_delta = kind == "text_delta" and not seen
        if turn and (kind in ("user_message", "turn_started") or first_delta):
            STAGES.setdefault(f"{kind} created", []).append((stamp - wall) * 1000)
        if kind == "text_delta":
            if turn:
                latency.append((time.time() - stamp) * 1000)
            seen.append(time.perf_counter() - started)
        if kind == "turn_result" and event.turn_result.status != event.turn_result.STATUS_SUCCEEDED:
            raise RuntimeError(f"a benchmark turn did not succeed: {event.turn_result}")
        if kind == "state_changed" and event.state_changed.state in (
            session_pb2.Session.STATE_IDLE,
            session_pb2.Session.STATE_FAILED,
        ):
            call.cancel()
            break
    return cursor


LATENCY: list[float] = []


def _edge_channel(platform: Platform, address: str) -> grpc.aio.Channel:
    channel = grpc.aio.insecure_channel(address)
    platform.channels.append(channel)
    return channel


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def tree_rss_kib() -> tuple[int, int, int]:
    """RSS of this process, of its descendants (the CLI processes), and how many CLIs."""
    me = os.getpid()
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    family = {me}
    changed = True
    while changed:
        changed = False
        for pid, parent in parents.items():
            if parent in family and pid not in family:
                family.add(pid)
                changed = True
    clis = 0
    for pid in family - {me}:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmd:
                clis += b"claude" in cmd.read()
        except OSError:
            continue
    return rss_kib(me), sum(rss_kib(pid) for pid in family - {me}), clis


async def open_sessions(platform: Platform, count: int, with_turns: int) -> None:
    stub = platform.sessions
    names = []
    for i in range(count):
        names.append(
            (
                await stub.CreateSession(
                    pb.CreateSessionRequest(
                        session=session_pb2.Session(display_name=f"s{i}"),
                        request_id=str(uuid.uuid4()),
                    ),
                    metadata=platform.auth,
                )
            ).session.name
        )
    for name in names[:with_turns]:  # each takes a pooled process, evicting the oldest idle one
        call = stub.StreamSessionEvents(
            pb.StreamSessionEventsRequest(session=name), metadata=platform.auth
        )
        await stub.SendMessage(
            pb.SendMessageRequest(session=name, text="hello"), metadata=platform.auth
        )
        async with asyncio.timeout(TURN_LIMIT_SECONDS):  # bounded: never hangs
            async for response in call:
                if response.event.HasField("turn_result"):
                    call.cancel()
                    break


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def main(turns: int, deltas: int, pace: float, sessions: int, with_turns: int) -> None:
    prompt = script(deltas, pace)
    with tempfile.TemporaryDirectory() as tmp:
        direct = await direct_turns(turns, prompt, Path(tmp))
        async with running_platform(
            Path(tmp) / "platform",
            runtime_pool_size=8,
            rate_limit_per_minute=10**6,
            rate_limit_burst=10**5,
        ) as platform:
            through = await platform_turns(platform, turns, prompt)
            edge = await start_edge(platform.settings, list(platform.apps.values()))
            via_edge: list[float] = []
            await platform_turns(
                platform, turns, prompt, via=f"127.0.0.1:{edge.port}", latency=via_edge
            )
            before, _, _ = tree_rss_kib()
            started = time.perf_counter()
            await open_sessions(platform, sessions, with_turns)
            opened = time.perf_counter() - started
            after, children, clis = tree_rss_kib()
            status = json.dumps({"sessions": sessions, "turned": with_turns})
    overhead = LATENCY  # the runtime's stamp on each delta -> its arrival at the platform client
    ttfe_direct = statistics.median(t[0] for t in direct) * 1000
    ttfe_platform = statistics.median(t[0] for t in through) * 1000
    gap = statistics.median((t[-1] - t[0]) / max(1, len(t) - 1) for t in direct) * 1000
    p50, p99 = percentile(overhead, 0.5), percentile(overhead, 0.99)
    e50, e99 = percentile(via_edge, 0.5), percentile(via_edge, 0.99)
    stages = "   ".join(f"{k} +{statistics.median(v):.1f} ms" for k, v in STAGES.items())
    lines = [
        f"agent path: {turns} warm turns of {deltas} text deltas at {pace:.0f}/s,"
        " real SDK + CLI, offline model",
        f"  per-event overhead, runtime -> platform client: p50 {p50:.2f} ms   p99 {p99:.2f} ms"
        f"   (the direct SDK sees a delta every {gap:.1f} ms: p50 = {p50 / gap:.2f} of that)",
        f"  the same through Envoy (the edge): p50 {e50:.2f} ms   p99 {e99:.2f} ms"
        f"   (budget: p99 <= 5 ms)",
        f"  time to first text: direct SDK {ttfe_direct:.1f} ms   platform {ttfe_platform:.1f} ms"
        f"   ratio {ttfe_platform / ttfe_direct:.2f}x   added {ttfe_platform - ttfe_direct:.1f} ms",
        f"  turn start, after SendMessage was called: {stages}",
        f"  open sessions {status}: pool of 8 -> {clis} CLI processes alive"
        f" ({children / 1024:.0f} MiB, {children / 1024 / max(clis, 1):.0f} MiB each);"
        f" the platform process {before / 1024:.0f} -> {after / 1024:.0f} MiB"
        f" ({(after - before) / sessions:.0f} KiB per open session; opened in {opened:.1f} s)",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--deltas", type=int, default=40)
    parser.add_argument("--pace", type=float, default=100.0)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--with-turns", type=int, default=40)
    args = parser.parse_args()
    asyncio.run(main(args.turns, args.deltas, args.pace, args.sessions, args.with_turns))
