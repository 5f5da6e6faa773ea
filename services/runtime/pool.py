"""A bounded pool of agent processes: one client (one CLI process) per live session.

At most ``size`` processes exist at any moment, counting those being started and those being
stopped. A turn that needs a new process claims a slot (:meth:`ProcessPool.reserve`): a free
one, else the slot of the least recently used idle process (which is stopped first). When
every process is running a turn, the claim waits in a queue of at most ``max_waiting``, served
in order of arrival as slots free up; a full queue refuses it (POOL_EXHAUSTED). A process idle
for ``idle_seconds`` is stopped by :meth:`ProcessPool.reap`. A stopped session keeps its
transcript and is resumed from it by its next turn, so open sessions far outnumber processes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from corral.services.runtime import process
from corral.services.runtime.domain import Draining, PoolExhausted
from corral.services.runtime.sdk import AgentClient

log = logging.getLogger("corral.runtime.pool")

STOP_SECONDS = 30.0  # the SDK bounds its own close (~20 s worst case); then the group is killed


@dataclass(eq=False)
class AgentProcess:
    """A connected client. ``key`` says what it was started with (options, working directory):
    a turn that needs something else gets a new process. ``tag`` marks everything it starts."""

    session_id: str
    key: str
    client: AgentClient
    tag: str
    last_used: float
    busy: bool = True
    stopped: bool = False
    # What it runs between turns (MCP servers, background tools): an interrupt spares these.
    resident: set[process.ProcessId] = field(default_factory=set)
    _identity: process.ProcessId | None = None

    def __post_init__(self) -> None:
        pid = self.client.pid
        self._identity = None if pid is None else process.identify(pid)

    def alive(self) -> bool:
        """Whether its process still runs; one whose pid is unknown is taken on trust until it
        is stopped (a dead one then fails its next turn, which stops it)."""
        if self._identity is None:
            return not self.stopped
        return process.alive(self._identity)

    async def survey(self) -> set[process.ProcessId]:
        """``processes()`` off the event loop (it reads /proc)."""
        return await asyncio.to_thread(self.processes)

    async def settle_residents(self) -> None:
        self.resident = await self.survey()

    def strays(self, *snapshots: set[process.ProcessId]) -> list[process.ProcessId]:
        """What the snapshots hold beyond the CLI and its residents: a turn's leftovers."""
        found = set().union(*snapshots) - self.resident
        if self._identity is not None:
            found.discard(self._identity)
        return sorted(found)

    def processes(self) -> set[process.ProcessId]:
        """The CLI and everything it started that is still alive, re-parented or not."""
        found = set(process.tagged(self.tag))
        if self._identity is not None and process.alive(self._identity):
            found.add(self._identity)
            found.update(process.descendants(self._identity[0]))
        return found

    async def stop(self) -> None:
        """Disconnect (the SDK closes stdin, then terminates), then kill whatever is left of the
        CLI's process tree. Safe to call twice."""
        if self.stopped:
            return
        self.stopped = True
        before = await self.survey()
        try:
            await asyncio.wait_for(asyncio.shield(self.client.disconnect()), STOP_SECONDS)
        except Exception:
            log.warning("agent process did not disconnect cleanly", exc_info=True)
        finally:
            process.kill_all([*before, *await asyncio.to_thread(process.tagged, self.tag)])


Starter = Callable[[], Awaitable[AgentClient]]


@dataclass(eq=False)
class Ticket:
    """A turn's claim on a slot: granted at once, or when its place in the queue comes up.
    Once granted it holds the slot (and the idle process it takes over, ``victim``) until
    :meth:`ProcessPool.start` uses it or :meth:`ProcessPool.abandon` gives it back."""

    session_id: str
    position: int  # its place in the queue on arrival (1: next); 0: granted at once
    granted: asyncio.Future[None]  # fails with Draining if the pool closes first
    arrived: float = field(default_factory=time.monotonic)
    victim: AgentProcess | None = None
    used: bool = False

    @property
    def waiting(self) -> bool:
        return not self.granted.done()


