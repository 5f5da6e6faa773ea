"""The process pool and every way a turn or a process ends: interrupt, a caller that goes away,
eviction, idleness, release, shutdown. Processes are counted in /proc, not taken on trust; a
test waits for a turn's own task to end, and drives the pool's clock for idleness."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from corral.runtime.v1 import runtime_event_pb2 as event_pb
from corral.runtime.v1 import runtime_service_pb2 as pb
from tests.runtime.conftest import (
    Clock,
    Runtime,
    cli_processes,
    directive,
    new_session,
    options,
    processes_with,
    recorded_model_requests,
)
from tests.runtime.test_runtime_permissions import Turn, write_file
from tests.support.grpc_tools import error_reason

INTERRUPTED = event_pb.TurnResult.STATUS_INTERRUPTED
SUCCEEDED = event_pb.TurnResult.STATUS_SUCCEEDED


def long_tool(marker: str) -> str:
    """A turn whose Bash tool runs for 30 s, findable in /proc by ``marker``."""
    command = f"python3 -c 'import time; time.sleep(30)' {marker}"
    return directive({"text": "working"}, {"tool": "Bash", "input": {"command": command}})


async def eventually(check: Callable[[], bool], within: float = 5.0) -> bool:
    """Polls /proc (through ``check``) for a process to appear or to go."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def status(runtime: Runtime) -> Any:
    reply = await runtime.stub.GetRuntimeStatus(
        pb.GetRuntimeStatusRequest(), metadata=runtime.metadata()
    )
    return reply.status


def running_task(runtime: Runtime, session: str) -> asyncio.Task[None]:
    """The task of the session's running turn: it ends once the turn has ended for good."""
    state = runtime.service.store.loaded(session)
    assert state is not None and state.turn is not None and state.turn.task is not None
    return state.turn.task


async def test_interrupt_kills_the_running_tool_and_reports_the_cost(runtime: Runtime) -> None:
    session, marker = new_session(), f"corral-marker-{uuid.uuid4().hex}"
    turn = Turn(
        runtime, runtime.request(session, long_tool(marker), agent=options(allowed_tools=["Bash"]))
    )
    await turn.until("tool_use")
    assert await eventually(lambda: bool(processes_with(marker))), "the tool never started"

    started = time.monotonic()
    await runtime.stub.InterruptTurn(
        pb.InterruptTurnRequest(session=turn.request.session, turn_id=turn.request.turn_id),
        metadata=runtime.metadata(),
    )
    await turn.rest()
    assert time.monotonic() - started < 5

    result = turn.find("turn_result")[0]
    assert result.status == INTERRUPTED
    assert result.usage.cost_usd_micros > 0
    assert result.usage.input_tokens > 0
    assert await eventually(lambda: not processes_with(marker), within=1.0), "the tool survived"
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await runtime.stub.InterruptTurn(
            pb.InterruptTurnRequest(session=turn.request.session, turn_id=turn.request.turn_id),
            metadata=runtime.metadata(),
        )
    assert error_reason(gone.value) == "TURN_NOT_FOUND"
    # The session goes on.
    after = await runtime.turn(session, "still there?", resume=result.transcript_id)
    assert after[-1].turn_result.status == SUCCEEDED


async def test_interrupt_denies_a_pending_permission_request(runtime: Runtime) -> None:
    turn = Turn(runtime, runtime.request(new_session(), write_file("never.txt")))
    asked = (await turn.until("permission_request")).permission_request
    await runtime.stub.InterruptTurn(
        pb.InterruptTurnRequest(session=turn.request.session, turn_id=turn.request.turn_id),
        metadata=runtime.metadata(),
    )
    await turn.rest()
    decided = turn.find("permission_decision")[0]
    assert decided.permission_request_id == asked.id
    assert decided.source == event_pb.PermissionDecision.SOURCE_INTERRUPT
    assert decided.behavior == event_pb.PERMISSION_BEHAVIOR_DENY
    assert turn.find("turn_result")[0].status == INTERRUPTED


