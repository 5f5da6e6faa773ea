"""The session use cases: sessions, turns, and the durable, resumable event stream.

Every event is written to the session's event log (sequence assigned once, in order, in the
same transaction as the state it reflects) and only then published on the hub. Watchers
replay the log after their cursor and tail the hub, skipping what they have and refilling any
gap from the log, so a watcher sees every event exactly once whichever replica it reaches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import struct_pb2
from google.rpc import code_pb2

from corral.libs.auth.caller import Caller
from corral.libs.errors import (
    Aborted,
    CorralError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from corral.libs.eventhub import EventHub, HubClosed, HubMessage, Lagged
from corral.libs.listing import Condition, Page, next_token
from corral.runtime.v1 import runtime_event_pb2 as rt
from corral.services.session import domain, events
from corral.services.session.domain import (
    AgentPolicyRecord,
    BusyStrategy,
    Session,
    SessionState,
    Turn,
    TurnState,
    Usage,
)
from corral.services.session.options import for_runtime, with_policy
from corral.services.session.ports import AuditLog, Runtime, TurnRequest, UsageLedger
from corral.services.session.repository import SessionUnitOfWork, StoredEvent
from corral.session.v1 import agent_options_pb2, agent_policy_pb2, event_pb2, session_pb2

log = logging.getLogger("corral.session")

REPLAY_PAGE = 500
BATCH_MAX = 256


def topic(session_id: str) -> str:
    return f"session:{session_id}"


def now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class EventFilter:
    """``type`` / ``turn_id`` conditions of a list or stream request."""

    include_types: frozenset[str] | None = None
    exclude_types: frozenset[str] = frozenset()
    turn_id: str | None = None

    @classmethod
    def from_conditions(cls, conditions: Sequence[Condition]) -> EventFilter:
        include: set[str] | None = None
        exclude: set[str] = set()
        turn_id = None
        for c in conditions:
            if c.column == "type" and c.op == "=":
                include = {c.value} if include is None else include & {c.value}
            elif c.column == "type" and c.op == "!=":
                exclude.add(c.value)
            elif c.column == "turn_id" and c.op == "=":
                turn_id = c.value
            else:
                raise InvalidArgument(
                    f"{c.column} {c.op} is not supported", reason="INVALID_FILTER"
                )
        return cls(None if include is None else frozenset(include), frozenset(exclude), turn_id)

    @property
    def empty(self) -> bool:
        return self.include_types is None and not self.exclude_types and self.turn_id is None

    def matches(self, kind: str, turn_id: str) -> bool:
        if kind == "heartbeat":
            return True
        if self.include_types is not None and kind not in self.include_types:
            return False
        if kind in self.exclude_types:
            return False
        return self.turn_id is None or self.turn_id == turn_id


@dataclass
class _LiveTurn:
    token: str
    actor: str


class SessionService:
    def __init__(
        self,
        uow: Callable[[], SessionUnitOfWork],
        hub: EventHub,
        runtime: Runtime,
        ledger: UsageLedger,
        audit: AuditLog,
        *,
        heartbeat_seconds: float = 15.0,
        lease_seconds: float = 30.0,
    ) -> None:
        self._uow = uow
        self._hub = hub
        self._runtime = runtime
        self._ledger = ledger
        self._audit = audit
        self._heartbeat = heartbeat_seconds
        self._locks: dict[str, asyncio.Lock] = {}
        self._drivers: dict[str, asyncio.Task[None]] = {}
        self._wake: set[str] = set()  # sessions given a turn since their driver last looked
        self._live: dict[str, _LiveTurn] = {}  # turn id -> the credentials it runs with
        # This process's turns carry its id and a lease it renews; a turn whose lease runs out
        # belongs to a process that died, and any replica's sweep ends it as FAILED.
        self._instance = uuid.uuid4().hex[:16]
        self._lease = timedelta(seconds=lease_seconds)
        self._keeper: asyncio.Task[None] | None = None

    # -- the event log -------------------------------------------------------------------------

    def _lock(self, session_id: str) -> asyncio.Lock:
        return self._locks.setdefault(session_id, asyncio.Lock())

    async def _append(
        self,
        session_id: str,
        turn_id: str,
        new_events: Sequence[event_pb2.SessionEvent],
        mutate: Callable[[SessionUnitOfWork, int], Awaitable[None]] | None = None,
    ) -> int:
        """Persist events (and ``mutate``'s changes) in one transaction, then publish them.
        Returns the first sequence assigned. One writer per session at a time in this process;
        across processes the log's row lock orders them and watchers refill any gap."""
        name = domain.SESSION_PREFIX + session_id
        async with self._lock(session_id):
            async with self._uow() as uow:
                first = (
                    await uow.events.reserve(session_id, max(len(new_events), 1))
                    if new_events
                    else 0
                )
                stored: list[StoredEvent] = []
                for offset, event in enumerate(new_events):
                    event.session = name
                    event.sequence = first + offset
                    if not event.turn_id:
                        event.turn_id = turn_id
                    if not event.HasField("create_time"):
                        event.create_time.GetCurrentTime()
                    stored.append(
                        StoredEvent(
                            event.sequence,
                            event.turn_id,
                            events.kind_of(event),
                            event.SerializeToString(),
                        )
                    )
                if stored:
                    await uow.events.insert(session_id, stored)
                if mutate is not None:
                    await mutate(uow, first)
                await uow.commit()
            if stored:
                try:
                    await self._hub.publish(
                        topic(session_id), [HubMessage(s.sequence, s.payload) for s in stored]
                    )
                except Exception:  # durable already: watchers find it in the log
                    log.warning(
                        "event publish failed", extra={"session": session_id}, exc_info=True
                    )
        return first

    @staticmethod
    def _state_event(state: SessionState, previous: SessionState) -> event_pb2.SessionEvent:
        event = event_pb2.SessionEvent()
        event.state_changed.state = session_pb2.Session.State.Value(f"STATE_{state.value}")
        event.state_changed.previous_state = session_pb2.Session.State.Value(
            f"STATE_{previous.value}"
        )
        return event

    # -- sessions ------------------------------------------------------------------------------

    async def create_session(
        self,
        caller: Caller,
        *,
        display_name: str,
        options: agent_options_pb2.AgentOptions,
        labels: dict[str, str],
        organization: str,
        request_id: str,
    ) -> Session:
        if not domain.can_create(caller):
            raise PermissionDenied("viewers cannot create sessions", reason="ROLE_READ_ONLY")
        org = organization if (organization and caller.is_superuser) else caller.organization
        if request_id:
            async with self._uow() as uow:
                existing = await uow.sessions.by_request_id(caller.subject, request_id)
            if existing is not None:
                return existing
        session_id = uuid.uuid4().hex
        stamp = now()
        session = Session(
            id=session_id,
            organization=org,
            owner=caller.subject,
            display_name=display_name or "Untitled session",
            agent_options=options.SerializeToString(),
            labels=labels,
            create_time=stamp,
            update_time=stamp,
            workspace=f"workspaces/{session_id}",
            request_id=request_id,
        )
        async with self._uow() as uow:
            await uow.sessions.add(session)
            await uow.commit()
        log.info("session created", extra={"session": session.name, "owner": caller.subject})
        return session

    async def get_session(self, caller: Caller, session_id: str) -> Session:
        async with self._uow() as uow:
            return domain.authorize_read(
                caller, await uow.sessions.get(session_id), domain.SESSION_PREFIX + session_id
            )

    async def pending_permissions(self, session_id: str) -> list[bytes]:
        async with self._uow() as uow:
            return [payload for _, _, payload in await uow.permissions.pending(session_id)]

    async def list_sessions(
        self,
        caller: Caller,
        conditions: list[Condition],
        *,
        order: str,
        descending: bool,
        page: Page,
    ) -> tuple[list[Session], str, int]:
        """Sessions the caller may see (own; the organisation's for admins and viewers; all
        for superusers), newest activity first by default. Returns (page, next token, total)."""
        scoped = list(conditions)
        if not caller.is_superuser:
            scoped.append(Condition("organization", "=", caller.organization))
            if not caller.has_role("admin", "viewer"):
                scoped.append(Condition("owner", "=", caller.subject))
        after = None
        if page.after is not None:
            value = page.after[0]
            if order.endswith("_time"):
                value = datetime.fromisoformat(str(value))
            after = (value, str(page.after[1]))
        async with self._uow() as uow:
            rows = await uow.sessions.list(
                scoped, order=order, descending=descending, after=after, limit=page.size + 1
            )
            total = await uow.sessions.count(scoped)
        more = len(rows) > page.size
        rows = rows[: page.size]
        last = None
        if more and rows:
            key = getattr(rows[-1], order)
            last = (key.isoformat() if isinstance(key, datetime) else key, rows[-1].id)
        return rows, next_token(page, last), total

    async def update_session(
        self,
        caller: Caller,
        session_id: str,
        *,
        etag: str,
        display_name: str | None,
        labels: dict[str, str] | None,
        options: agent_options_pb2.AgentOptions | None,
    ) -> Session:
        async with self._uow() as uow:
            session = domain.authorize_write(
                caller,
                await uow.sessions.get(session_id, for_update=True),
                domain.SESSION_PREFIX + session_id,
            )
            session.require_active()
            _check_etag(etag, session.etag, "session")
            if display_name is not None:
                session.display_name = display_name
            if labels is not None:
                session.labels = labels
            if options is not None:
                session.agent_options = options.SerializeToString()
            session.version += 1
            session.update_time = now()
            await uow.sessions.save(session)
            await uow.commit()
        return session

    async def archive_session(self, caller: Caller, session_id: str, *, etag: str) -> Session:
        name = domain.SESSION_PREFIX + session_id
        async with self._uow() as uow:
            session = domain.authorize_write(caller, await uow.sessions.get(session_id), name)
        _check_etag(etag, session.etag, "session")
        if session.state in (SessionState.RUNNING, SessionState.AWAITING_PERMISSION):
            raise FailedPrecondition("interrupt the running turn first", reason="SESSION_BUSY")
        previous = session.move_to(SessionState.ARCHIVED)

        async def mutate(uow: SessionUnitOfWork, _: int) -> None:
            session.archive_time = session.update_time = now()
            session.version += 1
            await uow.sessions.save(session)

        await self._append(
            session_id, "", [self._state_event(SessionState.ARCHIVED, previous)], mutate
        )
        with contextlib.suppress(CorralError, grpc.aio.AioRpcError):
            await self._runtime.release(name, delete_transcript=False, token=caller.token)
        await self._audit_quietly(caller, "session.archive", name)
        return session

    async def delete_session(
        self, caller: Caller, session_id: str, *, etag: str, force: bool
    ) -> None:
        name = domain.SESSION_PREFIX + session_id
        async with self._uow() as uow:
            session = domain.authorize_write(caller, await uow.sessions.get(session_id), name)
        _check_etag(etag, session.etag, "session")
        busy = session.state in (SessionState.RUNNING, SessionState.AWAITING_PERMISSION)
        if busy and not force:
            raise FailedPrecondition(
                "the session has a running turn; pass force", reason="SESSION_BUSY"
            )
        driver = self._drivers.pop(session_id, None)
        if driver is not None:
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
        with contextlib.suppress(CorralError, grpc.aio.AioRpcError):
            await self._runtime.release(name, delete_transcript=True, token=caller.token)
        async with self._uow() as uow:
            for turn in await uow.turns.in_state(
                session_id, TurnState.QUEUED, TurnState.RUNNING, TurnState.AWAITING_PERMISSION
            ):
                if turn.reservation:
                    await self._release_quietly(turn.reservation, caller.token)
            await uow.sessions.delete(session_id)
            await uow.commit()
        self._locks.pop(session_id, None)
        await self._audit_quietly(caller, "session.delete", name)

    async def fork_session(
        self, caller: Caller, session_id: str, *, display_name: str, request_id: str
    ) -> Session:
        name = domain.SESSION_PREFIX + session_id
        parent = await self.get_session(caller, session_id)
        if not domain.can_create(caller):
            raise PermissionDenied("viewers cannot create sessions", reason="ROLE_READ_ONLY")
        if not parent.transcript_id:
            raise FailedPrecondition(
                "the session has no conversation to fork yet", reason="NOTHING_TO_FORK"
            )
        child = await self.create_session(
            caller,
            display_name=display_name or f"Fork of {parent.display_name}",
            options=agent_options_pb2.AgentOptions.FromString(parent.agent_options),
            labels=dict(parent.labels),
            organization=parent.organization,
            request_id=request_id,
        )
        if child.parent_session:
            return child  # an idempotent retry
        child.parent_session = name
        child.fork_sequence = parent.last_sequence
        child.transcript_id = parent.transcript_id
        async with self._uow() as uow:
            await uow.sessions.save(child)
            await uow.commit()
        return child

    # -- organisation policy -------------------------------------------------------------------

    async def get_policy(self, caller: Caller, organization: str) -> AgentPolicyRecord:
        domain.authorize_policy(caller, organization, write=False)
        async with self._uow() as uow:
            policy = await uow.policies.get(organization)
        return policy or AgentPolicyRecord(organization, b"", 0, now())

    async def update_policy(
        self,
        caller: Caller,
        organization: str,
        *,
        etag: str,
        change: Callable[[agent_policy_pb2.AgentPolicy], None],
    ) -> AgentPolicyRecord:
        domain.authorize_policy(caller, organization, write=True)
        async with self._uow() as uow:
            stored = await uow.policies.get(organization)
            policy = stored or AgentPolicyRecord(organization, b"", 0, now())
            _check_etag(etag, policy.etag, "policy")
            message = agent_policy_pb2.AgentPolicy.FromString(policy.payload)
            change(message)
            policy.payload = message.SerializeToString()
            policy.version += 1
            policy.update_time = now()
            await uow.policies.save(policy)
            await uow.commit()
        await self._audit_quietly(caller, "agent_policy.update", f"{organization}/agentPolicy")
        return policy

    # -- turns ---------------------------------------------------------------------------------

    async def send_message(
        self, caller: Caller, session_id: str, *, text: str, request_id: str, strategy: BusyStrategy
    ) -> Turn:
        name = domain.SESSION_PREFIX + session_id
        async with self._uow() as uow:
            session = domain.authorize_write(caller, await uow.sessions.get(session_id), name)
            session.require_active()
            if request_id:
                existing = await uow.turns.by_request_id(session_id, request_id)
                if existing is not None:
                    return existing
            active = await uow.turns.in_state(
                session_id, TurnState.QUEUED, TurnState.RUNNING, TurnState.AWAITING_PERMISSION
            )
        if active and strategy == BusyStrategy.REJECT:
            raise FailedPrecondition(
                "a turn is in progress; enqueue or interrupt it",
                reason="SESSION_BUSY",
                metadata={"turn": active[0].name},
            )
        reservation = await self._ledger.reserve(
            organization=session.organization,
            user=caller.subject,
            request_id=request_id or uuid.uuid4().hex,
            token=caller.token,
        )
        turn_id = uuid.uuid4().hex[:16]
        try:
            if active and strategy == BusyStrategy.INTERRUPT:
                await self._interrupt_active(caller, session_id, active, cancel_queued=True)
            user_event = event_pb2.SessionEvent(turn_id=turn_id)
            user_event.user_message.text = text
            user_event.user_message.sender = caller.subject
            created: list[Turn] = []

            async def mutate(uow: SessionUnitOfWork, first: int) -> None:
                current = await uow.sessions.get(session_id, for_update=True)
                if current is None:
                    raise NotFound(f"{name} does not exist", reason="SESSION_NOT_FOUND")
                current.turn_count += 1
                current.version += 1
                current.update_time = now()
                turn = Turn(
                    id=turn_id,
                    session_id=session_id,
                    ordinal=current.turn_count,
                    text=text,
                    sender=caller.subject,
                    create_time=now(),
                    request_id=request_id,
                    first_sequence=first,
                    last_sequence=first,
                    reservation=reservation,
                    driver=self._instance,
                    lease_time=now(),
                )
                await uow.turns.add(turn)
                await uow.sessions.save(current)
                created.append(turn)

            await self._append(session_id, turn_id, [user_event], mutate)
        except BaseException:
            await self._release_quietly(reservation, caller.token)
            raise
        self._live[turn_id] = _LiveTurn(token=caller.token, actor=caller.subject)
        self._ensure_keeper()
        self._ensure_driver(session_id)
        return created[0]

    async def get_turn(self, caller: Caller, session_id: str, turn_id: str) -> Turn:
        await self.get_session(caller, session_id)
        async with self._uow() as uow:
            turn = await uow.turns.get(session_id, turn_id)
        if turn is None:
            raise NotFound(
                f"sessions/{session_id}/turns/{turn_id} does not exist", reason="TURN_NOT_FOUND"
            )
        return turn

    async def list_turns(
        self, caller: Caller, session_id: str, page: Page
    ) -> tuple[list[Turn], str]:
        await self.get_session(caller, session_id)
        after = int(page.after[0]) if page.after is not None else 0
        async with self._uow() as uow:
            rows = await uow.turns.list(session_id, after_ordinal=after, limit=page.size + 1)
        more = len(rows) > page.size
        rows = rows[: page.size]
        return rows, next_token(page, (rows[-1].ordinal, rows[-1].id) if more and rows else None)

    async def interrupt_turn(
        self, caller: Caller, session_id: str, *, turn_id: str, cancel_queued: bool
    ) -> Turn:
        name = domain.SESSION_PREFIX + session_id
        async with self._uow() as uow:
            domain.authorize_write(caller, await uow.sessions.get(session_id), name)
            active = await uow.turns.in_state(
                session_id, TurnState.RUNNING, TurnState.AWAITING_PERMISSION, TurnState.QUEUED
            )
        current = [t for t in active if t.state != TurnState.QUEUED]
        target = current[0] if current else (active[0] if active else None)
        if target is None or (turn_id and target.id != turn_id):
            raise FailedPrecondition("no such turn is in progress", reason="TURN_NOT_IN_PROGRESS")
        await self._interrupt_active(caller, session_id, active, cancel_queued=cancel_queued)
        await self._audit_quietly(caller, "session.interrupt", target.name)
        return target

    async def _interrupt_active(
        self, caller: Caller, session_id: str, active: list[Turn], *, cancel_queued: bool
    ) -> None:
        name = domain.SESSION_PREFIX + session_id
        running = [t for t in active if t.state != TurnState.QUEUED]
        if cancel_queued or not running:
            for turn in active:
                if turn.state == TurnState.QUEUED:
                    await self._finish_unrun(
                        session_id, turn, "INTERRUPTED", "interrupted before it started"
                    )
        for turn in running:
            await self._runtime.interrupt(name, turn.id, token=caller.token)

    async def respond_to_permission(
        self,
        caller: Caller,
        session_id: str,
        *,
        request_id: str,
        allow: bool,
        message: str,
        updated_input: struct_pb2.Struct | None,
    ) -> None:
        name = domain.SESSION_PREFIX + session_id
        async with self._uow() as uow:
            domain.authorize_write(caller, await uow.sessions.get(session_id), name)
            pending = {rid: turn for rid, turn, _ in await uow.permissions.pending(session_id)}
        if request_id not in pending:
            raise NotFound(
                f"no pending permission request {request_id!r} in {name}",
                reason="PERMISSION_REQUEST_NOT_FOUND",
            )
        await self._runtime.decide(
            name,
            pending[request_id],
            request_id,
            allow=allow,
            message=message,
            updated_input=updated_input,
            decided_by=caller.subject,
            token=caller.token,
        )
        await self._audit_quietly(
            caller,
            "permission.allow" if allow else "permission.deny",
            name,
            {"permission_request": request_id, "message": message[:200]},
            outcome="SUCCEEDED" if allow else "DENIED",
        )

    # -- running turns -------------------------------------------------------------------------

    def _ensure_driver(self, session_id: str) -> None:
        # Say there is work before looking at the driver: a driver that is just finding its
        # queue empty sees this and looks again instead of exiting (no lost wake-up).
        self._wake.add(session_id)
        task = self._drivers.get(session_id)
        if task is None or task.done():
            self._drivers[session_id] = asyncio.create_task(
                self._drive(session_id), name=f"turns:{session_id}"
            )

    async def _drive(self, session_id: str) -> None:
        """Run this process's queued turns of the session one after another, in turn order
        (a turn another replica accepted earlier runs first, there), then stop."""
        try:
            while True:
                self._wake.discard(session_id)
                async with self._uow() as uow:
                    session = await uow.sessions.get(session_id)
                    active = await uow.turns.in_state(
                        session_id,
                        TurnState.QUEUED,
                        TurnState.RUNNING,
                        TurnState.AWAITING_PERMISSION,
                    )
                mine = [
                    t for t in active if t.driver == self._instance and t.state == TurnState.QUEUED
                ]
                if session is None or not mine:
                    if session is not None and session_id in self._wake:
                        continue  # a turn arrived while we looked: look again
                    return  # no await between this check and leaving _drivers (finally)
                if active[0].id != mine[0].id:
                    await asyncio.sleep(0.2)  # an earlier turn, run by another replica, goes first
                    continue
                await self._run_turn(session, mine[0])
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("turn driver failed", extra={"session": session_id})
        finally:
            if self._drivers.get(session_id) is asyncio.current_task():
                del self._drivers[session_id]

    async def _run_turn(self, session: Session, turn: Turn) -> None:
        live = self._live.get(turn.id)
        if live is None:  # queued by a process that is gone: nobody can run it as its sender
            await self._finish_unrun(
                session.id, turn, "FAILED", "the turn's sender is no longer connected"
            )
            return
        started = time.monotonic()

        async def start(uow: SessionUnitOfWork, _: int) -> None:
            current = await uow.sessions.get(session.id, for_update=True)
            assert current is not None
            current.move_to(SessionState.RUNNING)
            current.current_turn = turn.id
            current.update_time = now()
            current.version += 1
            await uow.sessions.save(current)
            turn.state = TurnState.RUNNING
            turn.start_time = now()
            await uow.turns.save(turn)

        await self._append(
            session.id, turn.id, [self._state_event(SessionState.RUNNING, session.state)], start
        )
        async with self._uow() as uow:
            policy = await uow.policies.get(session.organization)
        options = with_policy(
            agent_options_pb2.AgentOptions.FromString(session.agent_options),
            agent_policy_pb2.AgentPolicy.FromString(policy.payload) if policy else None,
        )
        request = TurnRequest(
            session=session.name,
            turn_id=turn.id,
            organization=session.organization,
            actor=live.actor,
            workspace=session.workspace,
            options=for_runtime(options),
            prompt=turn.text,
            resume_transcript_id=session.transcript_id,
            fork_transcript=bool(session.parent_session) and session.turn_count <= 1,
        )
        outcome = _TurnOutcome()
        queue: asyncio.Queue[rt.RuntimeEvent | BaseException | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for event in self._runtime.run_turn(request, token=live.token):
                    queue.put_nowait(event)
                queue.put_nowait(None)
            except BaseException as exc:
                queue.put_nowait(exc)

        reader = asyncio.create_task(read())
        try:
            done = False
            tail: list[event_pb2.SessionEvent] = []
            while not done:
                items = [await queue.get()]
                while not queue.empty() and len(items) < BATCH_MAX:
                    items.append(queue.get_nowait())
                batch: list[event_pb2.SessionEvent] = []
                for item in items:
                    if item is None:
                        done = True
                    elif isinstance(item, BaseException):
                        batch.extend(outcome.failed(item))
                        done = True
                    else:
                        mapped = events.from_runtime(item)
                        if mapped is not None:
                            batch.append(mapped)
                            outcome.observe(item)
                        if item.HasField("turn_result"):
                            done = True  # the turn is over; the stream's close adds nothing
                            break
                if done and not outcome.result_seen:
                    batch.extend(outcome.failed(None))
                if done:
                    tail = batch  # written with the turn's end, in one transaction
                else:
                    await self._write_turn_events(session.id, turn, batch, outcome)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        await self._finish_run(
            session.id, turn, outcome, time.monotonic() - started, live.token, tail
        )

    async def _write_turn_events(
        self,
        session_id: str,
        turn: Turn,
        batch: list[event_pb2.SessionEvent],
        outcome: _TurnOutcome,
    ) -> None:
        if not batch:
            return
        permission_changes = [
            e for e in batch if events.kind_of(e) in ("permission_request", "permission_decision")
        ]

        async def mutate(uow: SessionUnitOfWork, _: int) -> None:
            if not permission_changes:
                return
            current = await uow.sessions.get(session_id, for_update=True)
            assert current is not None
            for change in permission_changes:
                if change.HasField("permission_request"):
                    request = change.permission_request
                    await uow.permissions.add(
                        session_id, request.id, turn.id, request.SerializeToString()
                    )
                else:
                    await uow.permissions.resolve(
                        session_id, change.permission_decision.permission_request_id
                    )
            still_pending = await uow.permissions.pending(session_id)
            state = SessionState.AWAITING_PERMISSION if still_pending else SessionState.RUNNING
            if current.state != state and current.can_move_to(state):
                current.move_to(state)
                current.version += 1
                await uow.sessions.save(current)

        await self._append(session_id, turn.id, batch, mutate)

    async def _finish_run(
        self,
        session_id: str,
        turn: Turn,
        outcome: _TurnOutcome,
        seconds: float,
        token: str,
        tail: Sequence[event_pb2.SessionEvent] = (),
    ) -> None:
        """Write the turn's last events and its end in one transaction: once a client sees the
        turn_result, the session already accepts the next message."""
        failed = outcome.status in ("FAILED",)
        final_state = SessionState.FAILED if failed else SessionState.IDLE

        async def finish(uow: SessionUnitOfWork, _: int) -> None:
            current = await uow.sessions.get(session_id, for_update=True)
            if current is None:
                return
            current.move_to(final_state)
            current.current_turn = ""
            current.usage.add(outcome.usage)
            if outcome.transcript_id:
                current.transcript_id = outcome.transcript_id
            current.failure_reason = outcome.error_reason if failed else ""
            current.failure_message = outcome.error_message if failed else ""
            current.update_time = now()
            current.version += 1
            await uow.sessions.save(current)
            await uow.permissions.resolve_turn(session_id, turn.id)
            turn.state = TurnState.FINISHED
            turn.end_time = now()
            turn.usage = outcome.usage
            turn.result = outcome.result
            turn.last_sequence = await uow.events.last_sequence(session_id)
            await uow.turns.save(turn)

        closing = [*tail, self._state_event(final_state, SessionState.RUNNING)]
        await self._append(session_id, turn.id, closing, finish)
        self._live.pop(turn.id, None)
        if turn.reservation:
            try:
                await self._ledger.settle(turn.reservation, outcome.usage, token=token)
            except Exception:
                log.exception("could not settle usage", extra={"reservation": turn.reservation})
        log.info(
            "turn finished",
            extra={
                "session": session_id,
                "turn": turn.id,
                "status": outcome.status,
                "seconds": round(seconds, 3),
            },
        )

    async def _finish_unrun(self, session_id: str, turn: Turn, status: str, message: str) -> None:
        """End a turn that never reached the runtime (cancelled while queued, or orphaned)."""
        result = event_pb2.SessionEvent(turn_id=turn.id)
        result.turn_result.status = event_pb2.TurnResult.Status.Value(f"STATUS_{status}")
        result.turn_result.error.reason = "TURN_NOT_RUN"
        result.turn_result.error.message = message

        async def mutate(uow: SessionUnitOfWork, _: int) -> None:
            turn.state = TurnState.FINISHED
            turn.end_time = now()
            turn.result = result.turn_result.SerializeToString()
            await uow.turns.save(turn)

        await self._append(session_id, turn.id, [result], mutate)
        live = self._live.pop(turn.id, None)
        if turn.reservation:
            await self._release_quietly(turn.reservation, live.token if live else "")

    def _ensure_keeper(self) -> None:
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep_leases(), name="turn-leases")

    async def _keep_leases(self) -> None:
        interval = self._lease.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)
            try:
                async with self._uow() as uow:
                    await uow.turns.renew_leases(self._instance, now())
                    await uow.commit()
            except Exception:
                log.exception("could not renew turn leases")

    async def recover(self) -> None:
        """End the turns whose process is gone (their lease ran out: a crash, a restart, a lost
        replica) as FAILED; their events so far stay, and the session takes the next message.
        Turns of live processes, this one or other replicas, are left alone."""
        cutoff = now() - self._lease
        async with self._uow() as uow:
            session_ids = await uow.turns.orphaned_sessions(cutoff)
        for session_id in session_ids:
            async with self._uow() as uow:
                session = await uow.sessions.get(session_id)
                unfinished = await uow.turns.in_state(
                    session_id, TurnState.QUEUED, TurnState.RUNNING, TurnState.AWAITING_PERMISSION
                )
            if session is None:
                continue
            for turn in unfinished:
                if turn.driver == self._instance or (turn.lease_time and turn.lease_time >= cutoff):
                    continue
                reason = "the session service that ran this turn stopped"
                if turn.state == TurnState.QUEUED:
                    await self._finish_unrun(session_id, turn, "FAILED", reason)
                    continue
                outcome = _TurnOutcome()
                tail = outcome.failed(RuntimeError(reason))
                await self._finish_run(session_id, turn, outcome, 0.0, "", tail)

    async def maintain(self) -> None:
        """Sweep for orphaned turns every half lease (run as the service's background job)."""
        while True:
            await asyncio.sleep(self._lease.total_seconds() / 2)
            try:
                await self.recover()
            except Exception:
                log.exception("orphaned-turn sweep failed")

    async def close(self) -> None:
        tasks = list(self._drivers.values())
        if self._keeper is not None:
            tasks.append(self._keeper)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- history and the live stream -----------------------------------------------------------

    async def list_events(
        self, caller: Caller, session_id: str, *, after: int, limit: int, event_filter: EventFilter
    ) -> tuple[list[StoredEvent], int]:
        await self.get_session(caller, session_id)
        async with self._uow() as uow:
            rows = await uow.events.read(
                session_id,
                after=after,
                limit=limit,
                types=_types(event_filter),
                turn_id=event_filter.turn_id,
            )
            last = await uow.events.last_sequence(session_id)
        return rows, last

    async def watch(
        self, caller: Caller, session_id: str, *, after: int, event_filter: EventFilter
    ) -> AsyncIterator[tuple[int, bytes]]:
        """Replay the log after ``after``, then tail live events; (sequence, SessionEvent bytes).
        A heartbeat (sequence = the cursor) is sent after every ``heartbeat_seconds`` of quiet."""
        session = await self.get_session(caller, session_id)
        subscription = await self._hub.subscribe(topic(session_id))
        cursor = after
        try:
            async for event in self._read_log(session_id, cursor, None):
                cursor = event.sequence
                if event_filter.matches(event.type, event.turn_id):
                    yield event.sequence, event.payload
            if session.state == SessionState.ARCHIVED:
                return  # nothing more will happen: the stream ends with OK after the history
            while True:
                try:
                    message = await subscription.get(self._heartbeat)
                except HubClosed:
                    return  # the service is shutting down; the client reconnects elsewhere
                except Lagged:
                    message = None
                if message is None:
                    # Quiet, or the hub dropped something: the log is the truth, look there
                    # before saying "nothing new" with a heartbeat.
                    delivered = False
                    async for event in self._read_log(session_id, cursor, None):
                        cursor, delivered = event.sequence, True
                        if event_filter.matches(event.type, event.turn_id):
                            yield event.sequence, event.payload
                    if not delivered:
                        async with self._uow() as uow:
                            if await uow.sessions.get(session_id) is None:
                                raise NotFound(
                                    f"{domain.SESSION_PREFIX}{session_id} was deleted",
                                    reason="SESSION_NOT_FOUND",
                                )
                        heartbeat = event_pb2.SessionEvent(
                            session=domain.SESSION_PREFIX + session_id, sequence=cursor
                        )
                        heartbeat.heartbeat.SetInParent()
                        heartbeat.create_time.GetCurrentTime()
                        yield cursor, heartbeat.SerializeToString()
                    continue
                if message.sequence <= cursor:
                    continue  # already delivered from the log
                if message.sequence > cursor + 1:
                    async for event in self._read_log(session_id, cursor, message.sequence - 1):
                        cursor = event.sequence
                        if event_filter.matches(event.type, event.turn_id):
                            yield event.sequence, event.payload
                cursor = message.sequence
                if event_filter.empty:
                    yield message.sequence, message.payload
                else:
                    parsed = event_pb2.SessionEvent.FromString(message.payload)
                    if event_filter.matches(events.kind_of(parsed), parsed.turn_id):
                        yield message.sequence, message.payload
        finally:
            await subscription.close()

    async def _read_log(
        self, session_id: str, after: int, until: int | None
    ) -> AsyncIterator[StoredEvent]:
        """Every logged event after ``after`` (up to ``until``). When ``until`` is given, waits
        briefly for sequences another writer has reserved but not yet committed."""
        cursor = after
        waited = 0.0
        while until is None or cursor < until:
            async with self._uow() as uow:
                rows = await uow.events.read(
                    session_id, after=cursor, until=until, limit=REPLAY_PAGE
                )
            for row in rows:
                if row.sequence != cursor + 1:
                    break  # a hole: not committed yet
                cursor = row.sequence
                yield row
            if until is None and len(rows) < REPLAY_PAGE:
                return
            if until is not None and cursor < until:
                if waited > 10.0:
                    log.error(
                        "event log hole did not fill",
                        extra={"session": session_id, "after": cursor},
                    )
                    return
                await asyncio.sleep(0.02)
                waited += 0.02

    # -- audit and ledger helpers ----------------------------------------------------------------

    async def _audit_quietly(
        self,
        caller: Caller,
        action: str,
        resource: str,
        metadata: dict[str, str] | None = None,
        *,
        outcome: str = "SUCCEEDED",
    ) -> None:
        try:
            await self._audit.record(
                actor=caller.subject,
                organization=caller.organization,
                action=action,
                resource=resource,
                metadata=metadata or {},
                token=caller.token,
                outcome=outcome,
            )
        except Exception:
            log.exception("audit write failed", extra={"action": action, "resource": resource})

    async def _release_quietly(self, reservation: str, token: str) -> None:
        try:
            await self._ledger.release(reservation, token=token)
        except Exception:
            log.exception(
                "could not release a usage reservation", extra={"reservation": reservation}
            )


