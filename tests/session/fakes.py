"""Fakes for the session service's ports: a runtime a test drives event by event, a ledger
with limits, an audit log that remembers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import struct_pb2

from corral.libs.audit import AuditEntry
from corral.libs.errors import NotFound, QuotaViolation, ResourceExhausted, Unavailable
from corral.runtime.v1 import runtime_event_pb2 as rt
from corral.services.session.domain import Usage
from corral.services.session.ports import TurnRequest


def event(turn_id: str, **payload: Any) -> rt.RuntimeEvent:
    """``event(t, text_delta={"text": "hi"})`` -> a RuntimeEvent with that payload."""
    out = rt.RuntimeEvent(turn_id=turn_id)
    out.create_time.GetCurrentTime()
    for kind, fields in payload.items():
        target = getattr(out, kind)
        target.SetInParent()
        for key, value in fields.items():
            if isinstance(getattr(target, key), struct_pb2.Struct):
                getattr(target, key).update(value)
            elif hasattr(getattr(target, key), "CopyFrom") and not isinstance(value, (str, int)):
                getattr(target, key).CopyFrom(value)
            else:
                setattr(target, key, value)
    return out


def result(
    turn_id: str,
    status: str = "SUCCEEDED",
    *,
    transcript: str = "tx-1",
    tokens: int = 10,
    cost: int = 500,
) -> rt.RuntimeEvent:
    out = event(
        turn_id,
        turn_result={
            "status": rt.TurnResult.Status.Value(f"STATUS_{status}"),
            "transcript_id": transcript,
        },
    )
    out.turn_result.usage.input_tokens = tokens
    out.turn_result.usage.output_tokens = tokens
    out.turn_result.usage.cost_usd_micros = cost
    return out


class Crash(Exception):
    """Put in a fake turn's queue to make the runtime stream fail like a dead runtime."""


def runtime_died() -> Unavailable:
    """What the runtime adapter raises when the runtime's stream breaks off."""
    return Unavailable("the agent runtime failed: UNAVAILABLE", reason="RUNTIME_UNAVAILABLE")


@dataclass
class FakeTurn:
    request: TurnRequest
    token: str
    queue: asyncio.Queue[rt.RuntimeEvent | Exception | None] = field(default_factory=asyncio.Queue)

    @property
    def id(self) -> str:
        return self.request.turn_id

    def emit(self, **payload: Any) -> None:
        self.queue.put_nowait(event(self.id, **payload))

    def start(self) -> None:
        """The agent's first event (the runtime sends it first, or once a busy pool frees)."""
        self.emit(
            turn_started={
                "model": "offline",
                "transcript_id": self.request.resume_transcript_id or "tx-1",
            }
        )

    def text(self, *chunks: str) -> None:
        for chunk in chunks:
            self.emit(text_delta={"text": chunk, "message_id": "m1"})
        self.emit(text_block={"text": "".join(chunks), "message_id": "m1"})

    def finish(self, status: str = "SUCCEEDED", **kw: Any) -> None:
        self.queue.put_nowait(result(self.id, status, **kw))
        self.queue.put_nowait(None)

    def crash(self) -> None:
        self.queue.put_nowait(Crash())


