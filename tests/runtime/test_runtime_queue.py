"""Turns beyond the pool wait for a process, in order of arrival, in a bounded queue: what a
caller sees (``waiting_for_agent``, then ``turn_started`` with its wait), what a full queue
refuses, how a waiting turn leaves the queue (its caller goes away, an interrupt, a draining
replica), and what a graceful stop reports for the turns it interrupts. The scripted SDK holds
each turn until the test lets it go; one test does the same with the real CLI, holding its
turns on a permission request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader

from corral.libs.errors import Unavailable
from corral.runtime.v1 import runtime_event_pb2 as event_pb
from corral.runtime.v1 import runtime_service_pb2 as pb
from corral.services.session.events import from_runtime
from tests.runtime.conftest import Runtime, cli_processes, new_session, payloads
from tests.runtime.fake_sdk import FakeClient, FakeSdk, init, text
from tests.runtime.test_runtime_permissions import Turn, write_file
from tests.runtime.test_runtime_service import ALICE, turn_request
from tests.support.grpc_tools import error_reason

SUCCEEDED = event_pb.TurnResult.STATUS_SUCCEEDED
INTERRUPTED = event_pb.TurnResult.STATUS_INTERRUPTED
ALLOW = event_pb.PERMISSION_BEHAVIOR_ALLOW


class Held:
    """A script whose turns run until the test releases them, in the order they started. Each
    spends 0.02 USD before it waits (the CLI reports it with its result, interrupted or not)."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self._gates: dict[str, asyncio.Event] = {}

    def release(self, prompt: str) -> None:
        self._gate(prompt).set()

    def _gate(self, prompt: str) -> asyncio.Event:
        return self._gates.setdefault(prompt, asyncio.Event())

    async def script(self, agent: FakeClient, prompt: str) -> None:
        self.started.append(prompt)
        agent.send(init(agent.transcript_id))
        agent.total_cost_usd += 0.02
        await self._gate(prompt).wait()
        agent.send(*text(f"msg-{agent.turns}", ["done"]))
        agent.finish(0.0)


class Metrics:
    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meter = MeterProvider(metric_readers=[self.reader]).get_meter("corral.runtime")

    def value(self, name: str) -> float:
        """A counter's or gauge's value; a histogram's count."""
        data = self.reader.get_metrics_data()
        total = 0.0
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            count = isinstance(point, HistogramDataPoint)
                            total += point.count if count else point.value  # type: ignore[union-attr]
        return total


async def status(runtime: Runtime) -> Any:
    reply = await runtime.stub.GetRuntimeStatus(
        pb.GetRuntimeStatusRequest(), metadata=runtime.metadata()
    )
    return reply.status


