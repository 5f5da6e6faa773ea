"""The session context's domain: sessions, turns, their state machines and who may touch them.

Plain Python. Event payloads are the public ``SessionEvent`` contract and stay opaque here:
the domain decides *when* things happen, the event mapper decides how they are written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from corral.libs.auth.caller import Caller
from corral.libs.errors import FailedPrecondition, NotFound, PermissionDenied
from corral.libs.etags import etag_of
from corral.libs.names import ResourcePattern

SESSION = ResourcePattern("sessions/{session}")
TURN = ResourcePattern("sessions/{session}/turns/{turn}")
POLICY = ResourcePattern("organizations/{organization}/agentPolicy")
ORGANIZATION = ResourcePattern("organizations/{organization}")


def now() -> datetime:
    return datetime.now(UTC)


class SessionState(StrEnum):
    IDLE = "IDLE"
    RUNNING = "RUNNING"
    AWAITING_PERMISSION = "AWAITING_PERMISSION"
    FAILED = "FAILED"
    ARCHIVED = "ARCHIVED"


# Where each state may go. FAILED still accepts messages: the next turn resumes the transcript.
TRANSITIONS: dict[SessionState, frozenset[SessionState]] = {
    SessionState.IDLE: frozenset({SessionState.RUNNING, SessionState.ARCHIVED}),
    SessionState.RUNNING: frozenset(
        {SessionState.AWAITING_PERMISSION, SessionState.IDLE, SessionState.FAILED}
    ),
    SessionState.AWAITING_PERMISSION: frozenset(
        {SessionState.RUNNING, SessionState.IDLE, SessionState.FAILED}
    ),
    SessionState.FAILED: frozenset(
        {SessionState.RUNNING, SessionState.IDLE, SessionState.ARCHIVED}
    ),
    SessionState.ARCHIVED: frozenset(),
}


class TurnState(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    AWAITING_PERMISSION = "AWAITING_PERMISSION"
    FINISHED = "FINISHED"


class BusyStrategy(StrEnum):
    REJECT = "REJECT"
    ENQUEUE = "ENQUEUE"
    INTERRUPT = "INTERRUPT"


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cost_usd_micros: int = 0

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_read_input_tokens += other.cache_read_input_tokens
        self.cache_creation_input_tokens += other.cache_creation_input_tokens
        self.cost_usd_micros += other.cost_usd_micros

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass
class Session:
    id: str
    organization: str
    owner: str
    display_name: str
    agent_options: bytes  # the serialised AgentOptions, secrets included (never echoed back)
    labels: dict[str, str]
    create_time: datetime
    update_time: datetime
    workspace: str
    state: SessionState = SessionState.IDLE
    archive_time: datetime | None = None
    last_sequence: int = 0
    usage: Usage = field(default_factory=Usage)
    turn_count: int = 0
    current_turn: str = ""
    transcript_id: str = ""
    parent_session: str = ""
    fork_sequence: int = 0
    failure_reason: str = ""
    failure_message: str = ""
    version: int = 1

    @property
    def name(self) -> str:
        return SESSION.format(self.id)

    @property
    def etag(self) -> str:
        return etag_of(self.name, self.version)

    @property
    def busy(self) -> bool:
        return self.state in (SessionState.RUNNING, SessionState.AWAITING_PERMISSION)

    def can_move_to(self, state: SessionState) -> bool:
        return state == self.state or state in TRANSITIONS[self.state]

    def move_to(self, state: SessionState) -> SessionState:
        """Change state; returns the previous one. Raises FAILED_PRECONDITION if not allowed."""
        if not self.can_move_to(state):
            raise FailedPrecondition(
                f"a session that is {self.state.value} cannot become {state.value}",
                reason="SESSION_STATE",
                metadata={"state": self.state.value},
            )
        previous, self.state = self.state, state
        return previous

    def require_active(self) -> None:
        if self.state == SessionState.ARCHIVED:
            raise FailedPrecondition("the session is archived", reason="SESSION_ARCHIVED")


@dataclass
class Turn:
    id: str
    session_id: str
    ordinal: int
    text: str
    sender: str
    create_time: datetime
    state: TurnState = TurnState.QUEUED
    start_time: datetime | None = None
    end_time: datetime | None = None
    first_sequence: int = 0
    last_sequence: int = 0
    usage: Usage = field(default_factory=Usage)
    result: bytes = b""  # the serialised TurnResult once finished
    reservation: str = ""  # the usage reservation held with identity while the turn runs
    driver: str = ""  # the session-service process that runs it (it holds the sender's token)
    lease_time: datetime | None = None  # renewed by that process while it works on the turn
    budget_hold: str = ""  # the reservation holding its spending cap while it runs

    @property
    def name(self) -> str:
        return TURN.format(self.session_id, self.id)


@dataclass
class AgentPolicyRecord:
    """An organisation's agent policy; the payload (servers, rules) is opaque to the domain."""

    organization: str
    payload: bytes
    version: int
    update_time: datetime

    @property
    def name(self) -> str:
        return f"{self.organization}/agentPolicy"

    @property
    def etag(self) -> str:
        return etag_of(self.name, self.version)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One entry of a session's event log: the serialised ``SessionEvent`` and what filters
    look at."""

    sequence: int
    turn_id: str
    type: str
    payload: bytes


def authorize_policy(caller: Caller, organization: str, *, write: bool) -> None:
    """Members read their organisation's policy; its admins and superusers change it."""
    if not caller.is_superuser and caller.organization != organization:
        raise NotFound(f"{organization}/agentPolicy does not exist", reason="POLICY_NOT_FOUND")
    if write and not caller.has_role("admin"):
        raise PermissionDenied(
            "only the organisation's admins change its agent policy", reason="ADMIN_REQUIRED"
        )


# -- who may see and change a session -------------------------------------------------------
# The owner, admins of the session's organisation and superusers see a session; viewers of the
# organisation read it. Nobody else learns that it exists (NOT_FOUND, never PERMISSION_DENIED).


def can_read(caller: Caller, session: Session) -> bool:
    if caller.is_superuser:
        return True
    if caller.organization != session.organization:
        return False
    return caller.subject == session.owner or caller.has_role("admin", "viewer")


def can_write(caller: Caller, session: Session) -> bool:
    if caller.is_superuser:
        return True
    if caller.organization != session.organization:
        return False
    if caller.has_role("admin"):
        return True
    return caller.subject == session.owner and caller.has_role("user")


def can_create(caller: Caller) -> bool:
    return caller.is_superuser or caller.has_role("admin", "user")


def authorize_read(caller: Caller, session: Session | None, name: str) -> Session:
    if session is None or not can_read(caller, session):
        raise NotFound(
            f"{name} does not exist", reason="SESSION_NOT_FOUND", metadata={"name": name}
        )
    return session


def authorize_write(caller: Caller, session: Session | None, name: str) -> Session:
    readable = authorize_read(caller, session, name)
    if not can_write(caller, readable):
        raise PermissionDenied(
            "your role may read this session but not change it", reason="SESSION_READ_ONLY"
        )
    return readable
