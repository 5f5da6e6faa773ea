"""The runtime's rules, in plain Python: tool names, permission policy, pending decisions, cost.

Nothing here imports grpc, protobuf or the SDK. The turn (``turn``) drives the SDK and maps what
happens onto events; this module decides what is allowed and keeps the books.
"""

from __future__ import annotations

import asyncio
import enum
import fnmatch
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

from corral.libs.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
)


def mcp_server_of(tool_name: str) -> str:
    """``mcp__github__create_issue`` -> ``github``; empty for built-in tools."""
    if not tool_name.startswith("mcp__"):
        return ""
    server, _, _ = tool_name[len("mcp__") :].partition("__")
    return server


# --- errors the RPCs answer with (reasons: corral.runtime.v1.ErrorReason) --------------------


class TurnAlreadyRunning(AlreadyExists):
    default_reason = "TURN_ALREADY_RUNNING"


class TurnNotFound(NotFound):
    default_reason = "TURN_NOT_FOUND"


class PermissionRequestNotPending(FailedPrecondition):
    default_reason = "PERMISSION_REQUEST_NOT_PENDING"


class TranscriptNotFound(FailedPrecondition):
    default_reason = "TRANSCRIPT_NOT_FOUND"


class WorkspaceUnavailable(FailedPrecondition):
    default_reason = "WORKSPACE_UNAVAILABLE"


class PoolExhausted(ResourceExhausted):
    default_reason = "POOL_EXHAUSTED"


class Draining(Unavailable):
    default_reason = "DRAINING"


class ProcessFailed(Unavailable):
    """The agent process could not be started."""

    default_reason = "PROCESS_CRASHED"


# --- tool permission policy ------------------------------------------------------------------


class RuleAction(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    ASK = "ask"


@dataclass(frozen=True)
class PermissionRule:
    """``tool_pattern`` is a case-sensitive shell glob over the tool name."""

    tool_pattern: str
    action: RuleAction

    def matches(self, tool_name: str) -> bool:
        return fnmatch.fnmatchcase(tool_name, self.tool_pattern)


def first_matching_rule(rules: Iterable[PermissionRule], tool_name: str) -> PermissionRule | None:
    """The rule that decides a call: the first that matches; None leaves it to the SDK."""
    return next((rule for rule in rules if rule.matches(tool_name)), None)


class Behavior(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"


class DecisionSource(enum.Enum):
    USER = "user"
    POLICY = "policy"
    TIMEOUT = "timeout"
    INTERRUPT = "interrupt"


@dataclass(frozen=True)
class Decision:
    """How a permission request was decided; ``updated_input`` replaces the tool input (allow)."""

    request_id: str
    behavior: Behavior
    source: DecisionSource
    message: str = ""
    decided_by: str = ""
    updated_input: Mapping[str, Any] | None = None


@dataclass
class PendingPermission:
    """A ``can_use_tool`` call waiting for a person. Resolved once: by a decision, the timeout
    (deny) or an interrupt (deny); never silently allowed."""

    request_id: str
    tool_name: str
    tool_use_id: str
    tool_input: Mapping[str, Any]
    timeout_seconds: float
    expire_time: float = 0.0
    outcome: asyncio.Future[Decision] = field(default_factory=lambda: asyncio.Future())

    def __post_init__(self) -> None:
        self.expire_time = time.time() + self.timeout_seconds

    @property
    def pending(self) -> bool:
        return not self.outcome.done()

    def resolve(self, decision: Decision) -> bool:
        """Deliver ``decision``; False if the request was already decided."""
        if self.outcome.done():
            return False
        self.outcome.set_result(decision)
        return True


class PermissionBook:
    """The permission requests of one turn: pending ones, and decided ones (so a late answer
    gets FAILED_PRECONDITION, an unknown id NOT_FOUND)."""

    def __init__(self) -> None:
        self._requests: dict[str, PendingPermission] = {}

    def open(
        self,
        tool_name: str,
        tool_use_id: str,
        tool_input: Mapping[str, Any],
        timeout_seconds: float,
    ) -> PendingPermission:
        request = PendingPermission(
            request_id=_request_id(),
            tool_name=tool_name,
            tool_use_id=tool_use_id,
            tool_input=tool_input,
            timeout_seconds=timeout_seconds,
        )
        self._requests[request.request_id] = request
        return request

    def next_policy_id(self) -> str:
        """An id for a decision a policy rule made without a request."""
        return _request_id()

    def decide(self, request_id: str, decision: Decision) -> None:
        request = self._requests.get(request_id)
        if request is None:
            raise NotFound(
                f"permission request {request_id!r} is unknown in this turn",
                reason="TURN_NOT_FOUND",
                metadata={"permission_request_id": request_id},
            )
        if not request.resolve(decision):
            raise PermissionRequestNotPending(
                f"permission request {request_id!r} was already decided",
                metadata={"permission_request_id": request_id},
            )

    def deny_all(self, source: DecisionSource, message: str) -> None:
        for request in self._requests.values():
            request.resolve(Decision(request.request_id, Behavior.DENY, source, message))

    @property
    def pending_count(self) -> int:
        return sum(1 for request in self._requests.values() if request.pending)


# --- cost ------------------------------------------------------------------------------------


def micro_usd(amount: float | None) -> int:
    return max(0, round((amount or 0.0) * 1_000_000))


@dataclass
class CostMeter:
    """The SDK reports ``total_cost_usd`` cumulatively for a transcript (a resumed process starts
    from the transcript's saved total), so a turn costs the difference to the previous total.
    One meter per process: ``started_usd`` is the total when it started."""

    started_usd: float = 0.0
    total_usd: float = field(default=-1.0)

    def __post_init__(self) -> None:
        if self.total_usd < 0:
            self.total_usd = self.started_usd

    @property
    def spent_in_process(self) -> float:
        return self.total_usd - self.started_usd

    def settle(self, reported_total_usd: float | None) -> float:
        """Record the total after a turn; returns what that turn cost."""
        if reported_total_usd is None:
            return 0.0
        cost = max(0.0, reported_total_usd - self.total_usd)
        self.total_usd = max(self.total_usd, reported_total_usd)
        return cost


def _request_id() -> str:
    """Unique across turns and processes: the session keeps every request of its history."""
    return f"perm-{uuid4().hex[:20]}"
