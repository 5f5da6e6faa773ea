"""A bounded pool of agent processes: one client (one CLI process) per live session.

At most ``size`` processes exist at any moment, counting those being started and those being
stopped. A session that needs a process when the pool is full takes the slot of the least
recently used idle one (which is stopped first); a process idle for ``idle_seconds`` is stopped
by :meth:`ProcessPool.reap`. A stopped session keeps its transcript and is resumed from it by
its next turn, so open sessions far outnumber processes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from corral.services.runtime import process
from corral.services.runtime.domain import PoolExhausted
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


class ProcessPool:
    """``clock`` (monotonic seconds) orders evictions and measures idleness."""

    def __init__(
        self, size: int, idle_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.size = size
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._live: dict[str, AgentProcess] = {}  # session id -> process, started or idle
        self._in_transit = 0  # slots held by processes being started or stopped
        self._closed = False
        # For the metrics: processes stopped to free a slot, by why; turns refused a process.
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

    def pids(self) -> list[int]:
        """The live processes' CLI pids (where known)."""
        return [p.client.pid for p in list(self._live.values()) if p.client.pid is not None]

    def has_process(self, session_id: str) -> bool:
        return session_id in self._live

    def take_warm(self, session_id: str, key: str) -> AgentProcess | None:
        """The session's idle process, marked busy, if it was started for ``key`` and is still
        alive (one that died while idle is replaced by :meth:`start`)."""
        agent = self._live.get(session_id)
        if agent is None or agent.busy or agent.key != key or not agent.alive():
            return None
        agent.busy = True
        agent.last_used = self._clock()
        return agent

    async def start(self, session_id: str, key: str, tag: str, start: Starter) -> AgentProcess:
        """A new process for the session, marked busy: in a free slot, else in the slot of the
        session's own idle process or of the least recently used idle one (stopped first)."""
        if self.closing():
            raise PoolExhausted("the runtime is shutting down", retry_after_seconds=1.0)
        victim = self._live.get(session_id)
        if victim is not None:
            if victim.busy:
                raise PoolExhausted(f"session {session_id!r} is using its process")
        elif self.live >= self.size:
            idle = [p for p in self._live.values() if not p.busy]
            if not idle:
                self.exhausted += 1
                raise PoolExhausted(
                    f"all {self.size} agent processes are running turns",
                    retry_after_seconds=1.0,
                )
            victim = min(idle, key=lambda p: p.last_used)
        if victim is not None:
            del self._live[victim.session_id]
            self.evictions["replaced" if victim.session_id == session_id else "lru"] += 1
        self._in_transit += 1  # this slot (a free one, or the victim's) is ours from now on
        try:
            if victim is not None:
                log.info(
                    "stopping an idle agent process to free its slot",
                    extra={"session": victim.session_id, "for_session": session_id},
                )
                await victim.stop()
            client = await start()
        finally:
            self._in_transit -= 1
        agent = AgentProcess(session_id, key, client, tag, self._clock())
        await agent.settle_residents()
        if self.closing():  # close() ran while this process was starting
            await agent.stop()
            raise PoolExhausted("the runtime is shutting down", retry_after_seconds=1.0)
        self._live[session_id] = agent
        return agent

    def checkin(self, agent: AgentProcess) -> None:
        """The turn is over and the process stays warm for the session's next turn."""
        agent.busy = False
        agent.last_used = self._clock()

    async def discard(self, agent: AgentProcess) -> None:
        """Stop the process now (a failed or cancelled turn, a release)."""
        if self._live.get(agent.session_id) is agent:
            del self._live[agent.session_id]
            self._in_transit += 1
            try:
                await agent.stop()
            finally:
                self._in_transit -= 1
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

    async def close(self) -> None:
        """Stop every process (busy ones too: their turns have been interrupted by now)."""
        self._closed = True
        await asyncio.gather(*(self.discard(agent) for agent in list(self._live.values())))