async def test_a_caller_that_goes_away_stops_the_turn_and_its_process(runtime: Runtime) -> None:
    session, marker = new_session(), f"corral-marker-{uuid.uuid4().hex}"
    turn = Turn(
        runtime,
        runtime.request(session, long_tool(marker), agent=options(allowed_tools=["Bash"])),
    )
    await turn.until("tool_use")
    assert await eventually(lambda: bool(processes_with(marker)))
    ended = running_task(runtime, session)
    turn.call.cancel()
    await ended

    assert await eventually(lambda: not processes_with(marker)), "the tool survived"
    assert await eventually(lambda: not cli_processes()), "the CLI survived"
    current = await status(runtime)
    assert current.running_turns == 0
    assert current.live_processes == 0


async def test_three_sessions_share_two_processes_and_resume_their_conversations(
    make_runtime: Callable[..., Any],
) -> None:
    runtime: Runtime = await make_runtime(runtime_pool_size=2)
    most = 0
    sampling = True

    async def sample() -> None:
        nonlocal most
        while sampling:
            most = max(most, len(cli_processes()))
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    sessions = {name: new_session() for name in "abc"}
    transcripts: dict[str, str] = {}
    try:
        with recorded_model_requests() as bodies:
            for name, session in sessions.items():  # a, b, then c evicts a (least recent)
                events = await runtime.turn(session, f"remember the word pineapple-{name}")
                assert events[0].turn_started.process_started
                assert events[-1].turn_result.status == SUCCEEDED
                transcripts[name] = events[-1].turn_result.transcript_id
            assert (await status(runtime)).live_processes == 2

            # a comes back: resumed from its transcript in a new process (b is evicted now).
            del bodies[:]
            events = await runtime.turn(sessions["a"], "which word?", resume=transcripts["a"])
            assert events[0].turn_started.process_started
            assert events[0].turn_started.transcript_id == transcripts["a"]
            assert events[-1].turn_result.status == SUCCEEDED
            assert any(b"pineapple-a" in body for body in bodies), "history was not resumed"
            assert not any(b"pineapple-b" in body for body in bodies)

            # c is still warm; b is resumed and evicts c... every session keeps working.
            warm = await runtime.turn(sessions["c"], "still warm", resume=transcripts["c"])
            assert not warm[0].turn_started.process_started
            cold = await runtime.turn(sessions["b"], "back again", resume=transcripts["b"])
            assert cold[0].turn_started.process_started

        # Two turns waiting for a person hold both processes: a third session must wait.
        running = [
            Turn(
                runtime,
                runtime.request(
                    sessions[name], write_file(f"{name}.txt"), resume=transcripts[name]
                ),
            )
            for name in "ab"
        ]
        asked = [(await turn.until("permission_request")).permission_request for turn in running]
        third = Turn(runtime, runtime.request(new_session(), "me too"))
        assert (await third.until("waiting_for_agent")).waiting_for_agent.position == 1
        for turn, request in zip(running, asked, strict=True):
            await turn.decide(request.id, event_pb.PERMISSION_BEHAVIOR_ALLOW)
            await turn.rest()
            assert turn.find("turn_result")[0].status == SUCCEEDED
        await third.rest()
        assert third.find("turn_result")[0].status == SUCCEEDED
        current = await status(runtime)
        assert current.pool_size == 2
        assert current.live_processes == 2
        assert current.open_sessions == 4
        assert (current.running_turns, current.waiting_turns) == (0, 0)
    finally:
        sampling = False
        await sampler
    assert most == 2, f"{most} CLI processes at once with a pool of 2"

    await runtime.app.stop(0)
    assert not cli_processes()


async def test_idle_processes_are_reaped_and_released_sessions_resume(
    make_runtime: Callable[..., Any],
) -> None:
    clock = Clock()
    runtime: Runtime = await make_runtime(runtime_idle_seconds=60, clock=clock)
    session = new_session()
    first = await runtime.turn(session, "hello")
    transcript = first[-1].turn_result.transcript_id
    clock.now += 60
    assert await runtime.service.reap_idle() == 0, "reaped before it was idle for long"
    clock.now += 1
    assert await runtime.service.reap_idle() == 1
    assert await eventually(lambda: not cli_processes()), "the reaped process lives on"
    assert (await status(runtime)).live_processes == 0

    second = await runtime.turn(session, "hello again", resume=transcript)
    assert second[0].turn_started.process_started
    assert second[-1].turn_result.status == SUCCEEDED

    released = await runtime.stub.ReleaseSession(
        pb.ReleaseSessionRequest(session=f"sessions/{session}", delete_transcript=True),
        metadata=runtime.metadata(),
    )
    assert released.process_released or not cli_processes()
    with pytest.raises(grpc.aio.AioRpcError) as deleted:
        await runtime.turn(session, "anyone?", resume=transcript)
    assert error_reason(deleted.value) == "TRANSCRIPT_NOT_FOUND"


