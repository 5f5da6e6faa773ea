"""The turn runner: drives each session's queued turns through the runtime, writes their
events to the log, finishes them (their usage settled with identity through the outbox), and
keeps their leases.

A turn runs in the process that accepted it (only that process holds its sender's token). Its
lease means that the turn is being worked on: the process renews the leases of the turns its
drivers are alive for, and only those. A turn whose driver died (an exception, the database
lost mid-turn) is ended here as soon as the database answers, and its session's queued turns
driven again; a turn whose lease ran out belongs to a process that is gone, and any replica's
:meth:`TurnRunner.recover` ends it as FAILED.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from corral.libs.errors import CorralError, ResourceExhausted, Unavailable, outage
from corral.libs.names import new_id
from corral.libs.outbox import Outbox
from corral.runtime.v1 import runtime_event_pb2 as rt
from corral.services.session import events
from corral.services.session.domain import (
    SESSION,
    Session,
    SessionState,
    Turn,
    TurnState,
    now,
)
from corral.services.session.event_log import EventLog, state_event
from corral.services.session.leases import (
    UNFINISHED,
    AlreadyEnded,
    LiveTurn,
    TurnLeases,
    unfinished,
)
from corral.services.session.metrics import SessionMetrics, for_meter
from corral.services.session.options import for_runtime, with_policy
from corral.services.session.outcome import TurnOutcome
from corral.services.session.ports import Runtime, TurnRequest, UnitOfWork, UsageLedger
from corral.services.session.usage import usage_item
from corral.session.v1 import agent_options_pb2, agent_policy_pb2, event_pb2

log = logging.getLogger("corral.session")

BATCH_MAX = 256
# What the runtime may send before the agent's own output (turn_started, then what the agent
# does): the time to first event is measured to the first event that is none of these. Its
# wait for an agent process is the runtime's own measure (corral_runtime_pool_wait_seconds).
NOT_THE_AGENT = frozenset({"waiting_for_agent", "error", "turn_result"})
STOP_GRACE_SECONDS = 5.0  # how long a stopping service waits for its interrupted turns' results


class TurnRunner(TurnLeases):
    def __init__(
        self,
        uow: Callable[[], UnitOfWork],
        event_log: EventLog,
        runtime: Runtime,
        ledger: UsageLedger,
        outbox: Outbox,
        *,
        lease_seconds: float,
        clock: Callable[[], datetime] = now,
        metrics: SessionMetrics | None = None,
        default_turn_budget_usd_micros: int = 1_000_000,
        instance: str = "",
    ) -> None:
        """``default_turn_budget_usd_micros``: a turn's cap when neither its session nor its
        organisation's policy sets one (CORRAL_SESSION_DEFAULT_TURN_BUDGET_USD). ``instance``:
        this process's name on its turns (default: a new random one); a process that restarts
        under the same name ends the turns of its previous run at once."""
        self._metrics = metrics or for_meter()
        self._metrics.track_runner(self)
        self._uow = uow
        self._log = event_log
        self._runtime = runtime
        self._ledger = ledger
        self._outbox = outbox
        self.clock = clock
        self.instance = instance or new_id()[:16]
        self._started = clock()
        self._lease = timedelta(seconds=lease_seconds)
        self._drivers: dict[str, asyncio.Task[None]] = {}
        self._wake: set[str] = set()  # sessions given a turn since their driver last looked
        self._live: dict[str, LiveTurn] = {}  # turn id -> the credentials it runs with
        self._keeper: asyncio.Task[None] | None = None
        self._rescues: dict[str, asyncio.Task[None]] = {}
        self._closing = False
        self.default_turn_budget_usd_micros = default_turn_budget_usd_micros

    def queued_turns(self) -> int:
        return sum(1 for live in list(self._live.values()) if not live.running)

    def waiting_permission_requests(self) -> int:
        return sum(len(live.pending) for live in list(self._live.values()))

    # -- what the use cases ask of it ----------------------------------------------------------

    def start(self, turn: Turn, *, token: str, actor: str) -> None:
        """Run ``turn`` (just queued by this process) as its sender, after the session's
        earlier turns."""
        self._live[turn.id] = LiveTurn(turn.session_id, token=token, actor=actor)
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep_leases(), name="turn-leases")
        self._drive_soon(turn.session_id)

    def _drive_soon(self, session_id: str) -> None:
        # Say there is work before looking at the driver: a driver that is just finding its
        # queue empty sees this and looks again instead of exiting (no lost wake-up).
        if self._closing:
            return
        self._wake.add(session_id)
        task = self._drivers.get(session_id)
        if task is None or task.done():
            self._drivers[session_id] = asyncio.create_task(
                self._drive(session_id), name=f"turns:{session_id}"
            )

    async def stop(self, session_id: str) -> None:
        """Stop driving a session's turns (it is being deleted)."""
        driver = self._drivers.pop(session_id, None)
        if driver is not None:
            driver.cancel()
            await asyncio.gather(driver, return_exceptions=True)
        for turn_id in [t for t, live in self._live.items() if live.session_id == session_id]:
            del self._live[turn_id]

    async def finish_unrun(self, session_id: str, turn: Turn, status: str, message: str) -> None:
        """End a turn that never reached the runtime (cancelled while queued, or orphaned):
        what it holds is given back through the outbox."""
        result = event_pb2.SessionEvent(turn_id=turn.id)
        result.turn_result.status = event_pb2.TurnResult.Status.Value(f"STATUS_{status}")
        result.turn_result.error.reason = "TURN_NOT_RUN"
        result.turn_result.error.message = message
        items = []

        async def mutate(uow: UnitOfWork, _: int) -> None:
            session = await uow.sessions.get(session_id, for_update=True)
            await unfinished(uow, session_id, turn.id)
            turn.state = TurnState.FINISHED
            turn.end_time = now()
            turn.result = result.turn_result.SerializeToString()
            await uow.turns.save(turn)
            if session is not None and turn.reservation:
                items.append(usage_item(session.organization, turn.reservation, None))
                await self._outbox.add(uow, items[-1])

        live = self._live.get(turn.id)
        try:
            await self._log.append(session_id, turn.id, [result], mutate)
        except AlreadyEnded:
            self._live.pop(turn.id, None)
            return
        self._live.pop(turn.id, None)
        self._metrics.turns_completed.add(1, {"status": status.lower()})
        for item in items:
            self._outbox.send(item, token=live.token if live else "")

    async def release(self, organization: str, reservation: str, token: str) -> None:
        """Give back a reservation no turn was written for (its SendMessage failed): at once,
        else through the outbox (as the service), else it expires."""
        try:
            await self._ledger.release(reservation, token=token)
            return
        except Exception as exc:
            failure: Exception = exc
        try:
            await self._outbox.record(usage_item(organization, reservation, None), token="")
        except Exception:
            log.warning(
                "a usage reservation could not be released; it expires",
                extra={"reservation": reservation, "error": repr(failure)[:300]},
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
                    t
                    for t in active
                    if t.driver == self.instance
                    and t.state == TurnState.QUEUED
                    and not self._abandoned(t)
                ]
                if session is None or not mine:
                    if session is not None and session_id in self._wake:
                        continue  # a turn arrived while we looked: look again
                    return  # no await between this check and leaving _drivers (finally)
                if active[0].id != mine[0].id:
                    if self._abandoned(active[0]):
                        return  # it is ended by the rescue, which drives the session again
                    await asyncio.sleep(0.2)  # an earlier turn, run by another replica, goes first
                    continue
                await self._run(session, mine[0])
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # stopped on purpose: stop() or close()
            log.warning("turn driver was cancelled from within", extra={"session": session_id})
            self._rescue(session_id)
        except Exception as exc:
            if outage(exc) is None:
                log.exception("turn driver failed", extra={"session": session_id})
            else:
                log.warning(
                    "turn driver lost the database",
                    extra={"session": session_id, "error": repr(exc)[:300]},
                )
            self._rescue(session_id)
        finally:
            if self._drivers.get(session_id) is asyncio.current_task():
                del self._drivers[session_id]

    def _abandoned(self, turn: Turn) -> bool:
        live = self._live.get(turn.id)
        return live is not None and bool(live.abandoned)

    async def _run(self, session: Session, turn: Turn) -> None:
        live = self._live.get(turn.id)
        if live is None:  # queued by a process that is gone: nobody can run it as its sender
            await self.finish_unrun(
                session.id, turn, "FAILED", "the turn's sender is no longer connected"
            )
            return
        try:
            await self._run_live(session, turn, live)
        except AlreadyEnded:
            self._live.pop(turn.id, None)  # another replica ended it; nothing of ours to do
        except BaseException as exc:  # its driver dies with it: the rescue ends the turn
            mapped = outage(exc) if isinstance(exc, Exception) else None
            if self._closing:
                live.abandoned = "the session service stopped"
            elif mapped is not None:
                live.abandoned = f"the session service lost its database mid-turn ({mapped.reason})"
            else:
                live.abandoned = "the session service stopped working on the turn mid-way"
            raise

    async def _run_live(self, session: Session, turn: Turn, live: LiveTurn) -> None:
        started = time.monotonic()
        live.running = True

        async def begin(uow: UnitOfWork, _: int) -> None:
            current = await uow.sessions.get(session.id, for_update=True)
            assert current is not None
            await unfinished(uow, session.id, turn.id)
            current.move_to(SessionState.RUNNING)
            current.current_turn = turn.id
            current.update_time = now()
            current.version += 1
            await uow.sessions.save(current)
            turn.state = TurnState.RUNNING
            turn.start_time = now()
            turn.lease_time = self.clock()
            await uow.turns.save(turn)

        await self._log.append(
            session.id, turn.id, [state_event(SessionState.RUNNING, session.state)], begin
        )
        try:
            request = await self._request(session, turn, live.actor)
            await self._hold_budget(turn, request, live)
        except Exception as exc:  # no budget left, or it cannot be prepared: it ends unrun
            if outage(exc) is not None:
                raise  # the database: the rescue ends it once the database is back
            if not isinstance(exc, CorralError):
                log.exception("a turn could not be prepared", extra={"turn": turn.id})
                exc = Unavailable("the turn could not be prepared; retry", reason="TURN_ABORTED")
            outcome = TurnOutcome()
            await self._finish(session.id, turn, outcome, 0.0, live.token, outcome.failed(exc))
            return
        await self._drive_turn(session, turn, request, live, started)

    async def _hold_budget(self, turn: Turn, request: TurnRequest, live: LiveTurn) -> None:
        """Hold the turn's cap (``request.options.max_budget_usd_micros``) against the
        organisation's cost budget while it runs. When less remains, hold what remains and
        lower the cap to it; with nothing left, QUOTA_EXCEEDED. The hold is kept on the turn,
        so whoever ends the turn gives it back."""
        cap = request.options.max_budget_usd_micros
        who = {"organization": request.organization, "user": live.actor, "token": live.token}
        try:
            hold = await self._ledger.reserve_budget(
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
        turn.budget_hold = live.hold = hold
        turn.lease_time = self.clock()
        async with self._uow() as uow:
            await uow.turns.save(turn)
            await uow.commit()

    async def _drive_turn(
        self, session: Session, turn: Turn, request: TurnRequest, live: LiveTurn, started: float
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
                        if (
                            not live.first_event_seen
                            and item.WhichOneof("payload") not in NOT_THE_AGENT
                        ):
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
        self, session_id: str, turn: Turn, batch: list[event_pb2.SessionEvent], live: LiveTurn
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
        """Write the turn's last events, its end and its usage's settle (an outbox item) in one
        transaction: once a client sees the turn_result, the session already accepts the next
        message, and what the turn used reaches identity whenever identity answers."""
        failed = outcome.status == "FAILED"
        final_state = SessionState.FAILED if failed else SessionState.IDLE
        items = []

        async def finish(uow: UnitOfWork, _: int) -> None:
            current = await uow.sessions.get(session_id, for_update=True)
            if current is None:
                return
            await unfinished(uow, session_id, turn.id)
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
            await uow.turns.save(turn)
            if turn.reservation or turn.budget_hold:
                holds = [turn.budget_hold]
                items.append(
                    usage_item(current.organization, turn.reservation, outcome.usage, holds)
                )
                await self._outbox.add(uow, items[-1])

        closing = [*tail, state_event(final_state, SessionState.RUNNING)]
        try:
            await self._log.append(session_id, turn.id, closing, finish)
        except AlreadyEnded:
            self._live.pop(turn.id, None)  # someone else ended it meanwhile
            raise
        self._live.pop(turn.id, None)
        status = {"status": outcome.status.lower()}
        self._metrics.turns_completed.add(1, status)
        if seconds > 0:  # a turn that ran here (not one recovered, or refused its budget)
            self._metrics.turn_duration.record(seconds, status)
        for item in items:
            self._outbox.send(item, token=token)
        log.info(
            "turn finished",
            extra={
                "session": session_id,
                "turn": turn.id,
                "status": outcome.status,
                "seconds": round(seconds, 3),
            },
        )

    async def close(self, *, graceful: bool = True) -> None:
        """Stop. ``graceful``: interrupt the turns running here, wait a little for their
        results (what they cost), and end what is left FAILED; else (a crash, as tests stage
        it) just stop, leaving the turns to the lease."""
        self._closing = True
        running = [(turn_id, live) for turn_id, live in list(self._live.items()) if live.running]
        if graceful and running:
            for turn_id, live in running:
                try:
                    name = SESSION.format(live.session_id)
                    await self._runtime.interrupt(name, turn_id, token=live.token)
                except Exception as exc:
                    log.debug("interrupt at stop failed", extra={"error": repr(exc)[:200]})
            drivers = [t for t in self._drivers.values() if not t.done()]
            if drivers:
                await asyncio.wait(drivers, timeout=STOP_GRACE_SECONDS)
        tasks = [*self._drivers.values(), *self._rescues.values()]
        if self._keeper is not None:
            tasks.append(self._keeper)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not graceful:
            return
        for live in self._live.values():
            live.abandoned = live.abandoned or "the session service stopped"
        for session_id in {live.session_id for live in self._live.values()}:
            try:
                await self._recover_session(session_id, self.clock() - self._lease)
            except Exception as exc:  # the lease ends them elsewhere
                log.warning("could not end turns at stop", extra={"error": repr(exc)[:300]})
