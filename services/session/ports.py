"""What the session service needs from the outside, as ports (adapters in ``adapters.py``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from google.protobuf import struct_pb2

from corral.runtime.v1 import agent_options_pb2 as runtime_options
from corral.runtime.v1 import runtime_event_pb2 as rt
from corral.services.session.domain import Usage


@dataclass(frozen=True)
class TurnRequest:
    session: str
    turn_id: str
    organization: str
    actor: str
    workspace: str
    options: runtime_options.AgentOptions
    prompt: str
    resume_transcript_id: str
    fork_transcript: bool


class Runtime(Protocol):
    """The agent-runtime service."""

    def run_turn(self, request: TurnRequest, *, token: str) -> AsyncIterator[rt.RuntimeEvent]: ...

    async def interrupt(self, session: str, turn_id: str, *, token: str) -> None: ...

    async def decide(
        self,
        session: str,
        turn_id: str,
        request_id: str,
        *,
        allow: bool,
        message: str,
        updated_input: struct_pb2.Struct | None,
        decided_by: str,
        token: str,
    ) -> None: ...

    async def release(self, session: str, *, delete_transcript: bool, token: str) -> None: ...


class UsageLedger(Protocol):
    """Identity's usage ledger: reserve before a turn, settle with what it used, release."""

    async def reserve(self, *, organization: str, user: str, request_id: str, token: str) -> str:
        """Returns the reservation's name; raises ResourceExhausted when over a quota."""
        ...

    async def settle(self, reservation: str, usage: Usage, *, token: str) -> None: ...

    async def release(self, reservation: str, *, token: str) -> None: ...


class AuditLog(Protocol):
    async def record(
        self,
        *,
        actor: str,
        organization: str,
        action: str,
        resource: str,
        metadata: dict[str, str],
        token: str,
        outcome: str = "SUCCEEDED",  # SUCCEEDED, DENIED or FAILED
    ) -> None: ...
