"""What the session service needs from the outside, as ports: its unit of work (adapters in
``repository.py``), the runtime, storage and identity (adapters in ``adapters.py``).

Ports speak Python: an adapter turns its transport's failures into the categories of
:mod:`corral.libs.errors` before they reach the service layer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from google.protobuf import struct_pb2

from corral.libs.idempotency import IdempotencyStore
from corral.libs.listing import Condition, Page
from corral.libs.outbox import OutboxUnitOfWork
from corral.runtime.v1 import agent_options_pb2 as runtime_options
from corral.runtime.v1 import runtime_event_pb2 as rt
from corral.services.session.domain import (
    AgentPolicyRecord,
    Session,
    StoredEvent,
    Turn,
    TurnState,
    Usage,
)

# -- the unit of work ---------------------------------------------------------------------------


class Sessions(Protocol):
    async def add(self, session: Session) -> None: ...

    async def get(self, session_id: str, *, for_update: bool = False) -> Session | None: ...

    async def save(self, session: Session) -> None: ...

    async def delete(self, session_id: str) -> None: ...

    async def list(
        self, conditions: Sequence[Condition], *, order: str, descending: bool, page: Page
    ) -> list[Session]:
        """One page (with one row to spare) in (``order``, id) order."""
        ...

    async def count(self, conditions: Sequence[Condition]) -> int: ...


class Turns(Protocol):
    async def add(self, turn: Turn) -> None: ...

    async def save(self, turn: Turn) -> None: ...

    async def get(self, session_id: str, turn_id: str) -> Turn | None: ...

    async def in_state(self, session_id: str, *states: TurnState) -> list[Turn]: ...

    async def renew_leases(self, driver: str, turn_ids: Sequence[str], at: datetime) -> None: ...

    async def orphaned_sessions(self, lease_before: datetime, driver: str) -> list[str]: ...

    async def list(self, session_id: str, page: Page) -> list[Turn]:
        """One page (with one row to spare) in turn order."""
        ...


class Events(Protocol):
    async def reserve(self, session_id: str, count: int) -> int: ...

    async def insert(self, session_id: str, events: Sequence[StoredEvent]) -> None: ...

    async def read(
        self, session_id: str, *, after: int, limit: int, until: int | None = None
    ) -> list[StoredEvent]: ...

    async def page(
        self,
        session_id: str,
        *,
        after: int,
        types: tuple[frozenset[str], bool] | None,
        turn_id: str | None,
        page: Page,
    ) -> list[StoredEvent]:
        """One page of history (with one row to spare); ``types`` = (names, include)."""
        ...

    async def last_sequence(self, session_id: str) -> int: ...


class Permissions(Protocol):
    async def add(self, session_id: str, request_id: str, turn_id: str, payload: bytes) -> None: ...

    async def resolve(self, session_id: str, request_id: str) -> None: ...

    async def resolve_turn(self, session_id: str, turn_id: str) -> None: ...

    async def pending(self, session_id: str) -> list[tuple[str, str, bytes]]: ...


class Policies(Protocol):
    async def get(self, organization: str) -> AgentPolicyRecord | None: ...

    async def save(self, policy: AgentPolicyRecord) -> None: ...


class UnitOfWork(OutboxUnitOfWork, Protocol):
    """One transaction: ``async with uow: ...; await uow.commit()``; no commit, no change
    (the kit's outbox unit of work, with its ``outbox`` store). ``idempotency.put`` raises the
    kit's ``RequestRaced`` when the key is taken."""

    @property
    def sessions(self) -> Sessions: ...

    @property
    def turns(self) -> Turns: ...

    @property
    def events(self) -> Events: ...

    @property
    def permissions(self) -> Permissions: ...

    @property
    def policies(self) -> Policies: ...

    @property
    def idempotency(self) -> IdempotencyStore: ...


# -- other services -------------------------------------------------------------------------------


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
    """The agent-runtime service. Failures arrive as :mod:`corral.libs.errors` categories."""

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


class WorkspaceStore(Protocol):
    """The storage service's workspaces (``workspaces/{session id}``), called as this service.
    Failures arrive as :mod:`corral.libs.errors` categories in this service's terms: a full
    storage quota as ResourceExhausted (QUOTA_EXCEEDED, its QuotaFailure kept), anything that
    keeps storage from answering as Unavailable (WORKSPACE_UNAVAILABLE)."""

    async def create(self, *, organization: str, session: str, owner: str, request_id: str) -> str:
        """Make the session's empty workspace, on ``owner``'s quota; returns its name."""
        ...

    async def clone(self, source: str, *, session: str, owner: str, request_id: str) -> str:
        """Copy the workspace ``source`` (a name) for the forked ``session``; returns the
        copy's name. NotFound (WORKSPACE_NOT_FOUND) when ``source`` does not exist."""
        ...

    async def delete(self, workspace: str) -> None:
        """Delete the workspace and its files; one that does not exist counts as deleted."""
        ...


class UsageLedger(Protocol):
    """Identity's usage ledger: reserve before a turn, settle with what it used, release."""

    async def reserve(self, *, organization: str, user: str, request_id: str, token: str) -> str:
        """Returns the reservation's name; raises ResourceExhausted when over a quota."""
        ...

    async def settle(self, reservation: str, usage: Usage, *, token: str) -> None: ...

    async def release(self, reservation: str, *, token: str) -> None: ...

    async def reserve_budget(
        self, *, organization: str, user: str, cost_usd_micros: int, request_id: str, token: str
    ) -> str:
        """Hold a running turn's spending cap against the cost budget (released like any
        reservation); raises ResourceExhausted when that much is not left."""
        ...

    async def remaining_budget(self, *, organization: str, user: str, token: str) -> int | None:
        """What is left of the cost budget, in micro-USD; None when it cannot be read."""
        ...
