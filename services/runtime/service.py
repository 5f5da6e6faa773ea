"""The runtime's use cases: run a turn, interrupt it, decide a permission, release, report status.

The service finds the session (``store``), a process for it (``pool``, started through the
``sdk`` port) and hands both to a :class:`~corral.services.runtime.turn.Turn`, which runs in a
task of its own. The constructor does no I/O; :meth:`RuntimeService.start` prepares the disk.

Its callers are internal services (the API lets no one else in); they act for users named in
the requests. A session belongs to the organisation of its first turn, for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from asyncio import FIRST_COMPLETED
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.libs.auth.caller import Caller
from corral.libs.errors import FailedPrecondition, NotFound
from corral.runtime.v1 import agent_options_pb2 as options_pb
from corral.runtime.v1 import runtime_event_pb2 as pb
from corral.services.runtime.domain import (
    Behavior,
    CostMeter,
    Decision,
    DecisionSource,
    Draining,
    TranscriptNotFound,
    TurnAlreadyRunning,
    TurnNotFound,
)
from corral.services.runtime.metrics import RuntimeMetrics, for_meter
from corral.services.runtime.model_endpoint import ModelEndpoint
from corral.services.runtime.pool import AgentProcess, ProcessPool, Ticket
from corral.services.runtime.sdk import AgentClient, AgentSdk, AgentSpec
from corral.services.runtime.store import SessionStore, saved_cost
from corral.services.runtime.turn import SessionGate, Turn, TurnRequest

# What a drain waits beyond three interrupt graces (an agent that ignored its interrupt is
# stopped, which may take a while).
DRAIN_SLACK_SECONDS = 5.0


@dataclass(frozen=True)
class RuntimeConfig:
    pool_size: int
    idle_seconds: float
    default_model: str
    permission_timeout_seconds: float
    interrupt_grace_seconds: float
    replica_id: str = ""
    # False: turns report no cost (the offline model's are invented; offline_model/pricing.py).
    charge_model_cost: bool = True


@dataclass(frozen=True)
class _Launch:
    """How an admitted turn gets its process (and whether it is a new one): the session's warm
    one, or one started in the slot ``ticket`` claims, once it is granted."""

    process: Callable[[], Awaitable[tuple[AgentProcess, bool]]]
    ticket: Ticket | None = None


@dataclass(frozen=True)
class RuntimeStatus:
    replica_id: str
    draining: bool
    pool_size: int
    live_processes: int
    busy_processes: int
    open_sessions: int
    running_turns: int
    waiting_turns: int
    max_waiting_turns: int
    pending_permission_requests: int
    sdk_version: str
    cli_version: str


class RuntimeService:
    def __init__(
        self,
        config: RuntimeConfig,
        sdk: AgentSdk,
        store: SessionStore,
        pool: ProcessPool,
        metrics: RuntimeMetrics | None = None,
    ) -> None:
        self.config = config
        self.sdk = sdk
        self.store = store
        self.pool = pool
        self.draining = False
        self._turns: set[Turn] = set()  # turns running in a process
        self._streams: set[Turn] = set()  # turns whose RunTurn stream is open
        self.metrics = metrics or for_meter()
        self.metrics.track_pool(pool)
        self.model_endpoint: ModelEndpoint | None = None  # its reachability, when it is checked

    async def start(self) -> None:
        """Prepare the session store and the SDK (directories, the CLI launcher)."""
        await self.store.start()
        await self.sdk.start()

    # -- RunTurn --------------------------------------------------------------------------------

    async def run_turn(
        self, caller: Caller, request: TurnRequest
    ) -> AsyncIterator[pb.RuntimeEvent]:
        """Admit the turn (errors before it starts are raised), wait for a process if every one
        is running a turn, then yield its events."""
        turn, launch = await self._admit(caller, request)
        self._streams.add(turn)
        try:
            if launch.ticket is not None and launch.ticket.waiting:
                position = launch.ticket.position
                yield turn.events.stamp(waiting_for_agent=pb.WaitingForAgent(position=position))
            await self._launch(turn, launch)
            while (event := await turn.queue.get()) is not None:
                yield event
        finally:
            self._streams.discard(turn)
            turn.delivered.set()
            if not turn.finished.is_set():  # the caller went away: stop the turn for real
                turn.request_interrupt(stop_process=True)

    async def _admit(self, caller: Caller, request: TurnRequest) -> tuple[Turn, _Launch]:
        """The checks before a turn, then how it gets its process: the session's warm one, or
        a claim on a slot for a new one (which may have to wait)."""
        if self.draining:
            raise Draining("this runtime replica is shutting down; use another one")
        state = self.store.session(request.session_id, request.organization, create=True)
        if state is None or state.organization != request.organization:
            # A session is bound to the organisation of its first turn; for any other it does
            # not exist.
            raise NotFound(f"session {request.session_id!r} does not exist")
        if state.turn is not None:
            raise TurnAlreadyRunning(
                f"session {request.session_id!r} is running turn {state.turn.turn_id!r}"
            )
        if not self.config.charge_model_cost:
            # The offline model's costs are invented and reported as zero, so they stop nothing
            # either: the CLI would end the turn at its list-price budget (offline_model/pricing).
            request.options.ClearField("max_budget_usd_micros")
        turn = Turn(
            state,
            request,
            permission_timeout=self.config.permission_timeout_seconds,
            interrupt_grace=self.config.interrupt_grace_seconds,
            model=self.config.default_model,
            charge_cost=self.config.charge_model_cost,
        )
        state.turn = turn
        try:
            # The session's own workspace, whatever the request named (the API refuses others).
            workspace = self.store.workspace(state.session_id)
            if state.workspace_id != state.session_id:
                state.workspace_id = state.session_id
                self.store.save(state)
            return turn, await self._plan(turn, workspace)
        except BaseException:
            self._never_ran(turn)
            raise

    async def _launch(self, turn: Turn, launch: _Launch) -> None:
        """Get the turn its process (waiting for a slot if it must) and start it in a task of
        its own. An interrupt while it waits ends it at once, having spent nothing."""
        ticket = launch.ticket
        try:
            if ticket is not None and not await self._wait_for_slot(turn, ticket):
                self.pool.abandon(ticket)
                turn.end_unstarted(on_end=self._ended)
                self._never_ran(turn)
                return
            agent, started = await launch.process()
        except BaseException:
            if ticket is not None:
                self.pool.abandon(ticket)
            self._never_ran(turn)
            raise
        if ticket is not None and ticket.position:
            turn.waited = time.monotonic() - ticket.arrived
        self.metrics.pool_wait.record(turn.waited)
        self._turns.add(turn)
        turn.task = asyncio.create_task(
            turn.run(agent, self.pool, process_started=started, on_end=self._ended)
        )

    async def _wait_for_slot(self, turn: Turn, ticket: Ticket) -> bool:
        """True once the ticket holds a slot; False if the turn was interrupted first. DRAINING
        if the replica starts shutting down while it waits."""
        if ticket.waiting:
            interrupted = asyncio.create_task(turn.interrupt_requested.wait())
            either: set[asyncio.Future[Any]] = {ticket.granted, interrupted}
            try:
                await asyncio.wait(either, return_when=FIRST_COMPLETED)
            finally:
                interrupted.cancel()
        if turn.interrupt_requested.is_set():
            return False
        ticket.granted.result()
        return True

    def _never_ran(self, turn: Turn) -> None:
        """The turn ends before it reached a process: the session is free again (and forgotten
        if nothing ever ran in it)."""
        state = turn.session
        if state.turn is turn:
            state.turn = None
        turn.finished.set()
        turn.interrupt_delivered.set()
        if not state.has_run():  # it never ran: nothing to resume
            self.store.forget(state)

    def _ended(self, turn: Turn) -> None:
        self._turns.discard(turn)
        if turn.result is not None:
            model = turn.request.options.model or turn.model
            self.metrics.turn_ended(turn.request.organization, model, turn.result)

    async def _plan(self, turn: Turn, workspace: Path) -> _Launch:
        """The session's warm process if it can serve this turn; else a claim on a slot for a
        new process resumed from the requested transcript (or starting one)."""
        request, state = turn.request, turn.session
        resume = request.resume_transcript_id
        if request.fork_transcript and not resume:
            raise TranscriptNotFound("fork_transcript needs resume_transcript_id")
        key = _process_key(request, workspace)
        if (
            not request.fork_transcript
            and resume == state.transcript_id
            and state.cost is not None
            # The CLI applies max_budget_usd to everything its process has spent, so a turn with
            # a budget gets a process that has spent nothing yet.
            and (not request.options.max_budget_usd_micros or not state.cost.spent_in_process)
        ):
            warm = self.pool.take_warm(state.session_id, key)
            if warm is not None:

                async def warm_process() -> tuple[AgentProcess, bool]:
                    return warm, False

                return _Launch(warm_process)
        transcript = self.store.transcript(state, resume) if resume else None
        if transcript is None and resume and request.fork_transcript:
            transcript = await asyncio.to_thread(self.store.adopt, state, resume)
        if resume and transcript is None:
            raise TranscriptNotFound(
                f"transcript {resume!r} of session {state.session_id!r} is not on this replica"
            )
        tag = uuid.uuid4().hex
        spec = AgentSpec(
            session_id=state.session_id,
            options=request.options,
            model=request.options.model or self.config.default_model,
            workspace=workspace,
            config_dir=state.config_dir,
            tag=tag,
            resume=resume,
            new_transcript_id="" if resume and not request.fork_transcript else str(uuid.uuid4()),
        )
        baseline = 0.0

        async def start() -> AgentClient:
            nonlocal baseline
            # Read once the session's previous process (if any) has stopped and saved its total.
            if transcript is not None:
                baseline = await asyncio.to_thread(saved_cost, transcript)
            return await self.sdk.connect(spec, SessionGate(state))

        ticket = self.pool.reserve(state.session_id)

        async def new_process() -> tuple[AgentProcess, bool]:
            agent = await self.pool.start(ticket, key, tag, start)
            state.transcript_id = spec.new_transcript_id or resume
            state.cost = CostMeter(baseline)
            return agent, True

        return _Launch(new_process, ticket)

    # -- the other RPCs ---------------------------------------------------------------------------

    def _running(self, caller: Caller, session_id: str, turn_id: str) -> Turn:
        state = self.store.loaded(session_id)
        turn = state.turn if state is not None else None
        if turn is None or turn.turn_id != turn_id:
            raise TurnNotFound(f"turn {turn_id!r} of session {session_id!r} is not running here")
        return turn

    async def interrupt(self, caller: Caller, session_id: str, turn_id: str) -> None:
        turn = self._running(caller, session_id, turn_id)
        turn.request_interrupt()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                turn.interrupt_delivered.wait(), self.config.interrupt_grace_seconds * 2
            )

    def decide(
        self,
        caller: Caller,
        session_id: str,
        turn_id: str,
        request_id: str,
        behavior: Behavior,
        *,
        decided_by: str,
        message: str,
        updated_input: Mapping[str, Any] | None,
    ) -> Decision:
        turn = self._running(caller, session_id, turn_id)
        decision = Decision(
            request_id,
            behavior,
            DecisionSource.USER,
            message=message,
            decided_by=decided_by or caller.subject,
            updated_input=updated_input if behavior is Behavior.ALLOW else None,
        )
        turn.permissions.decide(request_id, decision)
        return decision

    async def release(self, caller: Caller, session_id: str, delete_transcript: bool) -> bool:
        state = self.store.session(session_id, "", create=False)
        if state is None:
            return False
        if state.turn is not None:
            raise FailedPrecondition(
                f"session {session_id!r} is running turn {state.turn.turn_id!r}: interrupt it",
                reason="TURN_ALREADY_RUNNING",
            )
        released = await self.pool.release(session_id)
        state.cost = None
        if delete_transcript:
            self.store.forget(state)
        return released

    def status(self) -> RuntimeStatus:
        return RuntimeStatus(
            replica_id=self.config.replica_id,
            draining=self.draining,
            pool_size=self.pool.size,
            live_processes=self.pool.live,
            busy_processes=self.pool.busy,
            open_sessions=self.store.open_sessions,
            running_turns=len(self._turns),
            waiting_turns=self.pool.waiting,
            max_waiting_turns=self.pool.max_waiting,
            pending_permission_requests=sum(t.permissions.pending_count for t in self._turns),
            sdk_version=self.sdk.sdk_version,
            cli_version=self.sdk.cli_version,
        )

    async def reap_idle(self) -> int:
        return await self.pool.reap()

    async def drain(self) -> None:
        """Before the server stops: refuse new turns, end the waiting ones (DRAINING),
        interrupt the running ones and give them the interrupt grace to wrap up, then wait
        (bounded) until each turn's stream has carried its turn_result, with what it cost."""
        self.draining = True
        self.pool.close_queue()
        for turn in list(self._turns):
            turn.request_interrupt(stop_process=True)
        # An interrupt takes the grace to be heeded, then the grace again once the process is
        # stopped; stopping it may take a while longer (pool.STOP_SECONDS at worst).
        bound = self.config.interrupt_grace_seconds * 3 + DRAIN_SLACK_SECONDS
        streams = [asyncio.create_task(t.delivered.wait()) for t in self._streams]
        tasks = [t.task for t in self._turns if t.task is not None]
        if streams or tasks:
            await asyncio.wait([*streams, *tasks], timeout=bound)
        for waiter in streams:
            waiter.cancel()

    async def close(self) -> None:
        """Drain (if the server's stop did not already), stop every process, close the SDK."""
        if not self.draining:
            await self.drain()
        await self.pool.close()
        await self.sdk.close()


def _process_key(request: TurnRequest, workspace: Path) -> str:
    """What a live process was started with; a turn asking for anything else needs a new one.
    Permission rules and the timeout are read per turn, so they do not count."""
    options = options_pb.AgentOptions()
    options.CopyFrom(request.options)
    options.ClearField("permission_rules")
    options.ClearField("permission_timeout")
    digest = hashlib.sha256(options.SerializeToString(deterministic=True))
    digest.update(str(workspace).encode())
    return digest.hexdigest()