def _check_etag(sent: str, current: str, what: str) -> None:
    """An etag sent with a change must still be the resource's (else ABORTED: re-read)."""
    if sent and sent != current:
        raise Aborted(f"the {what} changed since you read it", reason="ETAG_MISMATCH")


def _types(event_filter: EventFilter) -> tuple[frozenset[str], bool] | None:
    if event_filter.include_types is not None:
        return event_filter.include_types - event_filter.exclude_types, True
    if event_filter.exclude_types:
        return event_filter.exclude_types, False
    return None


class _TurnOutcome:
    """What a turn's events add up to."""

    def __init__(self) -> None:
        self.status = "SUCCEEDED"
        self.usage = Usage()
        self.result = b""
        self.result_seen = False
        self.transcript_id = ""
        self.error_reason = ""
        self.error_message = ""

    def observe(self, event: rt.RuntimeEvent) -> None:
        if event.HasField("turn_started") and event.turn_started.transcript_id:
            self.transcript_id = event.turn_started.transcript_id
        if event.HasField("turn_result"):
            result = event.turn_result
            self.result_seen = True
            self.status = rt.TurnResult.Status.Name(result.status).removeprefix("STATUS_")
            u = result.usage
            self.usage = Usage(
                u.input_tokens,
                u.output_tokens,
                u.cache_read_input_tokens,
                u.cache_creation_input_tokens,
                u.cost_usd_micros,
            )
            if result.transcript_id:
                self.transcript_id = result.transcript_id
            mapped = events.from_runtime(event)
            assert mapped is not None
            self.result = mapped.turn_result.SerializeToString()
            if result.HasField("error"):
                self.error_reason, self.error_message = result.error.reason, result.error.message

    def failed(self, exc: BaseException | None) -> list[event_pb2.SessionEvent]:
        """The events that end a turn whose runtime stream broke off."""
        self.status = "FAILED"
        self.result_seen = True
        reason = "RUNTIME_UNAVAILABLE"
        message = "the agent runtime stopped answering mid-turn"
        if isinstance(exc, grpc.aio.AioRpcError):
            message = f"the agent runtime failed: {exc.code().name}"
        elif isinstance(exc, CorralError):
            reason, message = exc.reason, exc.message
        elif exc is not None and not isinstance(exc, asyncio.CancelledError):
            reason, message = "TURN_ABORTED", str(exc)
        self.error_reason, self.error_message = reason, message
        error = event_pb2.SessionEvent()
        error.error.code = code_pb2.UNAVAILABLE
        error.error.reason = reason
        error.error.message = message
        result = event_pb2.SessionEvent()
        result.turn_result.status = event_pb2.TurnResult.STATUS_FAILED
        result.turn_result.error.CopyFrom(error.error)
        u = result.turn_result.usage
        u.input_tokens, u.output_tokens = self.usage.input_tokens, self.usage.output_tokens
        u.cost_usd_micros = self.usage.cost_usd_micros
        self.result = result.turn_result.SerializeToString()
        return [error, result]