async def test_release_refuses_a_running_turn_and_shutdown_reports_it_and_stops_everything(
    make_runtime: Callable[..., Any],
) -> None:
    runtime: Runtime = await make_runtime()
    marker = f"corral-marker-{uuid.uuid4().hex}"
    turn = Turn(
        runtime,
        runtime.request(new_session(), long_tool(marker), agent=options(allowed_tools=["Bash"])),
    )
    await turn.until("tool_use")
    assert await eventually(lambda: bool(processes_with(marker)))
    with pytest.raises(grpc.aio.AioRpcError) as busy:
        await runtime.stub.ReleaseSession(
            pb.ReleaseSessionRequest(session=turn.request.session), metadata=runtime.metadata()
        )
    assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # A graceful stop, even with no grace for calls: the turn is interrupted first, and its
    # stream carries its result, with what it cost, before the server goes.
    await asyncio.gather(runtime.app.stop(0), turn.rest())
    result = turn.find("turn_result")[0]
    assert (result.status, result.error.reason) == (INTERRUPTED, "INTERRUPTED")
    assert result.usage.cost_usd_micros > 0
    assert result.usage.input_tokens > 0
    assert not cli_processes()
    assert not processes_with(marker)


async def test_a_crashed_agent_process_fails_the_turn_and_the_session_resumes(
    runtime: Runtime,
) -> None:
    session, marker = new_session(), f"corral-marker-{uuid.uuid4().hex}"
    first = await runtime.turn(session, "before the crash")
    transcript = first[-1].turn_result.transcript_id
    turn = Turn(
        runtime,
        runtime.request(
            session, long_tool(marker), resume=transcript, agent=options(allowed_tools=["Bash"])
        ),
    )
    await turn.until("tool_use")
    assert await eventually(lambda: bool(processes_with(marker)))
    for pid in cli_processes():
        os.kill(pid, signal.SIGKILL)
    await turn.rest()

    result = turn.find("turn_result")[0]
    assert result.status == event_pb.TurnResult.STATUS_FAILED
    assert result.error.reason == "PROCESS_CRASHED"
    assert await eventually(lambda: not processes_with(marker), within=2.0), "the tool survived"
    after = await runtime.turn(session, "after the crash", resume=transcript)
    assert after[0].turn_started.process_started
    assert after[-1].turn_result.status == SUCCEEDED

    # A process that dies while idle is replaced quietly on the next turn.
    for pid in cli_processes():
        os.kill(pid, signal.SIGKILL)
    assert await eventually(lambda: not cli_processes())
    again = await runtime.turn(session, "and again", resume=transcript)
    assert again[0].turn_started.process_started
    assert again[-1].turn_result.status == SUCCEEDED


async def test_a_restarted_runtime_resumes_its_sessions(
    make_runtime: Callable[..., Any], tmp_path: Path
) -> None:
    first: Runtime = await make_runtime(runtime_root=tmp_path / "shared")
    session = new_session()
    events = await first.turn(session, "remember the word quince")
    transcript = events[-1].turn_result.transcript_id
    await first.app.stop(0)

    second: Runtime = await make_runtime(runtime_root=tmp_path / "shared")
    assert (await status(second)).open_sessions == 1
    with recorded_model_requests() as bodies:
        events = await second.turn(session, "which word?", resume=transcript)
    assert events[0].turn_started.process_started
    assert events[-1].turn_result.status == SUCCEEDED
    assert any(b"quince" in body for body in bodies)
    request = second.request(
        session, "mine?", resume=transcript, organization="organizations/globex"
    )
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await second.stream(request).read()
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
