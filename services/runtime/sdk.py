"""The port the runtime drives agents through: start a process, send a prompt, read its messages.

The turn logic talks to :class:`AgentSdk` and :class:`AgentClient` only; ``claude`` adapts the
Claude Agent SDK to them, and the service-layer tests plug in a scripted fake. The messages a
client yields are the SDK's own message dataclasses (``SystemMessage``, ``StreamEvent``,
``AssistantMessage``, ``UserMessage``, ``ResultMessage``): plain data, the vocabulary of the
stream, which ``events`` maps onto runtime events.

Tool permissions come back through a :class:`ToolGate`: the PreToolUse hook asks it for the
rule that decides a call, ``can_use_tool`` asks it for a person's decision.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from corral.runtime.v1 import agent_options_pb2 as options_pb
from corral.services.runtime.domain import Decision, RuleAction


@dataclass(frozen=True)
class AgentSpec:
    """Everything one agent process is started with."""

    session_id: str
    options: options_pb.AgentOptions
    model: str
    workspace: Path  # the working directory
    config_dir: Path  # CLAUDE_CONFIG_DIR: the session's transcripts
    tag: str  # marks every process it starts (see ``process.TAG_VARIABLE``)
    resume: str = ""  # the transcript to resume, if any
    new_transcript_id: str = ""  # the id of a new (or forked, with ``resume``) transcript


@dataclass(frozen=True)
class RuleVerdict:
    """What a permission rule said about a tool call, before the SDK's own permission mode."""

    action: RuleAction
    reason: str


class ToolGate(Protocol):
    """How the agent's tool calls are decided (the session's running turn answers)."""

    def rule_for(self, tool_name: str) -> RuleVerdict | None:
        """The PreToolUse hook: the rule that decides this call, None to leave it to the SDK."""
        ...

    async def ask(
        self, tool_name: str, tool_input: dict[str, Any], tool_use_id: str, reason: str
    ) -> Decision:
        """``can_use_tool``: wait for a decision. A DENY from an INTERRUPT stops the turn."""
        ...


class AgentProcessLost(Exception):
    """The agent process went away while a turn was reading from it."""


class AgentClient(Protocol):
    """One connected agent (one CLI process)."""

    @property
    def pid(self) -> int | None:
        """The process id, or None where it cannot be known (then it is not inspected)."""
        ...

    async def query(self, prompt: str) -> None: ...

    def receive_messages(self) -> AsyncIterator[Any]:
        """The SDK's messages, for as long as the process runs; :class:`AgentProcessLost` when
        it dies."""
        ...

    async def interrupt(self) -> None: ...

    async def disconnect(self) -> None: ...


class AgentSdk(Protocol):
    """Starts agent processes. ``connect`` raises ``TranscriptNotFound`` when the transcript to
    resume is unknown to the CLI and ``ProcessFailed`` when the process cannot start."""

    sdk_version: str
    cli_version: str

    async def start(self) -> None:
        """Prepare what every process needs (files on disk); called once, before ``connect``."""
        ...

    async def connect(self, spec: AgentSpec, gate: ToolGate) -> AgentClient: ...

    async def close(self) -> None:
        """After the last process stopped: end whatever ``start`` set going."""
        ...
