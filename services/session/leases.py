"""Leases and recovery of turns, a part of :class:`~.runner.TurnRunner` kept apart to keep
each file readable.

A turn's lease means that it is being worked on: the process that accepted it renews the
leases of the turns its drivers are alive for (queued or running), never of one whose driver
died. Such a turn is ended here (``_rescue``) as soon as the database answers, and its session's
queued turns are driven again. A turn whose lease ran out belongs to a process that is gone;
any replica's sweep (:meth:`TurnLeases.recover`, every half lease) ends it FAILED. A process
restarted under its name (its host and port) ends the turns of its previous run at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from corral.libs.errors import Unavailable, outage
from corral.services.session.domain import SESSION, Session, Turn, TurnState
from corral.services.session.outcome import TurnOutcome
from corral.services.session.ports import Runtime, UnitOfWork
from corral.session.v1 import event_pb2

log = logging.getLogger("corral.session")

UNFINISHED = (TurnState.QUEUED, TurnState.RUNNING, TurnState.AWAITING_PERMISSION)
RESCUE_MAX_DELAY = 2.0  # between attempts to end a turn whose driver died, while the DB is down


@dataclass
class LiveTurn:
    session_id: str
    token: str
    actor: str
    accepted: float = field(default_factory=time.monotonic)
    running: bool = False
    first_event_seen: bool = False
    pending: set[str] = field(default_factory=set)  # its open permission requests
    hold: str = ""  # the reservation of its spending cap, once taken
    abandoned: str = ""  # why its driver died while it ran; the turn is ended then


class AlreadyEnded(Exception):
    """The turn was ended meanwhile (by another replica's recovery): nothing more to write."""


async def unfinished(uow: UnitOfWork, session_id: str, turn_id: str) -> None:
    stored = await uow.turns.get(session_id, turn_id)
    if stored is None or stored.state == TurnState.FINISHED:
        raise AlreadyEnded(turn_id)


class TurnLeases:
    """Needs the runner's unit of work, runtime, clock, lease, instance and live turns, and
    its ways to end a turn (set by :class:`~.runner.TurnRunner`)."""

    _uow: Callable[[], UnitOfWork]
    _runtime: Runtime
    _lease: timedelta
    _started: datetime
    _live: dict[str, LiveTurn]
    _rescues: dict[str, asyncio.Task[None]]
    instance: str
    clock: Callable[[], datetime]

    async def finish_unrun(self, session_id: str, turn: Turn, status: str, message: str) -> None:
        raise NotImplementedError

    async def _finish(
        self,
        session_id: str,
        turn: Turn,
        outcome: TurnOutcome,
        seconds: float,
        token: str,
        tail: Sequence[event_pb2.SessionEvent] = (),
    ) -> None:
        raise NotImplementedError

    def _drive_soon(self, session_id: str) -> None:
        raise NotImplementedError

    # -- leases and recovery -------------------------------------------------------------------

    async def _keep_leases(self) -> None:
        """Renew the leases of the turns being worked on here: queued or running under a live
        driver, never one whose driver died."""
        interval = self._lease.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)
            working = [turn for turn, live in list(self._live.items()) if not live.abandoned]
            if not working:
                continue
            try:
                async with self._uow() as uow:
                    await uow.turns.renew_leases(self.instance, working, self.clock())
                    await uow.commit()
            except Exception as exc:
                log.warning("could not renew turn leases", extra={"error": repr(exc)[:300]})

    def _orphaned(self, turn: Turn, cutoff: datetime) -> str:
        """Why ``turn`` has nobody working on it (empty: somebody does)."""
        if turn.driver != self.instance:
            if turn.lease_time is None or turn.lease_time < cutoff:
                return "the session service that ran this turn stopped"
            return ""
        live = self._live.get(turn.id)
        if live is not None:
            return live.abandoned
        if turn.lease_time is None or turn.lease_time < self._started:
            return "the session service that ran this turn restarted"
        if turn.lease_time < cutoff:
            return "the session service stopped working on this turn"
        return ""  # accepted here a moment ago: its driver is about to start

    async def recover(self) -> None:
        """End the turns nobody works on as FAILED: those whose process is gone (their lease
        ran out: a crash, a lost replica), those of this process's previous run, and those
        whose driver died here. Their events so far stay, and the session takes the next
        message. Turns of live processes, this one or other replicas, are left alone."""
        cutoff = self.clock() - self._lease
        async with self._uow() as uow:
            session_ids = await uow.turns.orphaned_sessions(cutoff, self.instance)
        for session_id in session_ids:
            try:
                await self._recover_session(session_id, cutoff)
            except Exception as exc:
                if outage(exc) is not None:
                    raise  # the database is down: the next sweep tries again
                log.exception("recovering a session's turns failed", extra={"session": session_id})

    async def _recover_session(self, session_id: str, cutoff: datetime) -> None:
        async with self._uow() as uow:
            session = await uow.sessions.get(session_id)
            unfinished = await uow.turns.in_state(session_id, *UNFINISHED)
        if session is None:
            return
        ended = False
        for turn in unfinished:
            reason = self._orphaned(turn, cutoff)
            if not reason:
                continue
            ended = True
            if turn.state == TurnState.QUEUED:
                await self.finish_unrun(session_id, turn, "FAILED", reason)
                continue
            live = self._live.get(turn.id)
            turn.budget_hold = turn.budget_hold or (live.hold if live else "")
            await self._interrupt_quietly(session, turn)
            outcome = TurnOutcome()
            tail = outcome.failed(Unavailable(reason, reason="TURN_ABORTED"))
            try:
                await self._finish(session_id, turn, outcome, 0.0, "", tail)
            except AlreadyEnded:
                continue
        if ended and any(live.session_id == session_id for live in self._live.values()):
            self._drive_soon(session_id)  # its queued turns, after the one that was ended

    async def _interrupt_quietly(self, session: Session, turn: Turn) -> None:
        """Stop what the runtime may still be doing for a turn nobody follows any more."""
        try:
            await self._runtime.interrupt(SESSION.format(session.id), turn.id, token="")
        except Exception as exc:
            log.debug("interrupting an orphaned turn failed", extra={"error": repr(exc)[:200]})

    def _rescue(self, session_id: str) -> None:
        """End the turn a dead driver left (and drive the session's queued turns again) as
        soon as the database answers."""
        task = self._rescues.get(session_id)
        if task is None or task.done():
            self._rescues[session_id] = asyncio.create_task(
                self._rescuing(session_id), name=f"rescue:{session_id}"
            )

    async def _rescuing(self, session_id: str) -> None:
        delay = 0.1
        while True:
            try:
                await self._recover_session(session_id, self.clock() - self._lease)
                # Its queued turns (the driver may have died before it ran any) run again.
                if any(live.session_id == session_id for live in self._live.values()):
                    self._drive_soon(session_id)
                return
            except Exception as exc:
                log.debug(
                    "rescue attempt failed", extra={"session": session_id, "error": repr(exc)}
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESCUE_MAX_DELAY)

    async def maintain(self) -> None:
        """Sweep for orphaned turns at once, then every half lease (the service's background
        job)."""
        while True:
            try:
                await self.recover()
            except Exception as exc:
                log.warning("orphaned-turn sweep failed", extra={"error": repr(exc)[:300]})
            await asyncio.sleep(self._lease.total_seconds() / 2)
