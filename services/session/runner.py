"""The turn runner: drives each session's queued turns through the runtime, writes their
events to the log, finishes them (usage settled with identity), and keeps their leases.

A turn runs in the process that accepted it (only that process holds its sender's token).
That process's turns carry its id and a lease it renews; a turn whose lease runs out belongs to
a process that died, and any replica's :meth:`TurnRunner.recover` ends it as FAILED.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from google.rpc import code_pb2

from corral.libs.errors import CorralError, ResourceExhausted, Unavailable
from corral.libs.grpc.errors import code_for
from corral.libs.names import new_id
from corral.runtime.v1 import runtime_event_pb2 as rt
from corral.services.session import events
from corral.services.session.domain import (
    Session,
    SessionState,
    Turn,
    TurnState,
    Usage,
    now,
)
from corral.services.session.event_log import EventLog, state_event
from corral.services.session.metrics import SessionMetrics, for_meter
from corral.services.session.options import for_runtime, with_policy
from corral.services.session.ports import Runtime, TurnRequest, UnitOfWork, UsageLedger
from corral.session.v1 import agent_options_pb2, agent_policy_pb2, event_pb2

log = logging.getLogger("corral.session")

BATCH_MAX = 256
UNFINISHED = (TurnState.QUEUED, TurnState.RUNNING, TurnState.AWAITING_PERMISSION)


@dataclass
class _LiveTurn:
    token: str
    actor: str
    accepted: float = field(default_factory=time.monotonic)
    running: bool = False
    first_event_seen: bool = False
    pending: set[str] = field(default_factory=set)  # its open permission requests


class TurnRunner:
    def __init__(
        self,
        uow: Callable[[], UnitOfWork],
        event_log: EventLog,
        runtime: Runtime,
        ledger: UsageLedger,
        *,
        lease_seconds: float,
        clock: Callable[[], datetime] = now,
        metrics: SessionMetrics | None = None,
        default_turn_budget_usd_micros: int = 1_000_000,
    ) -> None:
        """``default_turn_budget_usd_micros``: a turn's cap when neither its session nor its
        organisation's policy sets one (CORRAL_SESSION_DEFAULT_TURN_BUDGET_USD)."""
        self._metrics = metrics or for_meter()
        self._metrics.track_runner(self)
        self._uow = uow
        self._log = event_log
        self._runtime = runtime
        self._ledger = ledger
        self.clock = clock
        self.instance = new_id()[:16]
        self._lease = timedelta(seconds=lease_seconds)
        self._drivers: dict[str, asyncio.Task[None]] = {}
        self._wake: set[str] = set()  # sessions given a turn since their driver last looked
        self._live: dict[str, _LiveTurn] = {}  # turn id -> the credentials it runs with
        self._keeper: asyncio.Task[None] | None = None
        self.default_turn_budget_usd_micros = default_turn_budget_usd_micros

    def queued_turns(self) -> int:
        return sum(1 for live in list(self._live.values()) if not live.running)

    def waiting_permission_requests(self) -> int:
        return sum(len(live.pending) for live in list(self._live.values()))

    # -- what the use cases ask of it ----------------------------------------------------------

    def start(self, turn: Turn, *, token: str, actor: str) -> None:
        """Run ``turn`` (just queued by this process) as its sender, after the session's
        earlier turns."""
        self._live[turn.id] = _LiveTurn(token=token, actor=actor)
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep_leases(), name="turn-leases")
        # Say there is work before looking at the driver: a driver that is just finding its
        # queue empty sees this and looks again instead of exiting (no lost wake-up).
        self._wake.add(turn.session_id)
        task = self._drivers.get(turn.session_id)
        if task is None or task.done():
            self._drivers[turn.session_id] = asyncio.create_task(
                self._drive(turn.session_id), name=f"turns:{turn.session_id}"
            )

    async def stop(self, session_id: str) -> None:
        """Stop driving a session's turns (it is being deleted)."""
        driver = self._drivers.pop(session_id, None)
        if driver is not None:
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)

    async def finish_unrun(self, session_id: str, turn: Turn, status: str, message: str) -> None:
        """End a turn that never reached the runtime (cancelled while queued, or orphaned)."""
        result = event_pb2.SessionEvent(turn_id=turn.id)
        result.turn_result.status = event_pb2.TurnResult.Status.Value(f"STATUS_{status}")
        result.turn_result.error.reason = "TURN_NOT_RUN"
        result.turn_result.error.message = message

        async def mutate(uow: UnitOfWork, _: int) -> None:
            turn.state = TurnState.FINISHED
            turn.end_time = now()
            turn.result = result.turn_result.SerializeToString()
            await uow.turns.save(turn)

        await self._log.append(session_id, turn.id, [result], mutate)
        self._metrics.turns_completed.add(1, {"status": status.lower()})
        live = self._live.pop(turn.id, None)
        if turn.reservation:
            await self.release_quietly(turn.reservation, live.token if live else "")

    async def release_quietly(self, reservation: str, token: str) -> None:
        try:
            await self._ledger.release(reservation, token=token)
        except Exception:
            log.exception(
                "could not release a usage reservation", extra={"reservation": reservation}
            )

    # -- driving a session's turns -------------------------------------------------------------

    async def _drive(self, session_id: str) -> None:
        """Run this process's queued turns of the session one after another, in turn order
        (a turn another replica accepted earlier runs first, there), then stop."""
        try:
            while True:
                self._wake.discard(session_id)
                async with self._uow() as uow:
                    session = await uow.sessions.get(session_id)
                    active = await uow.turns.in_state(session_id, *UNFINISHED)
                mine = [
                    t for t in active if t.driver == self.instance and t.state == TurnState.QUEUED
                ]
                if session is None or not mine:
                    if session is not None and session_id in self._wake:
                        continue  # a turn arrived while we looked: look again
                    return  # no await between this check and leaving _drivers (finally)
                if active[0].id != mine[0].id:
                    await asyncio.sleep(0.2)  # an earlier turn, run by another replica, goes first
                    continue
                await self._run(session, mine[0])
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("turn driver failed", extra={"session": session_id})
        finally:
            if self._drivers.get(session_id) is asyncio.current_task():
                del self._drivers[session_id]

    async def _run(self, session: Session, turn: Turn) -> None:
        live = self._live.get(turn.id)
        if live is None:  # queued by a process that is gone: nobody can run it as its sender
            await self.finish_unrun(
                session.id, turn, "FAILED", "the turn's sender is no longer connected"
            )
            return
        started = time.monotonic()
        live.running = True

        async def begin(uow: UnitOfWork, _: int) -> None:
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

        await self._log.append(
            session.id, turn.id, [state_event(SessionState.RUNNING, session.state)], begin
        )
        try:
            request = await self._request(session, turn, live.actor)
            hold = await self._hold_budget(turn, request, live)
        except Exception as exc:  # no budget left, or it cannot be prepared: it ends unrun
            if not isinstance(exc, CorralError):
                log.exception("a turn could not be prepared", extra={"turn": turn.id})
                exc = Unavailable("the turn could not be prepared; retry", reason="TURN_ABORTED")
            outcome = TurnOutcome()
            await self._finish(session.id, turn, outcome, 0.0, live.token, outcome.failed(exc))
            return
        try:
            await self._drive_turn(session, turn, request, live, started)
        finally:
            # After the settle (in _finish): what the turn spent is recorded before its cap is
            # given back.
            if hold:
                await self.release_quietly(hold, live.token)

    async def _hold_budget(self, turn: Turn, request: TurnRequest, live: _LiveTurn) -> str:
        """Hold the turn's cap (``request.options.max_budget_usd_micros``) against the
        organisation's cost budget while it runs. When less remains, hold what remains and
        lower the cap to it; with nothing left, QUOTA_EXCEEDED. Returns the hold's name."""
        cap = request.options.max_budget_usd_micros
        who = {"organization": request.organization, "user": live.actor, "token": live.token}
        try:
            return await self._ledger.reserve_budget(
                cost_usd_micros=cap, request_id=f"{turn.id}-budget", **who
            )
        except ResourceExhausted:
            remaining = await self._ledger.remaining_budget(**who)
            if remaining is None or not 0 < remaining < cap:
                raise
        hold = await self._ledger.reserve_budget(
            cost_usd_micros=remaining, request_id=f"{turn.id}-budget-rest", **who
        )
        request.options.max_budget_usd_micros = remaining
        log.info(
            "turn capped at the remaining budget",
            extra={"turn": turn.id, "cap": cap, "remaining": remaining},
        )
        return hold

    async def _drive_turn(
        self, session: Session, turn: Turn, request: TurnRequest, live: _LiveTurn, started: float
    ) -> None:
        outcome = TurnOutcome()
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
                        if not live.first_event_seen:
                            live.first_event_seen = True
                            self._metrics.time_to_first_event.record(
                                time.monotonic() - live.accepted
                            )
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
                    await self._write_events(session.id, turn, batch, live)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        await self._finish(session.id, turn, outcome, time.monotonic() - started, live.token, tail)

    async def _request(self, session: Session, turn: Turn, actor: str) -> TurnRequest:
        """What the runtime gets: the session's options under its organisation's policy, with
        the turn's spending cap."""
        async with self._uow() as uow:
            record = await uow.policies.get(session.organization)
        policy = agent_policy_pb2.AgentPolicy.FromString(record.payload) if record else None
        options = with_policy(
            agent_options_pb2.AgentOptions.FromString(session.agent_options), policy
        )
        runtime_options = for_runtime(options)
        runtime_options.max_budget_usd_micros = self.turn_cap(options, policy)
        return TurnRequest(
            session=session.name,
            turn_id=turn.id,
            organization=session.organization,
            actor=actor,
            workspace=session.workspace,
            options=runtime_options,
            prompt=turn.text,
            resume_transcript_id=session.transcript_id,
            fork_transcript=bool(session.parent_session) and session.turn_count <= 1,
        )

    def turn_cap(
        self, options: agent_options_pb2.AgentOptions, policy: agent_policy_pb2.AgentPolicy | None
    ) -> int:
        """What one turn may spend: the session's own cap, else its organisation's per-turn
        budget, else the deployment's default; never more than the organisation's."""
        most = policy.max_turn_budget_usd_micros if policy is not None else 0
        cap = options.max_budget_usd_micros or most or self.default_turn_budget_usd_micros
        return min(cap, most) if most else cap

    async def _write_events(
        self, session_id: str, turn: Turn, batch: list[event_pb2.SessionEvent], live: _LiveTurn
    ) -> None:
        if not batch:
            return
        permission_changes = [
            e for e in batch if events.kind_of(e) in ("permission_request", "permission_decision")
        ]
        for change in permission_changes:
            if change.HasField("permission_request"):
                live.pending.add(change.permission_request.id)
            else:
                live.pending.discard(change.permission_decision.permission_request_id)

        async def mutate(uow: UnitOfWork, _: int) -> None:
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

        await self._log.append(session_id, turn.id, batch, mutate)

    async def _finish(
        self,
        session_id: str,
        turn: Turn,
        outcome: TurnOutcome,
        seconds: float,
        token: str,
        tail: Sequence[event_pb2.SessionEvent] = (),
    ) -> None:
        """Write the turn's last events and its end in one transaction: once a client sees the
        turn_result, the session already accepts the next message. Then settle its usage."""
        failed = outcome.status == "FAILED"
        final_state = SessionState.FAILED if failed else SessionState.IDLE

        async def finish(uow: UnitOfWork, _: int) -> None:
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

        closing = [*tail, state_event(final_state, SessionState.RUNNING)]
        await self._log.append(session_id, turn.id, closing, finish)
        self._live.pop(turn.id, None)
        status = {"status": outcome.status.lower()}
        self._metrics.turns_completed.add(1, status)
        if seconds > 0:  # a turn that ran here (not one recovered, or refused its budget)
            self._metrics.turn_duration.record(seconds, status)
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

    # -- leases and recovery -------------------------------------------------------------------

    async def _keep_leases(self) -> None:
        interval = self._lease.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)
            try:
                async with self._uow() as uow:
                    await uow.turns.renew_leases(self.instance, self.clock())
                    await uow.commit()
            except Exception:
                log.exception("could not renew turn leases")

    async def recover(self) -> None:
        """End the turns whose process is gone (their lease ran out: a crash, a restart, a lost
        replica) as FAILED; their events so far stay, and the session takes the next message.
        Turns of live processes, this one or other replicas, are left alone."""
        cutoff = self.clock() - self._lease
        async with self._uow() as uow:
            session_ids = await uow.turns.orphaned_sessions(cutoff)
        for session_id in session_ids:
            async with self._uow() as uow:
                session = await uow.sessions.get(session_id)
                unfinished = await uow.turns.in_state(session_id, *UNFINISHED)
            if session is None:
                continue
            for turn in unfinished:
                if turn.driver == self.instance or (turn.lease_time and turn.lease_time >= cutoff):
                    continue
                reason = "the session service that ran this turn stopped"
                if turn.state == TurnState.QUEUED:
                    await self.finish_unrun(session_id, turn, "FAILED", reason)
                    continue
                outcome = TurnOutcome()
                tail = outcome.failed(RuntimeError(reason))
                await self._finish(session_id, turn, outcome, 0.0, "", tail)

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


class TurnOutcome:
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
        if isinstance(exc, CorralError):
            reason, message = exc.reason, exc.message
        elif exc is not None and not isinstance(exc, asyncio.CancelledError):
            reason, message = "TURN_ABORTED", str(exc)
        self.error_reason, self.error_message = reason, message
        error = event_pb2.SessionEvent()
        error.error.code = (
            code_for(exc).value[0] if isinstance(exc, CorralError) else code_pb2.UNAVAILABLE
        )
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
