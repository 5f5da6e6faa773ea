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
import uuid
from collections.abc import AsyncIterator, Mapping
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
from corral.services.runtime.pool import AgentProcess, ProcessPool
from corral.services.runtime.sdk import AgentClient, AgentSdk, AgentSpec
from corral.services.runtime.store import SessionStore, saved_cost
from corral.services.runtime.turn import SessionGate, Turn, TurnRequest


@dataclass(frozen=True)
class RuntimeConfig:
    pool_size: int
    idle_seconds: float
    default_model: str
    permission_timeout_seconds: float
    interrupt_grace_seconds: float
    replica_id: str = ""


@dataclass(frozen=True)
class RuntimeStatus:
    replica_id: str
    draining: bool
    pool_size: int
    live_processes: int
    busy_processes: int
    open_sessions: int
    running_turns: int
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
        self._turns: set[Turn] = set()
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
        """Start the turn (errors before it starts are raised), then yield its events."""
        turn = await self._start_turn(caller, request)
        try:
            while (event := await turn.queue.get()) is not None:
                yield event
        finally:
            if not turn.finished.is_set():  # the caller went away: stop the turn for real
                turn.request_interrupt(stop_process=True)

    async def _start_turn(self, caller: Caller, request: TurnRequest) -> Turn:
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
        turn = Turn(
            state,
            request,
            permission_timeout=self.config.permission_timeout_seconds,
            interrupt_grace=self.config.interrupt_grace_seconds,
            model=self.config.default_model,
        )
        state.turn = turn
        try:
            # The session's own workspace, whatever the request named (the API refuses others).
            workspace = self.store.workspace(state.session_id)
            if state.workspace_id != state.session_id:
                state.workspace_id = state.session_id
                self.store.save(state)
            agent, started = await self._process_for(turn, workspace)
        except BaseException:
            state.turn = None
            if not state.has_run():  # it never ran: nothing to resume
                self.store.forget(state)
            raise
        self._turns.add(turn)
        turn.task = asyncio.create_task(
            turn.run(agent, self.pool, process_started=started, on_end=self._ended)
        )
        return turn

    def _ended(self, turn: Turn) -> None:
        self._turns.discard(turn)
        if turn.result is not None:
            model = turn.request.options.model or turn.model
            self.metrics.turn_ended(turn.request.organization, model, turn.result)

    async def _process_for(self, turn: Turn, workspace: Path) -> tuple[AgentProcess, bool]:
        """The session's warm process if it can serve this turn, else a new one resumed from the
        requested transcript (or starting one)."""
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
                return warm, False
        transcript = self.store.transcript(state, resume) if resume else None
        if transcript is None and resume and request.fork_transcript:
            transcript = await asyncio.to_thread(self.store.adopt, state, resume, workspace)
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

        agent = await self.pool.start(state.session_id, key, tag, start)
        state.transcript_id = spec.new_transcript_id or resume
        state.cost = CostMeter(baseline)
        return agent, True

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
            pending_permission_requests=sum(t.permissions.pending_count for t in self._turns),
            sdk_version=self.sdk.sdk_version,
            cli_version=self.sdk.cli_version,
        )

    async def reap_idle(self) -> int:
        return await self.pool.reap()

    async def close(self) -> None:
        """Refuse new turns, interrupt the running ones, stop every process."""
        self.draining = True
        tasks = [t.task for t in self._turns if t.task is not None]
        for turn in list(self._turns):
            turn.request_interrupt(stop_process=True)
        if tasks:
            await asyncio.wait(tasks, timeout=self.config.interrupt_grace_seconds * 3)
        await self.pool.close()


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
