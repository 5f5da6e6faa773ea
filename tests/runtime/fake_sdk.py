"""A scripted stand-in for the Claude Agent SDK, behind the runtime's port (``sdk``).

A test gives :class:`FakeSdk` a script: ``async def script(agent, prompt)`` that plays one turn
of the agent, sending the SDK messages the CLI would (:meth:`FakeClient.send`) and asking the
tool gate what the CLI would ask. Like the CLI, an interrupt cancels what the script is doing
and ends the turn with an ``error_during_execution`` result, unless the client is told to
ignore interrupts.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from claude_agent_sdk import (
    AssistantMessage,
    ResultMessage,
    StreamEvent,
    SystemMessage,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    UserMessage,
)

from corral.services.runtime.domain import ProcessFailed
from corral.services.runtime.sdk import AgentProcessLost, AgentSpec, ToolGate

Script = Callable[["FakeClient", str], Awaitable[None]]


def init(transcript_id: str, *, mcp_servers: list[dict[str, str]] | None = None) -> SystemMessage:
    return SystemMessage(
        "init",
        {
            "session_id": transcript_id,
            "model": "claude-fake",
            "tools": ["Bash", "Write"],
            "mcp_servers": mcp_servers or [],
        },
    )


def stream(event: dict[str, Any], parent: str | None = None) -> StreamEvent:
    return StreamEvent(uuid.uuid4().hex, "", event, parent)


def result(
    transcript_id: str, total_cost_usd: float, *, subtype: str = "success", text: str = ""
) -> ResultMessage:
    return ResultMessage(
        subtype=subtype,
        duration_ms=1200,
        duration_api_ms=900,
        is_error=subtype != "success",
        num_turns=1,
        session_id=transcript_id,
        total_cost_usd=total_cost_usd,
        usage={"input_tokens": 10, "output_tokens": 5},
        result=text,
    )


def text(message_id: str, words: list[str]) -> list[Any]:
    """A streamed text block: its deltas, then the block."""
    return [
        stream({"type": "message_start", "message": {"id": message_id}}),
        *(stream(_delta(word)) for word in words),
        AssistantMessage([TextBlock("".join(words))], "claude-fake", message_id=message_id),
    ]


def _delta(text: str) -> dict[str, Any]:
    delta = {"type": "text_delta", "text": text}
    return {"type": "content_block_delta", "index": 0, "delta": delta}


def tool_call(message_id: str, tool_use_id: str, name: str, output: str) -> list[Any]:
    return [
        AssistantMessage(
            [ToolUseBlock(tool_use_id, name, {"a": 1})], "claude-fake", message_id=message_id
        ),
        UserMessage([ToolResultBlock(tool_use_id, output, False)]),
    ]


async def say_hello(agent: FakeClient, prompt: str) -> None:
    """The default script: one streamed sentence, 0.01 USD a turn."""
    agent.send(init(agent.transcript_id), *text(f"msg-{agent.turns}", ["hello ", "there"]))
    agent.finish(0.01)


class FakeClient:
    def __init__(self, sdk: FakeSdk, spec: AgentSpec, gate: ToolGate) -> None:
        self.sdk = sdk
        self.spec = spec
        self.gate = gate
        self.transcript_id = spec.new_transcript_id or spec.resume
        self.total_cost_usd = 0.0
        self.turns = 0
        self.prompts: list[str] = []
        self.interrupts = 0
        self.ignore_interrupts = False
        self.disconnected = False
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._playing: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return None

    def send(self, *messages: Any) -> None:
        for message in messages:
            self._inbox.put_nowait(message)

    def finish(self, cost_usd: float, *, subtype: str = "success") -> None:
        """End the turn with a result; the SDK reports the cost cumulatively."""
        self.total_cost_usd += cost_usd
        self.send(result(self.transcript_id, self.total_cost_usd, subtype=subtype))

    def crash(self) -> None:
        self.send(AgentProcessLost("the agent process exited unexpectedly (exit code 137)"))

    async def query(self, prompt: str) -> None:
        self.turns += 1
        self.prompts.append(prompt)
        self._playing = asyncio.create_task(self.sdk.script(self, prompt))

    async def receive_messages(self) -> AsyncIterator[Any]:
        while not self.disconnected:
            message = await self._inbox.get()
            if isinstance(message, BaseException):
                raise message
            if message is None:
                return
            yield message

    async def interrupt(self) -> None:
        self.interrupts += 1
        if self.ignore_interrupts:
            return
        if self._playing is not None and not self._playing.done():
            self._playing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._playing
        self.finish(0.0, subtype="error_during_execution")

    async def disconnect(self) -> None:
        self.disconnected = True
        if self._playing is not None:
            self._playing.cancel()
        self._inbox.put_nowait(None)


class FakeSdk:
    sdk_version = "0.0.0-fake"
    cli_version = "fake"

    def __init__(self, script: Script = say_hello) -> None:
        self.script = script
        self.started = False
        self.clients: list[FakeClient] = []
        self.broken: set[str] = set()  # sessions whose process cannot start

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.started = False

    async def connect(self, spec: AgentSpec, gate: ToolGate) -> FakeClient:
        assert self.started, "the runtime connected before it started its SDK"
        if spec.session_id in self.broken:
            raise ProcessFailed("the agent process could not be started")
        client = FakeClient(self, spec, gate)
        self.clients.append(client)
        return client
