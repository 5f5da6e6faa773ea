"""The session use cases: sessions, turns, permissions, the organisation's agent policy.

One async method per use case, in Python terms (no protobuf requests, no gRPC). The event log
(:mod:`.event_log`) makes every change durable and visible in order; the turn runner
(:mod:`.runner`) drives accepted turns through the runtime.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime

from google.protobuf import struct_pb2

from corral.libs.auth.caller import Caller
from corral.libs.errors import CorralError, FailedPrecondition, NotFound, PermissionDenied
from corral.libs.etags import check_etag, mismatch
from corral.libs.eventhub import EventHub
from corral.libs.listing import Condition, Page, finish_page
from corral.libs.names import new_id
from corral.services.session import domain
from corral.services.session.domain import (
    SESSION,
    TURN,
    AgentPolicyRecord,
    BusyStrategy,
    Session,
    SessionState,
    StoredEvent,
    Turn,
    TurnState,
    now,
)
from corral.services.session.event_log import EventFilter, EventLog, state_event
from corral.services.session.idempotent import Create, once
from corral.services.session.options import options_with
from corral.services.session.ports import AuditLog, Runtime, UnitOfWork, UsageLedger
from corral.services.session.runner import UNFINISHED, TurnRunner
from corral.session.v1 import agent_options_pb2, agent_policy_pb2, event_pb2

log = logging.getLogger("corral.session")

POLICY_FIELDS = frozenset({"mcp_servers", "permission_rules"})


class SessionService:
    def __init__(
        self,
        uow: Callable[[], UnitOfWork],
        hub: EventHub,
        runtime: Runtime,
        ledger: UsageLedger,
        audit: AuditLog,
        *,
        heartbeat_seconds: float = 15.0,
        lease_seconds: float = 30.0,
        clock: Callable[[], datetime] = now,
    ) -> None:
        self._uow = uow
        self._runtime = runtime
        self._ledger = ledger
        self._audit = audit
        self.events = EventLog(uow, hub, heartbeat_seconds=heartbeat_seconds)
        self.runner = TurnRunner(
            uow, self.events, runtime, ledger, lease_seconds=lease_seconds, clock=clock
        )

    async def recover(self) -> None:
        await self.runner.recover()

    async def maintain(self) -> None:
        await self.runner.maintain()

    async def close(self) -> None:
        await self.runner.close()

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

        async def create(request: Create) -> Session:
            session = self._new_session(caller, org, display_name, options, labels)
            async with self._uow() as uow:
                await uow.sessions.add(session)
                await request.remember(uow, session.name)
                await uow.commit()
            log.info("session created", extra={"session": session.name, "owner": caller.subject})
            return session

        payload = {
            "display_name": display_name,
            "options": options,
            "labels": labels,
            "organization": organization,
        }
        return await once(
            self._uow,
            caller,
            "CreateSession",
            request_id,
            payload,
            create,
            self._session_named(caller),
        )

    @staticmethod
    def _new_session(
        caller: Caller,
        organization: str,
        display_name: str,
        options: agent_options_pb2.AgentOptions,
        labels: dict[str, str],
    ) -> Session:
        session_id = new_id()
        stamp = now()
        return Session(
            id=session_id,
            organization=organization,
            owner=caller.subject,
            display_name=display_name or "Untitled session",
            agent_options=options.SerializeToString(),
            labels=labels,
            create_time=stamp,
            update_time=stamp,
            workspace=f"workspaces/{session_id}",
        )

    def _session_named(self, caller: Caller) -> Callable[[str], Awaitable[Session]]:
        async def read(name: str) -> Session:
            (session_id,) = SESSION.parse_field(name, "name")
            return await self.get_session(caller, session_id)

        return read

    async def get_session(self, caller: Caller, session_id: str) -> Session:
        async with self._uow() as uow:
            return domain.authorize_read(
                caller, await uow.sessions.get(session_id), SESSION.format(session_id)
            )

    async def pending_permissions(self, session_id: str) -> list[bytes]:
        async with self._uow() as uow:
            return [payload for _, _, payload in await uow.permissions.pending(session_id)]

    async def list_sessions(
        self,
        caller: Caller,
        conditions: Sequence[Condition],
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
        async with self._uow() as uow:
            rows = await uow.sessions.list(scoped, order=order, descending=descending, page=page)
            total = await uow.sessions.count(scoped)
        kept, token = finish_page(rows, page, lambda s: (getattr(s, order), s.id))
        return kept, token, total

    async def update_session(
        self,
        caller: Caller,
        session_id: str,
        *,
        etag: str,
        paths: frozenset[str],
        display_name: str,
        labels: dict[str, str],
        options: agent_options_pb2.AgentOptions,
    ) -> Session:
        """Change the fields ``paths`` names (``display_name``, ``labels``, ``agent_options``
        or ``agent_options.<field>``: only those fields of the options, lists replaced)."""
        top = {p.split(".", 1)[0] for p in paths}
        async with self._uow() as uow:
            session = domain.authorize_write(
                caller,
                await uow.sessions.get(session_id, for_update=True),
                SESSION.format(session_id),
            )
            session.require_active()
            check_etag(etag, session.etag, "session")
            if "display_name" in top:
                session.display_name = display_name
            if "labels" in top:
                session.labels = labels
            if "agent_options" in top:
                session.agent_options = options_with(
                    agent_options_pb2.AgentOptions.FromString(session.agent_options),
                    options,
                    paths,
                ).SerializeToString()
            session.version += 1
            session.update_time = now()
            await uow.sessions.save(session)
            await uow.commit()
        return session

    async def archive_session(self, caller: Caller, session_id: str, *, etag: str) -> Session:
        name = SESSION.format(session_id)
        async with self._uow() as uow:
            session = domain.authorize_write(caller, await uow.sessions.get(session_id), name)
        check_etag(etag, session.etag, "session")
        if session.busy:
            raise FailedPrecondition("interrupt the running turn first", reason="SESSION_BUSY")
        previous = session.move_to(SessionState.ARCHIVED)

        async def mutate(uow: UnitOfWork, _: int) -> None:
            current = await uow.sessions.get(session_id, for_update=True)
            if current is None or current.version != session.version:
                raise mismatch("session")
            session.archive_time = session.update_time = now()
            session.version += 1
            await uow.sessions.save(session)

        await self.events.append(
            session_id, "", [state_event(SessionState.ARCHIVED, previous)], mutate
        )
        with contextlib.suppress(CorralError):
            await self._runtime.release(name, delete_transcript=False, token=caller.token)
        await self._audit_quietly(caller, "session.archive", name)
        return session

    async def delete_session(
        self, caller: Caller, session_id: str, *, etag: str, force: bool
    ) -> None:
        name = SESSION.format(session_id)
        async with self._uow() as uow:
            session = domain.authorize_write(caller, await uow.sessions.get(session_id), name)
        check_etag(etag, session.etag, "session")
        if session.busy and not force:
            raise FailedPrecondition(
                "the session has a running turn; pass force", reason="SESSION_BUSY"
            )
        await self.runner.stop(session_id)
        with contextlib.suppress(CorralError):
            await self._runtime.release(name, delete_transcript=True, token=caller.token)
        async with self._uow() as uow:
            for turn in await uow.turns.in_state(session_id, *UNFINISHED):
                if turn.reservation:
                    await self.runner.release_quietly(turn.reservation, caller.token)
            await uow.sessions.delete(session_id)
            await uow.commit()
        self.events.forget(session_id)
        await self._audit_quietly(caller, "session.delete", name)

    async def fork_session(
        self, caller: Caller, session_id: str, *, display_name: str, request_id: str
    ) -> Session:
        """A new idle session of the caller's that resumes the parent's conversation."""
        if not domain.can_create(caller):
            raise PermissionDenied("viewers cannot create sessions", reason="ROLE_READ_ONLY")

        async def create(request: Create) -> Session:
            parent = await self.get_session(caller, session_id)
            if not parent.transcript_id:
                raise FailedPrecondition(
                    "the session has no conversation to fork yet", reason="NOTHING_TO_FORK"
                )
            child = self._new_session(
                caller,
                parent.organization,
                display_name or f"{parent.display_name} (fork)",
                agent_options_pb2.AgentOptions.FromString(parent.agent_options),
                dict(parent.labels),
            )
            child.parent_session = parent.name
            child.fork_sequence = parent.last_sequence
            child.transcript_id = parent.transcript_id
            async with self._uow() as uow:
                await uow.sessions.add(child)
                await request.remember(uow, child.name)
                await uow.commit()
            return child

        payload = {"parent": session_id, "display_name": display_name}
        return await once(
            self._uow,
            caller,
            "ForkSession",
            request_id,
            payload,
            create,
            self._session_named(caller),
        )

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
        paths: frozenset[str],
        sent: agent_policy_pb2.AgentPolicy,
    ) -> AgentPolicyRecord:
        """Replace the policy's fields ``paths`` names (mcp_servers, permission_rules) with
        ``sent``'s; the others stay."""
        domain.authorize_policy(caller, organization, write=True)
        async with self._uow() as uow:
            stored = await uow.policies.get(organization)
            policy = stored or AgentPolicyRecord(organization, b"", 0, now())
            check_etag(etag, policy.etag, "policy")
            message = agent_policy_pb2.AgentPolicy.FromString(policy.payload)
            for field in sorted(paths & POLICY_FIELDS):
                target = getattr(message, field)
                del target[:]
                target.extend(getattr(sent, field))
            policy.payload = message.SerializeToString()
            policy.version += 1
            policy.update_time = now()
            await uow.policies.save(policy)
            await uow.commit()
        await self._audit_quietly(caller, "agent_policy.update", policy.name)
        return policy

    # -- turns ---------------------------------------------------------------------------------

    async def send_message(
        self, caller: Caller, session_id: str, *, text: str, request_id: str, strategy: BusyStrategy
    ) -> Turn:
        """Accept a turn: queued behind the session's current one, or (``strategy``) refused
        or run in its place. Usage is reserved with identity before anything is written."""

        async def create(request: Create) -> Turn:
            return await self._accept_turn(caller, session_id, text, strategy, request)

        async def replayed(name: str) -> Turn:
            session, turn = TURN.parse_field(name, "name")
            return await self.get_turn(caller, session, turn)

        payload = {"session": session_id, "text": text, "strategy": strategy.value}
        return await once(self._uow, caller, "SendMessage", request_id, payload, create, replayed)

    async def _accept_turn(
        self,
        caller: Caller,
        session_id: str,
        text: str,
        strategy: BusyStrategy,
        request: Create,
    ) -> Turn:
        name = SESSION.format(session_id)
        async with self._uow() as uow:
            session = domain.authorize_write(caller, await uow.sessions.get(session_id), name)
            session.require_active()
            active = await uow.turns.in_state(session_id, *UNFINISHED)
        if active and strategy == BusyStrategy.REJECT:
            raise FailedPrecondition(
                "a turn is in progress; enqueue or interrupt it",
                reason="SESSION_BUSY",
                metadata={"turn": active[0].name},
            )
        turn_id = new_id()
        reservation = await self._ledger.reserve(
            organization=session.organization,
            user=caller.subject,
            request_id=turn_id,  # one reservation per turn, whoever else uses the request_id
            token=caller.token,
        )
        try:
            if active and strategy == BusyStrategy.INTERRUPT:
                await self._interrupt_active(caller, session_id, active, cancel_queued=True)
            user_event = event_pb2.SessionEvent(turn_id=turn_id)
            user_event.user_message.text = text
            user_event.user_message.sender = caller.subject
            created: list[Turn] = []

            async def mutate(uow: UnitOfWork, first: int) -> None:
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
                    first_sequence=first,
                    last_sequence=first,
                    reservation=reservation,
                    driver=self.runner.instance,
                    lease_time=self.runner.clock(),
                )
                await uow.turns.add(turn)
                await uow.sessions.save(current)
                await request.remember(uow, turn.name)
                created.append(turn)

            await self.events.append(session_id, turn_id, [user_event], mutate)
        except BaseException:
            await self.runner.release_quietly(reservation, caller.token)
            raise
        self.runner.start(created[0], token=caller.token, actor=caller.subject)
        return created[0]

    async def get_turn(self, caller: Caller, session_id: str, turn_id: str) -> Turn:
        await self.get_session(caller, session_id)
        async with self._uow() as uow:
            turn = await uow.turns.get(session_id, turn_id)
        if turn is None:
            raise NotFound(
                f"{TURN.format(session_id, turn_id)} does not exist", reason="TURN_NOT_FOUND"
            )
        return turn

    async def list_turns(
        self, caller: Caller, session_id: str, page: Page
    ) -> tuple[list[Turn], str]:
        await self.get_session(caller, session_id)
        async with self._uow() as uow:
            rows = await uow.turns.list(session_id, page)
        return finish_page(rows, page, lambda t: (t.ordinal, t.id))

    async def interrupt_turn(
        self, caller: Caller, session_id: str, *, turn_id: str, cancel_queued: bool
    ) -> Turn:
        name = SESSION.format(session_id)
        async with self._uow() as uow:
            domain.authorize_write(caller, await uow.sessions.get(session_id), name)
            active = await uow.turns.in_state(session_id, *UNFINISHED)
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
        running = [t for t in active if t.state != TurnState.QUEUED]
        if cancel_queued or not running:
            for turn in active:
                if turn.state == TurnState.QUEUED:
                    await self.runner.finish_unrun(
                        session_id, turn, "INTERRUPTED", "interrupted before it started"
                    )
        for turn in running:
            await self._runtime.interrupt(SESSION.format(session_id), turn.id, token=caller.token)

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
        name = SESSION.format(session_id)
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

    # -- history and the live stream -----------------------------------------------------------

    async def list_events(
        self,
        caller: Caller,
        session_id: str,
        *,
        after: int,
        event_filter: EventFilter,
        page: Page,
    ) -> tuple[list[StoredEvent], str, int]:
        """One page of history after ``after`` (or the page token's position): (events,
        next page token, the session's last sequence)."""
        await self.get_session(caller, session_id)
        async with self._uow() as uow:
            rows = await uow.events.page(
                session_id,
                after=after,
                types=event_filter.types,
                turn_id=event_filter.turn_id,
                page=page,
            )
            last = await uow.events.last_sequence(session_id)
        kept, token = finish_page(rows, page, lambda e: (e.sequence, e.sequence))
        return kept, token, last

    async def watch(
        self, caller: Caller, session_id: str, *, after: int, event_filter: EventFilter
    ) -> AsyncIterator[tuple[int, bytes]]:
        """The session's events after ``after``, then live ones (see :meth:`EventLog.watch`)."""
        session = await self.get_session(caller, session_id)
        async for item in self.events.watch(
            session_id,
            archived=session.state == SessionState.ARCHIVED,
            after=after,
            event_filter=event_filter,
        ):
            yield item

    # -- audit -----------------------------------------------------------------------------------

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
