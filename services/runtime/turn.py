"""One turn in its agent process: the prompt in, the SDK's messages out as events, the tool
permissions it asks for, an interrupt, and the one ending every turn has.

A turn runs in a task of its own (:meth:`Turn.run`), apart from the RunTurn call that asked for
it: the call reads the turn's events from :attr:`Turn.queue`. Every way a turn ends goes through
one ``finally`` that settles its cost, emits its ``turn_result`` and gives its process back to
the pool (or stops it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from claude_agent_sdk import ResultMessage, SystemMessage
from google.rpc import code_pb2

from corral.runtime.v1 import agent_options_pb2 as options_pb
from corral.runtime.v1 import runtime_event_pb2 as pb
from corral.services.runtime import events as ev
from corral.services.runtime import process
from corral.services.runtime.domain import (
    Behavior,
    Decision,
    DecisionSource,
    PermissionBook,
    PermissionRule,
    RuleAction,
    first_matching_rule,
)
from corral.services.runtime.pool import AgentProcess, ProcessPool
from corral.services.runtime.sdk import AgentProcessLost, RuleVerdict
from corral.services.runtime.store import SessionState

log = logging.getLogger("corral.runtime")
audit = logging.getLogger("corral.runtime.audit")

_ACTIONS = {
    options_pb.PermissionRule.ACTION_ALLOW: RuleAction.ALLOW,
    options_pb.PermissionRule.ACTION_DENY: RuleAction.DENY,
    options_pb.PermissionRule.ACTION_ASK: RuleAction.ASK,
}


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


class SessionGate:
    """The tool gate of a session's process: the callbacks serve whichever turn the session
    runs now (a process outlives its turns)."""

    def __init__(self, session: SessionState) -> None:
        self._session = session

    def rule_for(self, tool_name: str) -> RuleVerdict | None:
        turn = self._session.turn
        return None if turn is None else turn.rule_for(tool_name)

    async def ask(
        self, tool_name: str, tool_input: dict[str, Any], tool_use_id: str, reason: str
    ) -> Decision:
        turn = self._session.turn
        if turn is None:
            return Decision("", Behavior.DENY, DecisionSource.INTERRUPT, "no turn is running")
        return await turn.ask(tool_name, tool_input, tool_use_id, reason)


class Turn:
    """One running turn: its events, its permission requests, and how it is stopped."""

    def __init__(
        self,
        session: SessionState,
        request: TurnRequest,
        *,
        permission_timeout: float,
        interrupt_grace: float,
        model: str,
        charge_cost: bool = True,
    ) -> None:
        self.session = session
        self.charge_cost = charge_cost  # False: the result reports no cost (tokens still count)
        self.request = request
        self.turn_id = request.turn_id
        self.rules = [
            PermissionRule(rule.tool_pattern, _ACTIONS[rule.action])
            for rule in request.options.permission_rules
        ]
        timeout = request.options.permission_timeout.ToNanoseconds() / 1e9
        self.permission_timeout = timeout if timeout > 0 else permission_timeout
        self.interrupt_grace = interrupt_grace
        self.model = model
        self.events = ev.TurnEvents(request.turn_id)
        self.queue: asyncio.Queue[pb.RuntimeEvent | None] = asyncio.Queue()
        self.permissions = PermissionBook()
        self.interrupt_requested = asyncio.Event()
        self.interrupt_delivered = asyncio.Event()
        self.finished = asyncio.Event()
        self.delivered = asyncio.Event()  # its RunTurn stream is over (every event sent)
        self.stop_process = False
        self.started = time.monotonic()
        self.waited = 0.0  # seconds it waited for a process (turn_started says so)
        self.task: asyncio.Task[None] | None = None
        self.result: pb.TurnResult | None = None  # set as the turn ends

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

    # -- permissions (asked by the SDK while the turn runs) ---------------------------------------

    def rule_for(self, tool_name: str) -> RuleVerdict | None:
        """PreToolUse: the first matching rule decides (an ALLOW or DENY is decided here, an ASK
        goes on to :meth:`ask` whatever the permission mode); no rule leaves it to the SDK."""
        rule = first_matching_rule(self.rules, tool_name)
        if rule is None:
            return None
        reason = f"permission rule {rule.tool_pattern!r} {rule.action.value}s {tool_name}"
        if rule.action is not RuleAction.ASK:
            behavior = Behavior.ALLOW if rule.action is RuleAction.ALLOW else Behavior.DENY
            decision = Decision(
                self.permissions.next_policy_id(), behavior, DecisionSource.POLICY, reason
            )
            self.decided(decision, tool_name)
        return RuleVerdict(rule.action, reason)

    async def ask(
        self, tool_name: str, tool_input: dict[str, Any], tool_use_id: str, reason: str
    ) -> Decision:
        """can_use_tool: a PermissionRequest, then wait for a person, the timeout or an
        interrupt. Only a person's ALLOW allows."""
        if self.interrupt_requested.is_set():
            return Decision("", Behavior.DENY, DecisionSource.INTERRUPT, "the turn was interrupted")
        request = self.permissions.open(tool_name, tool_use_id, tool_input, self.permission_timeout)
        message = pb.PermissionRequest(
            id=request.request_id,
            tool_name=tool_name,
            tool_use_id=request.tool_use_id,
            input=ev.to_struct(tool_input),
            reason=reason,
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
        return decision

    # -- the turn in its process ------------------------------------------------------------------

    async def run(
        self,
        agent: AgentProcess,
        pool: ProcessPool,
        *,
        process_started: bool,
        on_end: Callable[[Turn], None],
    ) -> None:
        """Read the turn to its end (or interrupt it), then emit its result, give the process
        back (or stop it) and call ``on_end`` just before the event stream ends."""
        state = self.session
        result: ResultMessage | None = None
        failure: pb.Error | None = None
        stop_process = False
        running: asyncio.Task[set[process.ProcessId]] | None = None
        reader = asyncio.create_task(self._read(agent, process_started))
        interrupt = asyncio.create_task(self.interrupt_requested.wait())
        try:
            await asyncio.wait({reader, interrupt}, return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                running = asyncio.create_task(agent.survey())  # what the turn runs right now
                stop_process = not await self._interrupt(agent, pool, reader)
            if reader.done():
                result, failure = reader.result()
            else:
                failure = ev.error(
                    code_pb2.UNAVAILABLE,
                    "PROCESS_CRASHED",
                    "the agent process ignored the interrupt and was killed",
                )
        except Exception as exc:  # a bug of ours: still end the turn properly
            log.exception("turn failed", extra={"session": state.session_id, "turn": self.turn_id})
            failure = ev.error(
                code_pb2.INTERNAL, "SDK_ERROR", f"the turn failed: {type(exc).__name__}"
            )
        finally:
            interrupt.cancel()
            if not reader.done():
                reader.cancel()
            self.interrupt_delivered.set()
            try:
                await self._end(agent, pool, result, failure, stop_process, running)
            finally:  # whatever cleaning up raised, the session is free and the stream ends
                self._close(on_end)

    def end_unstarted(self, *, on_end: Callable[[Turn], None]) -> None:
        """Interrupted while it waited for a process: the turn ends having spent nothing."""
        self.result = ev.turn_result(
            None,
            cost_usd=0.0,
            interrupted=True,
            transcript_id=self.session.transcript_id,
            elapsed_seconds=time.monotonic() - self.started,
        )
        self.emit(turn_result=self.result)
        self.interrupt_delivered.set()
        self._close(on_end)

    def _close(self, on_end: Callable[[Turn], None]) -> None:
        """The session is free, ``on_end`` is told, and the event stream ends."""
        if self.session.turn is self:
            self.session.turn = None
        on_end(self)
        self.finished.set()
        self.queue.put_nowait(None)

    async def _end(
        self,
        agent: AgentProcess,
        pool: ProcessPool,
        result: ResultMessage | None,
        failure: pb.Error | None,
        stop_process: bool,
        running: asyncio.Task[set[process.ProcessId]] | None,
    ) -> None:
        """Stop what an interrupted turn left running, emit the result, and give the process
        back to the pool (or stop it)."""
        state = self.session
        try:
            if running is not None:  # an interrupted turn leaves nothing running behind it
                process.kill_all(agent.strays(await running, await agent.survey()))
        except Exception:
            log.exception("could not survey the turn's processes", extra={"turn": self.turn_id})
            stop_process = True  # stopping the agent takes whatever it started with it
        # An interrupt that came as the turn succeeded anyway changes nothing.
        interrupted = self.interrupt_requested.is_set() and not (
            result is not None and result.subtype == "success" and not result.is_error
        )
        cost = state.cost.settle(result.total_cost_usd if result else None) if state.cost else 0.0
        if result is not None and result.session_id:
            state.transcript_id = result.session_id
        self.result = ev.turn_result(
            result,
            cost_usd=cost if self.charge_cost else 0.0,
            interrupted=interrupted,
            transcript_id=state.transcript_id,
            failure=failure,
            elapsed_seconds=time.monotonic() - self.started,
        )
        self.emit(turn_result=self.result)
        if stop_process or self.stop_process or failure is not None or result is None:
            await pool.discard(agent)
            state.cost = None if result is None else state.cost
        else:
            await agent.settle_residents()
            pool.checkin(agent)

    async def _interrupt(
        self, agent: AgentProcess, pool: ProcessPool, reader: asyncio.Task[Any]
    ) -> bool:
        """Deliver the SDK interrupt and wait for the turn to wrap up; if it does not, stop the
        process. Returns whether the process is still usable."""
        grace = self.interrupt_grace
        try:
            await asyncio.wait_for(agent.client.interrupt(), grace)
        except Exception:
            log.warning("the SDK interrupt failed", extra={"session": self.session.session_id})
        self.interrupt_delivered.set()
        done, _ = await asyncio.wait({reader}, timeout=grace)
        if done:
            return True
        log.warning(
            "the agent ignored an interrupt; stopping it",
            extra={"session": self.session.session_id},
        )
        await pool.discard(agent)
        await asyncio.wait({reader}, timeout=grace)
        return False

    async def _read(
        self, agent: AgentProcess, process_started: bool
    ) -> tuple[ResultMessage | None, pb.Error | None]:
        """Send the prompt and turn the SDK's messages into events, up to the ResultMessage."""
        announced = False

        def announce(init: SystemMessage | None) -> None:
            nonlocal announced
            if not announced:
                announced = True
                self._announce(init, process_started)

        try:
            if self.interrupt_requested.is_set():
                announce(None)
                return None, None
            await agent.client.query(self.request.prompt)
            async for message in agent.client.receive_messages():
                if not announced:
                    # Each prompt is answered from its own init message on; anything before it
                    # is left over from an earlier turn (a late subagent result) and skipped.
                    if isinstance(message, SystemMessage) and message.subtype == "init":
                        announce(message)
                    continue
                if isinstance(message, ResultMessage):
                    return message, None
                for event in self.events.from_message(message):
                    self.queue.put_nowait(event)
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
                "turn failed in the SDK", extra={"session": self.session.session_id}, exc_info=True
            )
            if isinstance(exc, AgentProcessLost):
                return None, ev.error(code_pb2.UNAVAILABLE, "PROCESS_CRASHED", str(exc))
            return None, ev.error(
                code_pb2.INTERNAL, "SDK_ERROR", f"the agent failed ({type(exc).__name__})"
            )

    def _announce(self, init: SystemMessage | None, process_started: bool) -> None:
        """The turn_started event (from the init message, if one came), and an error event for
        each MCP server that could not be reached."""
        started = ev.turn_started(
            init,
            transcript_id=self.session.transcript_id,
            model=self.request.options.model or self.model,
            process_started=process_started,
        )
        started.wait_duration.CopyFrom(ev.seconds(self.waited))
        self.emit(turn_started=started)
        for server in started.mcp_servers:
            if server.status == "failed":
                self.emit(
                    error=ev.error(
                        code_pb2.UNAVAILABLE,
                        "MCP_SERVER_FAILED",
                        f"MCP server {server.name!r} could not be reached",
                    )
                )
