"""The runtime's use cases: run a turn, interrupt it, decide a permission, release, report status.

A turn runs in a task of its own, apart from the RunTurn call that asked for it: the call reads
its events from a queue, and when the caller goes away the turn is interrupted and its process
stopped rather than abandoned half-way. Every way a turn ends goes through one ``finally`` that
settles its cost, emits its ``turn_result`` and gives its process back (or stops it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import claude_agent_sdk
from claude_agent_sdk import (
    ClaudeAgentOptions,
    ClaudeSDKClient,
    ClaudeSDKError,
    CLIConnectionError,
    HookContext,
    HookInput,
    HookJSONOutput,
    HookMatcher,
    PermissionResult,
    PermissionResultAllow,
    PermissionResultDeny,
    ProcessError,
    ResultError,
    ResultMessage,
    SystemMessage,
    ToolPermissionContext,
)
from claude_agent_sdk.types import McpServerConfig, PermissionMode
from google.rpc import code_pb2

from corral.libs.auth.caller import Caller
from corral.libs.errors import FailedPrecondition, NotFound, PermissionDenied
from corral.runtime.v1 import agent_options_pb2 as options_pb
from corral.runtime.v1 import runtime_event_pb2 as pb
from corral.services.runtime import events as ev
from corral.services.runtime import process
from corral.services.runtime.domain import (
    Behavior,
    CostMeter,
    Decision,
    DecisionSource,
    Draining,
    PermissionBook,
    PermissionRule,
    ProcessFailed,
    RuleAction,
    TranscriptNotFound,
    TurnAlreadyRunning,
    TurnNotFound,
    WorkspaceUnavailable,
    first_matching_rule,
)
from corral.services.runtime.pool import AgentProcess, ProcessPool

log = logging.getLogger("corral.runtime")
audit = logging.getLogger("corral.runtime.audit")

SESSION_FILE = "corral-session.json"
_MODES: dict[int, PermissionMode] = {
    options_pb.AgentOptions.PERMISSION_MODE_UNSPECIFIED: "default",
    options_pb.AgentOptions.PERMISSION_MODE_DEFAULT: "default",
    options_pb.AgentOptions.PERMISSION_MODE_ACCEPT_EDITS: "acceptEdits",
    options_pb.AgentOptions.PERMISSION_MODE_PLAN: "plan",
    options_pb.AgentOptions.PERMISSION_MODE_DONT_ASK: "dontAsk",
    options_pb.AgentOptions.PERMISSION_MODE_BYPASS_PERMISSIONS: "bypassPermissions",
}
_ACTIONS = {
    options_pb.PermissionRule.ACTION_ALLOW: RuleAction.ALLOW,
    options_pb.PermissionRule.ACTION_DENY: RuleAction.DENY,
    options_pb.PermissionRule.ACTION_ASK: RuleAction.ASK,
}


@dataclass(frozen=True)
class RuntimeConfig:
    root: Path
    pool_size: int
    idle_seconds: float
    default_model: str
    permission_timeout_seconds: float
    interrupt_grace_seconds: float
    # The model endpoint for the CLI: ANTHROPIC_BASE_URL / ANTHROPIC_API_KEY.
    model_env: Mapping[str, str]
    replica_id: str = ""
    scrub_tool_env: bool = False


@dataclass(frozen=True)
class TurnRequest:
    session_id: str
    turn_id: str
    organization: str
    actor: str
    workspace_id: str
    prompt: str
    options: options_pb.AgentOptions
    resume_transcript_id: str = ""
    fork_transcript: bool = False


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


@dataclass(eq=False)
class SessionState:
    session_id: str
    organization: str
    config_dir: Path
    workspace_id: str = ""  # where its agent last worked
    transcript_id: str = ""  # the transcript the session's live process is on
    cost: CostMeter | None = None  # None: not known here yet (read from the transcript)
    turn: Turn | None = None


class Turn:
    """One running turn: its events, its permission requests, and how it is stopped."""

    def __init__(
        self, session: SessionState, request: TurnRequest, permission_timeout: float
    ) -> None:
        self.session = session
        self.request = request
        self.turn_id = request.turn_id
        self.rules = [
            PermissionRule(rule.tool_pattern, _ACTIONS[rule.action])
            for rule in request.options.permission_rules
        ]
        timeout = request.options.permission_timeout.ToNanoseconds() / 1e9
        self.permission_timeout = timeout if timeout > 0 else permission_timeout
        self.events = ev.TurnEvents(request.turn_id)
        self.queue: asyncio.Queue[pb.RuntimeEvent | None] = asyncio.Queue()
        self.permissions = PermissionBook()
        self.interrupt_requested = asyncio.Event()
        self.interrupt_delivered = asyncio.Event()
        self.finished = asyncio.Event()
        self.stop_process = False
        self.started = time.monotonic()
        self.task: asyncio.Task[None] | None = None

    def emit(self, **payload: Any) -> None:
        self.queue.put_nowait(self.events.stamp(**payload))

    def request_interrupt(self, *, stop_process: bool = False) -> None:
        self.stop_process = self.stop_process or stop_process
        if not self.interrupt_requested.is_set():
            self.interrupt_requested.set()
            self.permissions.deny_all(DecisionSource.INTERRUPT, "the turn was interrupted")

    def decided(self, decision: Decision, tool_name: str) -> None:
        """The decision event, and its audit line."""
        self.emit(permission_decision=ev.decision_message(decision))
        audit.info(
            "tool permission decided",
            extra={
                "session": self.session.session_id,
                "organization": self.session.organization,
                "turn": self.turn_id,
                "actor": self.request.actor,
                "tool": tool_name,
                "behavior": decision.behavior.value,
                "source": decision.source.value,
                "decided_by": decision.decided_by,
            },
        )

    # -- permission callbacks (called by the SDK while the turn runs) --------------------------

    def policy(self, tool_name: str) -> HookJSONOutput:
        """PreToolUse: the first matching rule decides; no rule leaves it to the SDK."""
        rule = first_matching_rule(self.rules, tool_name)
        if rule is None:
            return {}
        reason = f"permission rule {rule.tool_pattern!r} {rule.action.value}s {tool_name}"
        if rule.action is not RuleAction.ASK:
            behavior = Behavior.ALLOW if rule.action is RuleAction.ALLOW else Behavior.DENY
            decision = Decision(
                self.permissions.next_policy_id(), behavior, DecisionSource.POLICY, reason
            )
            self.decided(decision, tool_name)
        return {
            "hookSpecificOutput": {
                "hookEventName": "PreToolUse",
                "permissionDecision": rule.action.value,
                "permissionDecisionReason": reason,
            }
        }

    async def ask(
        self, tool_name: str, tool_input: dict[str, Any], context: ToolPermissionContext
    ) -> PermissionResult:
        """can_use_tool: a PermissionRequest, then wait for a person, the timeout or an
        interrupt. Only a person's ALLOW allows."""
        if self.interrupt_requested.is_set():
            return PermissionResultDeny(message="the turn was interrupted", interrupt=True)
        request = self.permissions.open(
            tool_name, context.tool_use_id or "", tool_input, self.permission_timeout
        )
        message = pb.PermissionRequest(
            id=request.request_id,
            tool_name=tool_name,
            tool_use_id=request.tool_use_id,
            input=ev.to_struct(tool_input),
            reason=context.decision_reason or context.title or f"{tool_name} needs approval",
        )
        message.expire_time.FromNanoseconds(int(request.expire_time * 1e9))
        self.emit(permission_request=message)
        try:
            await asyncio.wait_for(asyncio.shield(request.outcome), request.timeout_seconds)
        except TimeoutError:
            request.resolve(
                Decision(
                    request.request_id,
                    Behavior.DENY,
                    DecisionSource.TIMEOUT,
                    f"no decision within {request.timeout_seconds:g} s",
                )
            )
        except asyncio.CancelledError:  # the CLI withdrew the request (it was interrupted)
            request.resolve(
                Decision(request.request_id, Behavior.DENY, DecisionSource.INTERRUPT, "withdrawn")
            )
            self.decided(request.outcome.result(), tool_name)
            raise
        decision = request.outcome.result()
        self.decided(decision, tool_name)
        if decision.behavior is Behavior.ALLOW:
            updated = dict(decision.updated_input) if decision.updated_input is not None else None
            return PermissionResultAllow(updated_input=updated)
        return PermissionResultDeny(
            message=decision.message or f"{tool_name} was denied",
            interrupt=decision.source is DecisionSource.INTERRUPT,
        )