class FakeRuntime:
    """A runtime whose turns a test plays by hand (or automatically with ``auto_reply``)."""

    def __init__(self) -> None:
        self.turns: list[FakeTurn] = []
        self._started: asyncio.Queue[FakeTurn] = asyncio.Queue()
        self.interrupted: list[str] = []
        self.decisions: list[tuple[str, bool, str]] = []
        self.released: list[tuple[str, bool]] = []
        self.auto_reply: str | None = None
        # Every agent process busy: a turn opens with waiting_for_agent, and its test calls
        # ``start`` when one frees.
        self.agents_busy = False

    async def next_turn(self, within: float = 5.0) -> FakeTurn:
        return await asyncio.wait_for(self._started.get(), within)

    async def run_turn(self, request: TurnRequest, *, token: str) -> AsyncIterator[rt.RuntimeEvent]:
        turn = FakeTurn(request, token)
        self.turns.append(turn)
        if self.agents_busy:
            turn.emit(waiting_for_agent={"position": 1})
        else:
            turn.start()
        if self.auto_reply is not None:
            turn.text(self.auto_reply)
            turn.finish(transcript=request.resume_transcript_id or "tx-1")
        self._started.put_nowait(turn)
        while True:
            item = await turn.queue.get()
            if item is None:
                return
            if isinstance(item, Crash):
                raise runtime_died()
            if isinstance(item, Exception):
                raise item
            yield item

    def _turn(self, turn_id: str) -> FakeTurn:
        return next(t for t in self.turns if t.id == turn_id)

    async def interrupt(self, session: str, turn_id: str, *, token: str) -> None:
        self.interrupted.append(turn_id)
        self._turn(turn_id).finish("INTERRUPTED")

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
    ) -> None:
        self.decisions.append((request_id, allow, decided_by))
        behaviour = rt.PERMISSION_BEHAVIOR_ALLOW if allow else rt.PERMISSION_BEHAVIOR_DENY
        self._turn(turn_id).emit(
            permission_decision={
                "permission_request_id": request_id,
                "behavior": behaviour,
                "source": rt.PermissionDecision.SOURCE_USER,
                "decided_by": decided_by,
                "message": message,
            }
        )

    async def release(self, session: str, *, delete_transcript: bool, token: str) -> None:
        self.released.append((session, delete_transcript))


class FakeLedger:
    """Concurrent-turn limit per organisation; records settlements. Like identity, a settle
    or release retried after it went through changes nothing; ``down`` makes every settle and
    release fail as an unreachable identity would (``attempts`` counts them)."""

    def __init__(self, limit: int = 100, budget: int | None = None) -> None:
        self.limit = limit
        self.budget = budget  # micro-USD left to hold; None: unlimited
        self.held: dict[str, str] = {}
        self.budget_holds: dict[str, int] = {}  # running turns' caps
        self.settled: list[tuple[str, Usage]] = []
        self.released: list[str] = []
        self.down = False
        self.attempts = 0
        self.tokens: list[str] = []  # the token each settle and release came with
        self._n = 0
        self._changed = asyncio.Condition()

    def _call(self, token: str) -> None:
        self.attempts += 1
        self.tokens.append(token)
        if self.down:
            raise Unavailable("identity is down", reason="DEPENDENCY_FAILED")

    async def wait_settled(self, count: int = 1, within: float = 5.0) -> None:
        """Until ``count`` reservations were settled (a turn settles after its result event)."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: len(self.settled) >= count)

    async def wait(self, done: Callable[[], bool], within: float = 5.0) -> None:
        """Until ``done()`` holds after a settle or release."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(done)

    async def reserve(self, *, organization: str, user: str, request_id: str, token: str) -> str:
        if sum(1 for org in self.held.values() if org == organization) >= self.limit:
            raise ResourceExhausted(
                "the organisation's concurrent session quota is used up",
                reason="QUOTA_EXCEEDED",
                violations=[
                    QuotaViolation(organization, "max_concurrent_sessions", "limit reached")
                ],
            )
        self._n += 1
        name = f"{organization}/usageReservations/r{self._n}"
        self.held[name] = organization
        return name

    async def settle(self, reservation: str, usage: Usage, *, token: str) -> None:
        self._call(token)
        if all(name != reservation for name, _ in self.settled):
            self.settled.append((reservation, usage))
        await self.release(reservation, token=token)

    async def reserve_budget(
        self, *, organization: str, user: str, cost_usd_micros: int, request_id: str, token: str
    ) -> str:
        left = await self.remaining_budget(organization=organization, user=user, token=token)
        if left is not None and cost_usd_micros > left:
            raise ResourceExhausted(
                "the organisation's cost budget is used up",
                reason="QUOTA_EXCEEDED",
                violations=[QuotaViolation(organization, "max_cost_usd_micros", "limit reached")],
            )
        self._n += 1
        name = f"{organization}/usageReservations/b{self._n}"
        self.budget_holds[name] = cost_usd_micros
        return name

    async def remaining_budget(self, *, organization: str, user: str, token: str) -> int | None:
        if self.budget is None:
            return None
        return self.budget - sum(self.budget_holds.values())

    async def release(self, reservation: str, *, token: str) -> None:
        self._call(token)
        if reservation in self.held or reservation in self.budget_holds:
            self.released.append(reservation)
        self.held.pop(reservation, None)
        self.budget_holds.pop(reservation, None)
        async with self._changed:
            self._changed.notify_all()


