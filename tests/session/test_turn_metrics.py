"""The session's time to first event, as its metrics row promises: from SendMessage accepting a
turn to the agent's first event (turn_started). The runtime's waiting_for_agent (every agent
process busy) is not it: that wait is the runtime's own measure."""

from __future__ import annotations

from typing import Any

import pytest

from corral.session.v1 import session_service_pb2 as pb
from tests.session.conftest import Stack
from tests.session.test_session_stream import collect, create, send


class Recorder:
    """The histogram as the runner records into it."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def record(self, value: float, attributes: Any = None) -> None:
        self.values.append(value)


async def test_time_to_first_event_is_measured_to_the_agent_not_to_the_runtimes_queue(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder()
    monkeypatch.setattr(stack.service.metrics, "time_to_first_event", recorder)
    stack.runtime.agents_busy = True
    session = await create(stack)

    await send(stack, session.name, "first")
    waiting = await stack.runtime.next_turn()
    seen = await collect(stack, session.name, until="waiting_for_agent")
    assert seen[-1].waiting_for_agent.position == 1  # in the log: the runner has read it
    assert recorder.values == []  # the agent has not started

    waiting.start()
    waiting.text("hi")
    await collect(stack, session.name, until="text_block")
    assert len(recorder.values) == 1 and recorder.values[0] >= 0
    waiting.finish()
    await collect(stack, session.name, until="turn_result")

    # A turn interrupted while it waits for an agent never had one: nothing is measured.
    await send(stack, session.name, "second")
    await stack.runtime.next_turn()
    await collect(stack, session.name, until="waiting_for_agent", count=2)
    await stack.stub.InterruptTurn(
        pb.InterruptTurnRequest(session=session.name), metadata=stack.auth()
    )
    await collect(stack, session.name, until="turn_result", count=2)
    assert len(recorder.values) == 1