class RuntimeService:
    def __init__(self, config: RuntimeConfig, pool: ProcessPool | None = None) -> None:
        self.config = config
        self.pool = pool or ProcessPool(config.pool_size, config.idle_seconds)
        self.draining = False
        self._sessions: dict[str, SessionState] = {}
        self._turns: set[Turn] = set()
        self._sessions_dir = config.root / "sessions"
        self._workspaces_dir = config.root / "workspaces"
        self._sessions_dir.mkdir(parents=True, exist_ok=True)
        self._workspaces_dir.mkdir(parents=True, exist_ok=True)
        self._cli = process.bundled_cli()
        self._launcher = process.install_launcher(config.root / "bin")
        self._known = {p.name for p in self._sessions_dir.iterdir() if p.is_dir()}

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
        _authorize(caller, request.organization)
        state = self._session(request.session_id, request.organization, create=True)
        if state is None or not _may_see(caller, state):
            raise NotFound(f"session {request.session_id!r} does not exist")
        if state.turn is not None:
            raise TurnAlreadyRunning(
                f"session {request.session_id!r} is running turn {state.turn.turn_id!r}"
            )
        turn = Turn(state, request, self.config.permission_timeout_seconds)
        state.turn = turn
        try:
            workspace = self._workspace(request.workspace_id)
            if state.workspace_id != request.workspace_id:
                state.workspace_id = request.workspace_id
                self._save(state)
            agent, started = await self._process_for(turn, workspace)
        except BaseException:
            state.turn = None
            if not (state.config_dir / "projects").exists():  # it never ran: nothing to resume
                self._forget(state)
            raise
        self._turns.add(turn)
        turn.task = asyncio.create_task(self._drive(turn, agent, started))
        return turn

    def _workspace(self, workspace_id: str) -> Path:
        path = self._workspaces_dir / workspace_id
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WorkspaceUnavailable(f"workspace {workspace_id!r} is unavailable") from exc
        return path

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
        transcript = self._transcript_file(state, resume) if resume else None
        if transcript is None and resume and request.fork_transcript:
            transcript = await asyncio.to_thread(self._adopt, state, resume, workspace)
        if resume and transcript is None:
            raise TranscriptNotFound(
                f"transcript {resume!r} of session {state.session_id!r} is not on this replica"
            )
        new_id = "" if resume and not request.fork_transcript else str(uuid.uuid4())
        tag = uuid.uuid4().hex
        options = self._agent_options(turn, workspace, resume=resume, new_id=new_id, tag=tag)
        baseline = 0.0

        async def start() -> ClaudeSDKClient:
            nonlocal baseline
            # Read once the session's previous process (if any) has stopped and saved its total.
            if transcript is not None:
                baseline = await asyncio.to_thread(_saved_cost, transcript)
            return await self._connect(options, state.session_id)

        agent = await self.pool.start(state.session_id, key, tag, start)
        state.transcript_id = new_id or resume
        state.cost = CostMeter(baseline)
        return agent, True

    async def _connect(self, options: ClaudeAgentOptions, session_id: str) -> ClaudeSDKClient:
        client = ClaudeSDKClient(options)
        try:
            await client.connect()
        except ClaudeSDKError as exc:
            log.warning(
                "agent process failed to start", extra={"session": session_id}, exc_info=True
            )
            if "No conversation found" in str(exc):
                raise TranscriptNotFound(
                    f"the transcript {options.resume!r} was not found"
                ) from exc
            raise ProcessFailed("the agent process could not be started") from exc
        return client

    def _agent_options(
        self, turn: Turn, workspace: Path, *, resume: str, new_id: str, tag: str
    ) -> ClaudeAgentOptions:
        opts, state = turn.request.options, turn.session
        mode = _MODES.get(opts.permission_mode, "default")
        runtime_env = {
            **self.config.model_env,
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            # Keeps the model credentials from the CLI's tools; the CLI needs bubblewrap for it.
            "CLAUDE_CODE_SUBPROCESS_ENV_SCRUB": "1" if self.config.scrub_tool_env else "0",
            "CLAUDE_CONFIG_DIR": str(state.config_dir),
            "HOME": str(state.config_dir),
            process.TAG_VARIABLE: tag,
        }
        if mode == "bypassPermissions":
            runtime_env["IS_SANDBOX"] = "1"
        system_prompt: Any = None
        if opts.system_prompt:
            system_prompt = "\n\n".join(
                p for p in (opts.system_prompt, opts.append_system_prompt) if p
            )
        elif opts.append_system_prompt:
            system_prompt = {
                "type": "preset",
                "preset": "claude_code",
                "append": opts.append_system_prompt,
            }
        session = state  # the callbacks serve whichever turn the session runs now

        async def can_use_tool(
            tool_name: str, tool_input: dict[str, Any], context: ToolPermissionContext
        ) -> PermissionResult:
            current = session.turn
            if current is None:
                return PermissionResultDeny(message="no turn is running", interrupt=True)
            return await current.ask(tool_name, tool_input, context)

        async def pre_tool_use(
            hook_input: HookInput, tool_use_id: str | None, context: HookContext
        ) -> HookJSONOutput:
            current = session.turn
            tool_name = hook_input.get("tool_name")
            if current is None or not isinstance(tool_name, str):
                return {}
            return current.policy(tool_name)

        return ClaudeAgentOptions(
            model=opts.model or self.config.default_model,
            system_prompt=system_prompt,
            allowed_tools=list(opts.allowed_tools),
            disallowed_tools=list(opts.disallowed_tools),
            permission_mode=mode,
            mcp_servers={server.name: _mcp_config(server) for server in opts.mcp_servers},
            strict_mcp_config=True,
            setting_sources=[],
            max_turns=opts.max_turns or None,
            max_budget_usd=opts.max_budget_usd_micros / 1e6 if opts.max_budget_usd_micros else None,
            thinking=(
                {"type": "enabled", "budget_tokens": opts.max_thinking_tokens}
                if opts.max_thinking_tokens > 0
                else {"type": "disabled"}
            ),
            env=process.cli_environment(self._cli, dict(opts.env), runtime_env),
            cwd=workspace,
            cli_path=self._launcher,
            include_partial_messages=True,
            can_use_tool=can_use_tool,
            hooks={"PreToolUse": [HookMatcher(matcher=None, hooks=[pre_tool_use])]},
            resume=resume or None,
            fork_session=bool(resume and new_id),
            session_id=new_id or None,
            stderr=lambda line: log.debug(
                "agent stderr: %s", line, extra={"session": state.session_id}
            ),
        )

    # -- the turn itself --------------------------------------------------------------------------

    async def _drive(self, turn: Turn, agent: AgentProcess, started: bool) -> None:
        state = turn.session
        result: ResultMessage | None = None
        failure: pb.Error | None = None
        stop_process = False
        running: asyncio.Task[set[process.ProcessId]] | None = None
        reader = asyncio.create_task(self._read(turn, agent, started))
        interrupt = asyncio.create_task(turn.interrupt_requested.wait())
        try:
            await asyncio.wait({reader, interrupt}, return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                running = asyncio.create_task(agent.survey())  # what the turn runs right now
                stop_process = not await self._interrupt(turn, agent, reader)
            if reader.done():
                result, failure = reader.result()
            else:
                failure = ev.error(
                    code_pb2.UNAVAILABLE,
                    "PROCESS_CRASHED",
                    "the agent process ignored the interrupt and was killed",
                )
        except Exception as exc:  # a bug of ours: still end the turn properly
            log.exception("turn failed", extra={"session": state.session_id, "turn": turn.turn_id})
            failure = ev.error(
                code_pb2.INTERNAL, "SDK_ERROR", f"the turn failed: {type(exc).__name__}"
            )
        finally:
            interrupt.cancel()
            if not reader.done():
                reader.cancel()
            turn.interrupt_delivered.set()
            if running is not None:  # an interrupted turn leaves nothing running behind it
                process.kill_all(agent.strays(await running, await agent.survey()))
            # An interrupt that came as the turn succeeded anyway changes nothing.
            interrupted = turn.interrupt_requested.is_set() and not (
                result is not None and result.subtype == "success" and not result.is_error
            )
            cost = (
                state.cost.settle(result.total_cost_usd if result else None) if state.cost else 0.0
            )
            if result is not None and result.session_id:
                state.transcript_id = result.session_id
            turn.emit(
                turn_result=ev.turn_result(
                    result,
                    cost_usd=cost,
                    interrupted=interrupted,
                    transcript_id=state.transcript_id,
                    failure=failure,
                    elapsed_seconds=time.monotonic() - turn.started,
                )
            )
            if stop_process or turn.stop_process or failure is not None or result is None:
                await self.pool.discard(agent)
                state.cost = None if result is None else state.cost
            else:
                await agent.settle_residents()
                self.pool.checkin(agent)
            state.turn = None
            self._turns.discard(turn)
            turn.finished.set()
            turn.queue.put_nowait(None)

    async def _interrupt(self, turn: Turn, agent: AgentProcess, reader: asyncio.Task[Any]) -> bool:
        """Deliver the SDK interrupt and wait for the turn to wrap up; if it does not, stop the
        process. Returns whether the process is still usable."""
        grace = self.config.interrupt_grace_seconds
        try:
            await asyncio.wait_for(agent.client.interrupt(), grace)
        except Exception:
            log.warning("the SDK interrupt failed", extra={"session": turn.session.session_id})
        turn.interrupt_delivered.set()
        done, _ = await asyncio.wait({reader}, timeout=grace)
        if done:
            return True
        log.warning(
            "the agent ignored an interrupt; stopping it",
            extra={"session": turn.session.session_id},
        )
        await self.pool.discard(agent)
        await asyncio.wait({reader}, timeout=grace)
        return False

    async def _read(
        self, turn: Turn, agent: AgentProcess, started: bool
    ) -> tuple[ResultMessage | None, pb.Error | None]:
        """Send the prompt and turn the SDK's messages into events, up to the ResultMessage."""
        announced = False

        def announce(init: SystemMessage | None) -> None:
            nonlocal announced
            if not announced:
                announced = True
                started_event = ev.turn_started(
                    init,
                    transcript_id=turn.session.transcript_id,
                    model=turn.request.options.model or self.config.default_model,
                    process_started=started,
                )
                turn.emit(turn_started=started_event)
                for server in started_event.mcp_servers:
                    if server.status == "failed":
                        turn.emit(
                            error=ev.error(
                                code_pb2.UNAVAILABLE,
                                "MCP_SERVER_FAILED",
                                f"MCP server {server.name!r} could not be reached",
                            )
                        )

        try:
            if turn.interrupt_requested.is_set():
                announce(None)
                return None, None
            await agent.client.query(turn.request.prompt)
            async for message in agent.client.receive_messages():
                if not announced:
                    # Each prompt is answered from its own init message on; anything before it
                    # is left over from an earlier turn (a late subagent result) and skipped.
                    if isinstance(message, SystemMessage) and message.subtype == "init":
                        announce(message)
                    continue
                if isinstance(message, ResultMessage):
                    return message, None
                for event in turn.events.from_message(message):
                    turn.queue.put_nowait(event)
            announce(None)
            return None, ev.error(
                code_pb2.INTERNAL, "PROCESS_CRASHED", "the agent process ended without a result"
            )
        except asyncio.CancelledError:
            announce(None)
            raise
        except Exception as exc:
            announce(None)
            log.warning(
                "turn failed in the SDK", extra={"session": turn.session.session_id}, exc_info=True
            )
            return None, _failure(exc)

    # -- the other RPCs ---------------------------------------------------------------------------

    def _running(self, caller: Caller, session_id: str, turn_id: str) -> Turn:
        state = self._sessions.get(session_id)
        turn = state.turn if state is not None else None
        if turn is None or turn.turn_id != turn_id or not _may_see(caller, turn.session):
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
        state = self._session(session_id, "", create=False)
        if state is None:
            return False
        if not _may_see(caller, state):
            raise NotFound(f"session {session_id!r} does not exist")
        if state.turn is not None:
            raise FailedPrecondition(
                f"session {session_id!r} is running turn {state.turn.turn_id!r}: interrupt it",
                reason="TURN_ALREADY_RUNNING",
            )
        released = await self.pool.release(session_id)
        state.cost = None
        if delete_transcript:
            self._forget(state)
        return released

    def status(self) -> RuntimeStatus:
        return RuntimeStatus(
            replica_id=self.config.replica_id,
            draining=self.draining,
            pool_size=self.pool.size,
            live_processes=self.pool.live,
            busy_processes=self.pool.busy,
            open_sessions=len(self._known),
            running_turns=len(self._turns),
            pending_permission_requests=sum(t.permissions.pending_count for t in self._turns),
            sdk_version=claude_agent_sdk.__version__,
            cli_version=process.cli_version(self._cli),
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

    # -- sessions on disk -----------------------------------------------------------------------

    def _session(self, session_id: str, organization: str, *, create: bool) -> SessionState | None:
        """The session's state: in memory, else from its directory, else (``create``) new."""
        state = self._sessions.get(session_id)
        if state is not None:
            return state
        config_dir = self._sessions_dir / session_id
        marker = config_dir / SESSION_FILE
        state = SessionState(session_id, organization, config_dir)
        if marker.exists():
            try:
                saved = json.loads(marker.read_text())
                state.organization = str(saved["organization"])
                state.workspace_id = str(saved.get("workspace", ""))
            except (OSError, ValueError, KeyError):
                return None  # unreadable: nobody may touch it
        elif create:
            config_dir.mkdir(parents=True, exist_ok=True)
            self._save(state)
        else:
            return None
        self._sessions[session_id] = state
        self._known.add(session_id)
        return state

    def _save(self, state: SessionState) -> None:
        """What survives a restart: whose session it is (authorisation) and where it works."""
        (state.config_dir / SESSION_FILE).write_text(
            json.dumps({"organization": state.organization, "workspace": state.workspace_id})
        )

    def _forget(self, state: SessionState) -> None:
        """A deleted session: its transcript and its working directory go."""
        shutil.rmtree(state.config_dir, ignore_errors=True)
        if state.workspace_id:
            shutil.rmtree(self._workspaces_dir / state.workspace_id, ignore_errors=True)
        self._sessions.pop(state.session_id, None)
        self._known.discard(state.session_id)

    def _transcript_file(self, state: SessionState, transcript_id: str) -> Path | None:
        """The CLI keeps transcripts at ``projects/<cwd, sanitised>/<id>.jsonl`` (and finds one
        to resume in any project directory)."""
        return next(iter((state.config_dir / "projects").glob(f"*/{transcript_id}.jsonl")), None)

    def _adopt(self, state: SessionState, transcript_id: str, workspace: Path) -> Path | None:
        """A forked session's first turn branches from its parent: copy in the parent's
        transcript and, into an empty working directory, the parent's files. The parent must be
        a session of the same organisation on this replica."""
        for found in self._sessions_dir.glob(f"*/projects/*/{transcript_id}.jsonl"):
            parent = self._session(found.parents[2].name, "", create=False)
            if parent is None or parent is state or parent.organization != state.organization:
                continue
            target = state.config_dir / "projects" / found.parent.name / found.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(found, target)
            extras = found.with_suffix("")  # the transcript's own directory (subagents)
            if extras.is_dir():
                shutil.copytree(extras, target.with_suffix(""), dirs_exist_ok=True)
            files = self._workspaces_dir / parent.workspace_id if parent.workspace_id else None
            if files and files.is_dir() and files != workspace and not any(workspace.iterdir()):
                shutil.copytree(files, workspace, symlinks=True, dirs_exist_ok=True)
            return target
        return None


def _authorize(caller: Caller, organization: str) -> None:
    if not caller.is_superuser and caller.organization != organization:
        raise PermissionDenied(
            f"the caller acts for {caller.organization!r}, not {organization!r}",
            reason="ORGANIZATION_MISMATCH",
        )


def _may_see(caller: Caller, state: SessionState) -> bool:
    return caller.is_superuser or caller.organization == state.organization


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


def _mcp_config(server: options_pb.McpServer) -> McpServerConfig:
    if server.WhichOneof("transport") == "stdio":
        return {
            "type": "stdio",
            "command": server.stdio.command,
            "args": list(server.stdio.args),
            "env": dict(server.stdio.env),
        }
    if server.http.protocol == options_pb.McpHttpTransport.PROTOCOL_SSE:
        return {"type": "sse", "url": server.http.url, "headers": dict(server.http.headers)}
    return {"type": "http", "url": server.http.url, "headers": dict(server.http.headers)}


def _saved_cost(transcript: Path) -> float:
    """The cumulative cost the CLI saved in a transcript (its last ``cost-state`` entry)."""
    total = 0.0
    with contextlib.suppress(OSError), transcript.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if '"cost-state"' not in line:
                continue
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("type") == "cost-state":
                    total = float(entry.get("totalCostUSD") or 0.0)
    return total


def _failure(exc: BaseException) -> pb.Error:
    """The error a failed turn reports: the kind of failure, never what the CLI printed."""
    if isinstance(exc, ProcessError) and not isinstance(exc, ResultError):
        return ev.error(
            code_pb2.UNAVAILABLE,
            "PROCESS_CRASHED",
            f"the agent process exited unexpectedly (exit code {exc.exit_code})",
        )
    if isinstance(exc, CLIConnectionError):
        return ev.error(code_pb2.UNAVAILABLE, "PROCESS_CRASHED", "the agent process went away")
    return ev.error(code_pb2.INTERNAL, "SDK_ERROR", f"the agent failed ({type(exc).__name__})")