class FakeWorkspaces:
    """Storage's workspaces at the session's port: which exist (name -> owner), with the
    port's errors: ``down`` is an outage (WORKSPACE_UNAVAILABLE, also for deletes, which then
    wait in the outbox), ``full`` a storage quota with no room (QUOTA_EXCEEDED); ``lost``
    makes the next create or clone happen but its answer get lost (WORKSPACE_UNAVAILABLE);
    with ``gate`` set, creates wait for it (``waiting`` counts them)."""

    def __init__(self) -> None:
        self.workspaces: dict[str, str] = {}
        self.made: list[str] = []  # every workspace made, in order
        self.copied: dict[str, str] = {}  # copy -> source
        self.deleted: list[str] = []
        self.down = False
        self.full = False
        self.lost = 0
        self.gate: asyncio.Event | None = None
        self.waiting = 0
        self._changed = asyncio.Condition()

    def _check(self, *, quota: bool) -> None:
        if self.down:
            raise Unavailable("storage is down", reason="WORKSPACE_UNAVAILABLE")
        if quota and self.full:
            raise ResourceExhausted(
                "the storage quota has no room for the workspace",
                reason="QUOTA_EXCEEDED",
                violations=[QuotaViolation("organizations/acme", "storage_bytes", "used up")],
            )

    def _made(self, session: str, owner: str) -> str:
        name = "workspaces/" + session.removeprefix("sessions/")
        self.workspaces[name] = owner
        self.made.append(name)
        if self.lost > 0:
            self.lost -= 1
            raise Unavailable("the answer was lost", reason="WORKSPACE_UNAVAILABLE")
        return name

    async def create(self, *, organization: str, session: str, owner: str, request_id: str) -> str:
        self._check(quota=True)
        if self.gate is not None:
            self.waiting += 1
            async with self._changed:
                self._changed.notify_all()
            await self.gate.wait()
        return self._made(session, owner)

    async def clone(self, source: str, *, session: str, owner: str, request_id: str) -> str:
        self._check(quota=True)
        if source not in self.workspaces:
            raise NotFound(f"{source} does not exist", reason="WORKSPACE_NOT_FOUND")
        name = self._made(session, owner)
        self.copied[name] = source
        return name

    async def delete(self, workspace: str) -> None:
        self._check(quota=False)
        if self.workspaces.pop(workspace, None) is not None:
            self.deleted.append(workspace)
        async with self._changed:
            self._changed.notify_all()

    async def wait(self, done: Callable[[], bool], within: float = 10.0) -> None:
        """Until ``done()`` holds after a create waits or a delete."""
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(done)


class FakeAudit:
    """Identity's audit log as the outbox writes to it (``write``): it remembers each entry
    (as a dict of its fields) and the token it came with; ``fail`` makes the next N writes
    fail as an unavailable identity would. Entries are stored once per id, as identity does
    with WriteAuditEvents' request_id."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.tokens: list[str] = []
        self.attempts = 0
        self.fail = 0
        self._changed = asyncio.Condition()

    async def write(self, entry: AuditEntry, *, token: str) -> None:
        self.attempts += 1
        if self.fail > 0:
            self.fail -= 1
            raise Unavailable("identity is down", reason="DEPENDENCY_FAILED")
        if all(r["id"] != entry.id for r in self.records):
            self.records.append(dict(vars(entry)))
            self.tokens.append(token)
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(
        self, action: str, count: int = 1, within: float = 5.0
    ) -> list[dict[str, Any]]:
        """The records of ``action``, once there are ``count`` of them."""

        def found() -> list[dict[str, Any]]:
            return [r for r in self.records if r["action"] == action]

        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: len(found()) >= count)
        return found()