async def until(check: Callable[[], Any], within: float = 10.0) -> None:
    """Bounded poll of a condition (the runtime's own state, read over its API)."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.01)


def retry_after(error: grpc.aio.AioRpcError) -> float | None:
    status_ = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status_.details if status_ else []:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return None


async def arrive(runtime: Runtime, prompt: str, session: str | None = None) -> Turn:
    """A turn whose first event has come: it runs (turn_started) or it waits."""
    turn = Turn(runtime, runtime.request(session or new_session(), prompt))
    response = await turn.call.read()
    assert response is not grpc.aio.EOF
    turn.events.append(response.event)
    return turn


def waited(turn: Turn) -> float:
    return float(turn.find("turn_started")[0].wait_duration.ToNanoseconds() / 1e9)


async def test_turns_beyond_the_pool_wait_and_start_in_order_of_arrival(
    make_runtime: Callable[..., Any],
) -> None:
    held, metrics = Held(), Metrics()
    sdk = FakeSdk(held.script)
    runtime: Runtime = await make_runtime(
        sdk=sdk, runtime_pool_size=2, runtime_pool_queue_size=4, meter=metrics.meter
    )
    prompts = [f"turn-{i}" for i in range(6)]  # three times the pool
    turns = [await arrive(runtime, prompt) for prompt in prompts]
    assert [payloads(t.events) for t in turns[:2]] == [["turn_started"]] * 2
    for position, turn in enumerate(turns[2:], start=1):
        assert payloads(turn.events) == ["waiting_for_agent"]
        assert turn.events[0].waiting_for_agent.position == position
        assert turn.events[0].ordinal == 1
    now = await status(runtime)
    assert (now.running_turns, now.waiting_turns, now.max_waiting_turns) == (2, 4, 4)
    assert (now.live_processes, now.busy_processes) == (2, 2)
    assert metrics.value("corral.runtime.pool.waiting") == 4

    # The queue is full: the next turn is refused at once, and told when to try again.
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await runtime.turn(new_session(), "one too many")
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(full.value) == "POOL_EXHAUSTED"
    assert retry_after(full.value) == 1.0
    assert metrics.value("corral.runtime.pool.exhausted") == 1

    # Whichever process frees up goes to the turn that has waited longest.
    for finished, starts in ((1, 2), (0, 3), (3, 4), (2, 5)):
        held.release(prompts[finished])
        await turns[starts].until("turn_started")
        assert held.started == prompts[: starts + 1]
    for prompt in prompts[4:]:
        held.release(prompt)
    for turn in turns:
        events = await turn.rest()
        assert events[-1].turn_result.status == SUCCEEDED
        assert events[-1].turn_result.usage.cost_usd_micros == 20_000
        assert [e.ordinal for e in events] == list(range(1, len(events) + 1))
    assert held.started == prompts
    assert [waited(t) for t in turns[:2]] == [0.0, 0.0]
    assert all(waited(t) > 0 for t in turns[2:])
    assert all(payloads(t.events)[:2] == ["waiting_for_agent", "turn_started"] for t in turns[2:])
    assert metrics.value("corral.runtime.pool.wait") == 6  # one wait recorded per turn
    assert metrics.value("corral.runtime.pool.waiting") == 0
    assert (await status(runtime)).waiting_turns == 0

    # The session service keeps both in the session's history.
    waiting = from_runtime(turns[2].events[0])
    started = from_runtime(turns[2].events[1])
    assert waiting is not None and waiting.waiting_for_agent.position == 1
    assert started is not None and started.turn_started.wait_duration.ToNanoseconds() > 0


async def test_a_waiting_turn_leaves_the_queue_when_its_caller_goes_or_it_is_interrupted(
    make_runtime: Callable[..., Any],
) -> None:
    held = Held()
    runtime: Runtime = await make_runtime(sdk=FakeSdk(held.script), runtime_pool_size=1)
    running = await arrive(runtime, "running")
    gone = await arrive(runtime, "caller goes away")
    stopped = await arrive(runtime, "interrupted")
    patient = await arrive(runtime, "patient")
    assert (await status(runtime)).waiting_turns == 3

    gone.call.cancel()

    async def two_waiting() -> bool:
        return bool((await status(runtime)).waiting_turns == 2)

    await until(two_waiting)

    await runtime.stub.InterruptTurn(
        pb.InterruptTurnRequest(session=stopped.request.session, turn_id=stopped.request.turn_id),
        metadata=runtime.metadata(),
    )
    events = await stopped.rest()
    assert payloads(events) == ["waiting_for_agent", "turn_result"]
    result = events[-1].turn_result
    assert (result.status, result.error.reason) == (INTERRUPTED, "INTERRUPTED")
    assert result.usage.cost_usd_micros == 0
    assert (await status(runtime)).waiting_turns == 1

    # The session whose caller left is free: its next turn queues behind the patient one.
    again = await arrive(runtime, "back again", session=gone.request.session.split("/")[1])
    assert again.events[0].waiting_for_agent.position == 2

    held.release("running")
    await patient.until("turn_started")
    held.release("patient")
    await again.until("turn_started")
    held.release("back again")
    for turn in (running, patient, again):
        assert (await turn.rest())[-1].turn_result.status == SUCCEEDED
    assert held.started == ["running", "patient", "back again"]
    now = await status(runtime)
    assert (now.running_turns, now.waiting_turns) == (0, 0)


async def test_a_process_that_cannot_start_gives_its_slot_to_the_next_waiting_turn(
    make_runtime: Callable[..., Any],
) -> None:
    held = Held()
    sdk = FakeSdk(held.script)
    runtime: Runtime = await make_runtime(sdk=sdk, runtime_pool_size=1)
    running = await arrive(runtime, "running")
    broken_session = new_session()
    sdk.broken.add(broken_session)
    broken = await arrive(runtime, "broken", session=broken_session)
    after = await arrive(runtime, "after")
    assert after.events[0].waiting_for_agent.position == 2

    held.release("running")
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await broken.rest()
    assert (failed.value.code(), error_reason(failed.value)) == (
        grpc.StatusCode.UNAVAILABLE,
        "PROCESS_CRASHED",
    )
    assert payloads(broken.events) == ["waiting_for_agent"]
    await after.until("turn_started")
    held.release("after")
    assert (await after.rest())[-1].turn_result.status == SUCCEEDED
    assert (await running.rest())[-1].turn_result.status == SUCCEEDED
    now = await status(runtime)
    assert (now.live_processes, now.running_turns, now.waiting_turns) == (1, 0, 0)


async def test_a_graceful_stop_reports_what_running_turns_cost_and_ends_waiting_ones(
    make_runtime: Callable[..., Any],
) -> None:
    held = Held()
    runtime: Runtime = await make_runtime(sdk=FakeSdk(held.script), runtime_pool_size=1)
    running = await arrive(runtime, "running")
    waiting = await arrive(runtime, "waiting")

    async def refused() -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await waiting.rest()
        return error.value

    _, events, error = await asyncio.gather(runtime.app.stop(5), running.rest(), refused())

    result = events[-1].turn_result
    assert (result.status, result.error.reason) == (INTERRUPTED, "INTERRUPTED")
    assert result.usage.cost_usd_micros == 20_000  # what it spent before the stop
    assert (error.code(), error_reason(error)) == (grpc.StatusCode.UNAVAILABLE, "DRAINING")
    assert payloads(waiting.events) == ["waiting_for_agent"]
    assert held.started == ["running"]
    assert runtime.sdk is not None and all(c.disconnected for c in runtime.sdk.clients)
    # Whoever reaches the stopped replica's service is sent elsewhere.
    assert runtime.service.status().draining
    with pytest.raises(Unavailable) as draining:
        await anext(runtime.service.run_turn(ALICE, turn_request(runtime.new_session())))
    assert draining.value.reason == "DRAINING"


async def test_real_agents_wait_for_a_process_in_order_of_arrival(
    make_runtime: Callable[..., Any],
) -> None:
    """Six turns on a pool of two Claude CLI processes, each holding its process on a
    permission request until the test answers it."""
    runtime: Runtime = await make_runtime(runtime_pool_size=2)
    turns: list[Turn] = []
    asked = {}
    for i in range(6):  # each arrives once the one before has its first event
        turn = Turn(runtime, runtime.request(new_session(), write_file(f"f{i}.txt")))
        turns.append(turn)
        if i < 2:
            asked[i] = (await turn.until("permission_request")).permission_request
        else:
            first = await turn.until("waiting_for_agent")
            assert first.waiting_for_agent.position == i - 1
    now = await status(runtime)
    assert (now.running_turns, now.waiting_turns, now.live_processes) == (2, 4, 2)
    assert len(cli_processes()) == 2

    # Answer the second turn first: its process goes to the third, and so on in order.
    for finished, starts in ((1, 2), (0, 3), (2, 4), (3, 5), (4, None), (5, None)):
        await turns[finished].decide(asked.pop(finished).id, ALLOW)
        assert (await turns[finished].rest())[-1].turn_result.status == SUCCEEDED
        if starts is not None:
            asked[starts] = (await turns[starts].until("permission_request")).permission_request
            assert all(payloads(t.events) == ["waiting_for_agent"] for t in turns[starts + 1 :])
        assert len(cli_processes()) <= 2
    for turn in turns[2:]:
        assert payloads(turn.events)[:2] == ["waiting_for_agent", "turn_started"]
        assert waited(turn) > 0
        assert turn.find("turn_started")[0].process_started
