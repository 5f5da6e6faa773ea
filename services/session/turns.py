"""The turn use cases of the session service: send a message (the queue and its limit, the
policy judged again), read turns, interrupt, answer permission requests. A part of
:class:`~.service.SessionService`, kept apart to keep each file readable."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from google.protobuf import struct_pb2

from corral.libs.audit import Audit
from corral.libs.auth.caller import Caller
from corral.libs.errors import FailedPrecondition, NotFound, ResourceExhausted
from corral.libs.idempotency import CreateRequest
from corral.libs.listing import Page, finish_page
from corral.libs.names import new_id
from corral.services.session import domain, policy
from corral.services.session.domain import (
    SESSION,
    TURN,
    BusyStrategy,
    Session,
    Turn,
    TurnState,
    now,
)
from corral.services.session.event_log import EventLog
from corral.services.session.idempotent import once
from corral.services.session.leases import UNFINISHED
from corral.services.session.ports import Runtime, UnitOfWork, UsageLedger
from corral.services.session.runner import TurnRunner
from corral.session.v1 import agent_options_pb2, event_pb2

log = logging.getLogger("corral.session")

MAX_QUEUED_TURNS = 16


class TurnUseCases:
    """Needs the session service's unit of work, runtime, ledger, runner, event log and audit
    (set by :class:`~.service.SessionService`)."""

    _uow: Callable[[], UnitOfWork]
    _runtime: Runtime
    _ledger: UsageLedger
    runner: TurnRunner
    events: EventLog
    audit: Audit

    async def get_session(self, caller: Caller, session_id: str) -> Session:
        raise NotImplementedError

    # -- turns ---------------------------------------------------------------------------------

    async def send_message(
        self, caller: Caller, session_id: str, *, text: str, request_id: str, strategy: BusyStrategy
    ) -> Turn:
        """Accept a turn: queued behind the session's current one, or (``strategy``) refused
        or run in its place. Usage is reserved with identity before anything is written."""

        async def create(request: CreateRequest) -> Turn:
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
        request: CreateRequest,
    ) -> Turn:
        name = SESSION.format(session_id)
        async with self._uow() as uow:
            session = domain.authorize_write(caller, await uow.sessions.get(session_id), name)
            session.require_active()
            active = await uow.turns.in_state(session_id, *UNFINISHED)
            stored = await uow.policies.get(session.organization)
        # The policy may have narrowed since the options were set: judge them again now.
        policy.check_options(
            agent_options_pb2.AgentOptions.FromString(session.agent_options),
            policy.parsed(stored.payload if stored else None),
            "session.agent_options",
        )
        if strategy == BusyStrategy.ENQUEUE:
            _check_queue(active)  # before holding usage for a turn that cannot queue
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
            entry = self.audit.entry(
                caller,
                "session.send_message",
                TURN.format(session_id, turn_id),
                {"busy_strategy": strategy.value},
                organization=session.organization,
            )

            async def mutate(uow: UnitOfWork, first: int) -> None:
                current = await uow.sessions.get(session_id, for_update=True)
                if current is None:
                    raise NotFound(f"{name} does not exist", reason="SESSION_NOT_FOUND")
                if strategy == BusyStrategy.ENQUEUE:  # again under the row lock: no race past it
                    _check_queue(await uow.turns.in_state(session_id, *UNFINISHED))
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
                await request.remember(uow.idempotency, turn.name, time.time())
                await self.audit.add(uow, entry)
                created.append(turn)

            await self.events.append(session_id, turn_id, [user_event], mutate)
        except BaseException:
            await self.runner.release(session.organization, reservation, caller.token)
            raise
        self.audit.send(entry, token=caller.token)
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
            session = domain.authorize_write(caller, await uow.sessions.get(session_id), name)
            active = await uow.turns.in_state(session_id, *UNFINISHED)
        current = [t for t in active if t.state != TurnState.QUEUED]
        target = current[0] if current else (active[0] if active else None)
        if target is None or (turn_id and target.id != turn_id):
            raise FailedPrecondition("no such turn is in progress", reason="TURN_NOT_IN_PROGRESS")
        await self._interrupt_active(caller, session_id, active, cancel_queued=cancel_queued)
        await self._audit(
            caller,
            "session.interrupt",
            target.name,
            {"cancel_queued": str(cancel_queued).lower()},
            organization=session.organization,
        )
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
            session = domain.authorize_write(caller, await uow.sessions.get(session_id), name)
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
        await self._audit(
            caller,
            "permission.allow" if allow else "permission.deny",
            name,
            {"permission_request": request_id, "message": message[:200]},
            organization=session.organization,
            outcome="SUCCEEDED" if allow else "DENIED",
        )

    # -- audit -----------------------------------------------------------------------------------

    async def _audit(
        self,
        caller: Caller,
        action: str,
        resource: str,
        metadata: dict[str, str],
        *,
        organization: str,
        outcome: str = "SUCCEEDED",
    ) -> None:
        """Audit a change the runtime made (no transaction of ours to join): the entry is
        kept, then sent; a failed write is retried by the outbox, never dropped."""
        entry = self.audit.entry(
            caller, action, resource, metadata, organization=organization, outcome=outcome
        )
        try:
            await self.audit.record(entry, token=caller.token)
        except Exception:  # the change is made; only a database outage loses this entry
            log.exception("audit entry not kept", extra={"action": action, "resource": resource})


def _check_queue(active: list[Turn]) -> None:
    """RESOURCE_EXHAUSTED (QUEUE_FULL) when the session already has the most queued turns."""
    if sum(1 for t in active if t.state == TurnState.QUEUED) >= MAX_QUEUED_TURNS:
        raise ResourceExhausted(
            f"{MAX_QUEUED_TURNS} turns are already queued in this session",
            reason="QUEUE_FULL",
            metadata={"max_queued_turns": str(MAX_QUEUED_TURNS)},
        )