class ProcessPool:
    """``clock`` (monotonic seconds) orders evictions and measures idleness."""

    def __init__(
        self,
        size: int,
        idle_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_waiting: int | None = None,
    ) -> None:
        self.size = size
        self.idle_seconds = idle_seconds
        self.max_waiting = 4 * size if max_waiting is None else max_waiting
        self._clock = clock
        self._live: dict[str, AgentProcess] = {}  # session id -> process, started or idle
        self._in_transit = 0  # slots held by tickets and by processes being stopped
        self._waiting: deque[Ticket] = deque()  # claims waiting for a slot, oldest first
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False
        # For the metrics: processes stopped to free a slot, by why; claims refused a place.
        self.evictions = {"lru": 0, "replaced": 0, "idle": 0}
        self.exhausted = 0

    # Bookkeeping between awaits is synchronous: one event loop, so no lock is needed.

    def closing(self) -> bool:
        return self._closed

    @property
    def live(self) -> int:
        return len(self._live) + self._in_transit

    @property
    def busy(self) -> int:
        return sum(1 for p in self._live.values() if p.busy)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def pids(self) -> list[int]:
        """The live processes' CLI pids (where known)."""
        return [p.client.pid for p in list(self._live.values()) if p.client.pid is not None]

    def has_process(self, session_id: str) -> bool:
        return session_id in self._live

    def take_warm(self, session_id: str, key: str) -> AgentProcess | None:
        """The session's idle process, marked busy, if it was started for ``key`` and is still
        alive (one that died while idle is replaced through :meth:`reserve`)."""
        agent = self._live.get(session_id)
        if agent is None or agent.busy or agent.key != key or not agent.alive():
            return None
        agent.busy = True
        agent.last_used = self._clock()
        return agent

    def reserve(self, session_id: str) -> Ticket:
        """A claim on a slot for a new process of the session: granted at once when a slot is
        free, an idle process can give up its own (the session's own first, else the least
        recently used) and nobody waits before it; else a place at the end of the queue.
        POOL_EXHAUSTED if the queue is full; DRAINING if the pool is closing."""
        if self.closing():
            raise Draining("the runtime is shutting down; use another replica")
        ticket = Ticket(session_id, 0, asyncio.get_running_loop().create_future())
        own = self._live.get(session_id)
        if own is not None:
            if own.busy:
                raise PoolExhausted(f"session {session_id!r} is using its process")
            self._grant(ticket, own)
            return ticket
        if not self._waiting:
            free, victim = self._free_slot()
            if free:
                self._grant(ticket, victim)
                return ticket
        if len(self._waiting) >= self.max_waiting:
            self.exhausted += 1
            raise PoolExhausted(
                f"all {self.size} agent processes are running turns and"
                f" {len(self._waiting)} turns are waiting for one",
                retry_after_seconds=1.0,
            )
        self._waiting.append(ticket)
        ticket.position = len(self._waiting)
        return ticket

    def _free_slot(self) -> tuple[bool, AgentProcess | None]:
        """Whether a slot can be had, and the idle process to stop for it (None: the slot is
        free). No slot: every process is running a turn."""
        if self.live < self.size:
            return True, None
        idle = [p for p in self._live.values() if not p.busy]
        return (True, min(idle, key=lambda p: p.last_used)) if idle else (False, None)

    def _grant(self, ticket: Ticket, victim: AgentProcess | None) -> None:
        if victim is not None:
            del self._live[victim.session_id]
            self.evictions["replaced" if victim.session_id == ticket.session_id else "lru"] += 1
        ticket.victim = victim
        self._in_transit += 1  # this slot (a free one, or the victim's) is the ticket's now
        ticket.granted.set_result(None)

    def _dispatch(self) -> None:
        """Grant waiting claims, oldest first, while there are slots for them."""
        while self._waiting and not self.closing():
            free, victim = self._free_slot()
            if not free:
                return
            self._grant(self._waiting.popleft(), victim)

    def _slot_freed(self) -> None:
        self._in_transit -= 1
        self._dispatch()

    async def start(self, ticket: Ticket, key: str, tag: str, start: Starter) -> AgentProcess:
        """A new process for the ticket's session, marked busy, in the slot the ticket holds
        (its victim, if any, is stopped first)."""
        if ticket.waiting or ticket.used:
            raise RuntimeError("a ticket starts one process, once granted")
        ticket.used = True
        session_id = ticket.session_id
        try:
            if ticket.victim is not None:
                log.info(
                    "stopping an idle agent process to free its slot",
                    extra={"session": ticket.victim.session_id, "for_session": session_id},
                )
                await ticket.victim.stop()
            client = await start()
            agent = AgentProcess(session_id, key, client, tag, self._clock())
            try:
                await agent.settle_residents()
                if self.closing():  # close() ran while this process was starting
                    raise Draining("the runtime is shutting down; use another replica")
            except BaseException:
                await agent.stop()
                raise
        except BaseException:
            self._slot_freed()
            raise
        self._in_transit -= 1
        self._live[session_id] = agent
        return agent

    def abandon(self, ticket: Ticket) -> None:
        """The claim is no longer needed (its turn was interrupted or its caller went away):
        it leaves the queue, or gives back the slot it was granted and did not use."""
        if ticket.waiting:
            self._waiting.remove(ticket)
            ticket.granted.cancel()
            return
        if ticket.used or ticket.granted.cancelled() or ticket.granted.exception() is not None:
            return
        ticket.used = True
        victim = ticket.victim
        if victim is None:
            self._slot_freed()
            return

        async def stop_victim() -> None:  # it was taken out of the pool for this ticket
            try:
                await victim.stop()
            finally:
                self._slot_freed()

        task = asyncio.create_task(stop_victim())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def checkin(self, agent: AgentProcess) -> None:
        """The turn is over and the process stays warm for the session's next turn (or gives
        its slot to the oldest waiting claim)."""
        agent.busy = False
        agent.last_used = self._clock()
        self._dispatch()

    async def discard(self, agent: AgentProcess) -> None:
        """Stop the process now (a failed or cancelled turn, a release)."""
        if self._live.get(agent.session_id) is agent:
            del self._live[agent.session_id]
            self._in_transit += 1
            try:
                await agent.stop()
            finally:
                self._slot_freed()
        else:
            await agent.stop()

    async def release(self, session_id: str) -> bool:
        """Stop the session's idle process, if any; True if there was one."""
        agent = self._live.get(session_id)
        if agent is None:
            return False
        await self.discard(agent)
        return True

    async def reap(self) -> int:
        """Stop processes idle for longer than ``idle_seconds``; returns how many."""
        deadline = self._clock() - self.idle_seconds
        idle = [p for p in self._live.values() if not p.busy and p.last_used < deadline]
        for agent in idle:
            log.info("stopping an idle agent process", extra={"session": agent.session_id})
        self.evictions["idle"] += len(idle)
        await asyncio.gather(*(self.discard(agent) for agent in idle))
        return len(idle)

    def close_queue(self) -> None:
        """Refuse new claims and end the waiting ones (DRAINING)."""
        self._closed = True
        while self._waiting:
            self._waiting.popleft().granted.set_exception(
                Draining("the runtime is shutting down; use another replica")
            )

    async def close(self) -> None:
        """Stop every process (busy ones too: their turns have been interrupted by now)."""
        self.close_queue()
        await asyncio.gather(*(self.discard(agent) for agent in list(self._live.values())))
        await asyncio.gather(*self._background, return_exceptions=True)
