"""The event log of every session: append (durable, then published), replay, watch.

Every event is written to the session's log (sequence assigned once, in order, in the same
transaction as the state it reflects) and only then published on the hub. Watchers replay the
log after their cursor and tail the hub, skipping what they have and refilling any gap from
the log, so a watcher sees every event exactly once whichever replica it reaches.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

from corral.libs.errors import CorralError, InvalidArgument, NotFound, Unavailable, outage
from corral.libs.eventhub import EventHub, HubClosed, HubMessage, Lagged, Subscription
from corral.libs.listing import Condition
from corral.services.session import events
from corral.services.session.domain import SESSION, SessionState, StoredEvent
from corral.services.session.metrics import SessionMetrics, for_meter
from corral.services.session.ports import UnitOfWork
from corral.session.v1 import event_pb2, session_pb2

log = logging.getLogger("corral.session")

REPLAY_PAGE = 500
HOLE_WAIT_SECONDS = 10.0
RESTART_AFTER_SECONDS = 0.1  # a drained watcher reconnects (to another replica) at once
PUBLISH_WARN_SECONDS = 30.0

Mutation = Callable[[UnitOfWork, int], Awaitable[None]]


def topic(session_id: str) -> str:
    return f"session:{session_id}"


def state_event(state: SessionState, previous: SessionState) -> event_pb2.SessionEvent:
    event = event_pb2.SessionEvent()
    event.state_changed.state = session_pb2.Session.State.Value(f"STATE_{state.value}")
    event.state_changed.previous_state = session_pb2.Session.State.Value(f"STATE_{previous.value}")
    return event


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

    @property
    def types(self) -> tuple[frozenset[str], bool] | None:
        """(names, include) for a query, or None for every type."""
        if self.include_types is not None:
            return self.include_types - self.exclude_types, True
        if self.exclude_types:
            return self.exclude_types, False
        return None

    def matches(self, kind: str, turn_id: str) -> bool:
        if kind == "heartbeat":
            return True
        if self.include_types is not None and kind not in self.include_types:
            return False
        if kind in self.exclude_types:
            return False
        return self.turn_id is None or self.turn_id == turn_id


class EventLog:
    def __init__(
        self,
        uow: Callable[[], UnitOfWork],
        hub: EventHub,
        *,
        heartbeat_seconds: float,
        metrics: SessionMetrics | None = None,
    ) -> None:
        self._uow = uow
        self._hub = hub
        self._heartbeat = heartbeat_seconds
        self._locks: dict[str, asyncio.Lock] = {}
        self._watchers = 0
        self._subscriptions: set[Subscription] = set()
        self._draining = False
        self._publish_warned = -math.inf
        self._unpublished = 0
        self._metrics = metrics or for_meter()
        self._metrics.track_log(self)

    def live_streams(self) -> int:
        return self._watchers

    def forget(self, session_id: str) -> None:
        self._locks.pop(session_id, None)

    async def drain(self) -> None:
        """The server is stopping: every open stream ends UNAVAILABLE (STREAM_RESTART) now, and
        its client reconnects (to another replica) with the last sequence it received."""
        self._draining = True
        for subscription in list(self._subscriptions):
            await subscription.close()

    def _restart(self, why: str, cause: CorralError | None = None) -> Unavailable:
        metadata = {"cause": cause.reason} if cause is not None else {}
        delay = getattr(cause, "retry_after_seconds", None) or RESTART_AFTER_SECONDS
        return Unavailable(
            f"{why}; reconnect with the last sequence received",
            reason="STREAM_RESTART",
            retry_after_seconds=delay,
            metadata=metadata,
        )

    async def append(
        self,
        session_id: str,
        turn_id: str,
        new_events: Sequence[event_pb2.SessionEvent],
        mutate: Mutation | None = None,
    ) -> int:
        """Persist events (and ``mutate``'s changes) in one transaction, then publish them;
        each event's turn's ``last_sequence`` moves to it in that transaction. Returns the
        first sequence assigned. One writer per session at a time in this process;
        across processes the log's row lock orders them and watchers refill any gap."""
        name = SESSION.format(session_id)
        async with self._locks.setdefault(session_id, asyncio.Lock()):
            async with self._uow() as uow:
                first = await uow.events.reserve(session_id, len(new_events)) if new_events else 0
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
            for kind, count in Counter(s.type for s in stored).items():
                self._metrics.events_appended.add(count, {"type": kind})
            if stored:
                try:
                    await self._hub.publish(
                        topic(session_id), [HubMessage(s.sequence, s.payload) for s in stored]
                    )
                except Exception as exc:  # durable already: watchers find it in the log
                    self._publish_failed(session_id, exc)
        return first

    def _publish_failed(self, session_id: str, exc: Exception) -> None:
        """One warning every PUBLISH_WARN_SECONDS while the hub is down, not one per batch."""
        self._unpublished += 1
        at = time.monotonic()
        if at - self._publish_warned < PUBLISH_WARN_SECONDS:
            return
        self._publish_warned = at
        log.warning(
            "event publish failed; watchers read the log instead",
            extra={"session": session_id, "error": repr(exc)[:300], "failed": self._unpublished},
        )
        self._unpublished = 0

    async def watch(
        self, session_id: str, *, archived: bool, after: int, event_filter: EventFilter
    ) -> AsyncIterator[tuple[int, bytes]]:
        """Replay the log after ``after``, then tail live events; (sequence, SessionEvent bytes).
        A heartbeat (sequence = the cursor) is sent after every ``heartbeat_seconds`` of quiet.
        An archived session's stream ends after its history. The stream ends UNAVAILABLE
        (STREAM_RESTART) when the server drains or the database fails under it."""
        if self._draining:
            raise self._restart("the server is shutting down")
        try:
            async for item in self._watch(session_id, archived, after, event_filter):
                yield item
        except HubClosed as exc:
            raise self._restart("the server is shutting down") from exc
        except Exception as exc:
            cause = outage(exc)
            if cause is None:
                raise
            raise self._restart("the session database is unavailable", cause) from exc

    async def _watch(
        self, session_id: str, archived: bool, after: int, event_filter: EventFilter
    ) -> AsyncIterator[tuple[int, bytes]]:
        self._watchers += 1
        try:
            subscription = await self._hub.subscribe(topic(session_id))
        except BaseException:
            self._watchers -= 1
            raise
        self._subscriptions.add(subscription)
        cursor = after
        try:
            async for event in self.replay(session_id, cursor, None):
                cursor = event.sequence
                if event_filter.matches(event.type, event.turn_id):
                    yield event.sequence, event.payload
            if archived:
                return  # nothing more will happen: the stream ends with OK after the history
            while True:
                if self._draining:
                    raise HubClosed("the server is draining")
                try:
                    message = await subscription.get(self._heartbeat)
                except Lagged:
                    message = None
                if message is None:
                    # Quiet, or the hub dropped something: the log is the truth, look there
                    # before saying "nothing new" with a heartbeat.
                    delivered = False
                    async for event in self.replay(session_id, cursor, None):
                        cursor, delivered = event.sequence, True
                        if event_filter.matches(event.type, event.turn_id):
                            yield event.sequence, event.payload
                    if not delivered:
                        await self._require_session(session_id)
                        yield cursor, self._heartbeat_event(session_id, cursor)
                    continue
                if message.sequence <= cursor:
                    continue  # already delivered from the log
                if message.sequence > cursor + 1:
                    async for event in self.replay(session_id, cursor, message.sequence - 1):
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
            self._watchers -= 1
            self._subscriptions.discard(subscription)
            await subscription.close()

    async def _require_session(self, session_id: str) -> None:
        async with self._uow() as uow:
            if await uow.sessions.get(session_id) is None:
                raise NotFound(
                    f"{SESSION.format(session_id)} was deleted", reason="SESSION_NOT_FOUND"
                )

    @staticmethod
    def _heartbeat_event(session_id: str, cursor: int) -> bytes:
        heartbeat = event_pb2.SessionEvent(session=SESSION.format(session_id), sequence=cursor)
        heartbeat.heartbeat.SetInParent()
        heartbeat.create_time.GetCurrentTime()
        return heartbeat.SerializeToString()

    async def replay(
        self, session_id: str, after: int, until: int | None
    ) -> AsyncIterator[StoredEvent]:
        """Every logged event after ``after`` (up to ``until``). When ``until`` is given, waits
        (a bounded while) for sequences another writer has reserved but not yet committed."""
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
                if waited > HOLE_WAIT_SECONDS:
                    log.error(
                        "event log hole did not fill",
                        extra={"session": session_id, "after": cursor},
                    )
                    return
                await asyncio.sleep(0.02)
                waited += 0.02
