"""What the fault scenarios do as clients: users made by the organisation's admin, sessions and
turns through the edge (or one replica), event streams followed and resumed by sequence as a
client does, calls whose status codes are kept, and bounded waits on conditions."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf import field_mask_pb2

from corral.identity.v1 import identity_service_pb2 as ipb
from corral.identity.v1 import identity_service_pb2_grpc as irpc
from corral.identity.v1 import quota_pb2, role_pb2, user_pb2
from corral.session.v1 import agent_options_pb2, event_pb2, session_pb2, turn_pb2
from corral.session.v1 import session_service_pb2 as spb
from corral.session.v1 import session_service_pb2_grpc as srpc
from tests.support.grpc_tools import error_reason
from tests.support.platform import directive
from tests.support.topology import PASSWORD, Topology

T = TypeVar("T")
FAILED_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
SUCCEEDED = event_pb2.TurnResult.STATUS_SUCCEEDED
FAILED = event_pb2.TurnResult.STATUS_FAILED
_STREAMING_OR_END = ("text_delta", "turn_result")
POLL = 0.25  # seconds between polls; a user's calls stay well under the per-minute limit


def streamed_text(
    seconds: float, *, every: float = 0.25, tokens: tuple[int, int] | None = None
) -> str:
    """A prompt whose answer streams for about ``seconds``, a delta each ``every`` seconds,
    reporting ``tokens`` (input, output) as its usage when given."""
    steps: list[dict[str, Any]] = [
        {"text": "fault " * max(1, round(seconds / every)), "chunk": 6, "delay": every}
    ]
    if tokens is not None:
        steps.append({"usage": {"input_tokens": tokens[0], "output_tokens": tokens[1]}})
    return directive(*steps)


QUICK = directive({"text": "quick answer"})


async def until(
    probe: Callable[[], Awaitable[T | None]], *, within: float, what: str, every: float = POLL
) -> T:
    """Poll ``probe`` until it returns something other than None (its value), for at most
    ``within`` seconds; else fail saying ``what`` did not happen."""
    deadline = time.monotonic() + within
    while True:
        found = await probe()
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within:g} s: {what}")
        await asyncio.sleep(every)


def reason_of(error: grpc.aio.AioRpcError) -> str:
    try:
        return error_reason(error)
    except AssertionError:
        return ""


@dataclass(frozen=True)
class Outcome:
    """One call's end, as a client saw it."""

    what: str
    code: grpc.StatusCode
    reason: str = ""
    details: str = ""
    at: float = field(default_factory=time.monotonic)

    def __str__(self) -> str:
        return f"{self.what}: {self.code.name} {self.reason} {self.details[:160]}".rstrip()


def bad(outcomes: Sequence[Outcome]) -> list[str]:
    """The outcomes a caller must never get: INTERNAL or UNKNOWN."""
    return [str(o) for o in outcomes if o.code in FAILED_CODES]


def tally(outcomes: Sequence[Outcome]) -> dict[str, int]:
    return dict(Counter(f"{o.code.name}{'/' + o.reason if o.reason else ''}" for o in outcomes))


@dataclass(frozen=True)
class User:
    name: str
    email: str
    token: str

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)


class Client:
    """Calls into the topology: through the edge unless a target (one replica) is given."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._admin: User | None = None

    def sessions(self, target: str | None = None) -> srpc.SessionServiceStub:
        return srpc.SessionServiceStub(self.topology.channel(target or self.topology.edge))

    def identity(self, target: str | None = None) -> irpc.IdentityServiceStub:
        return irpc.IdentityServiceStub(self.topology.channel(target or self.topology.edge))

    async def login(self, email: str, password: str) -> User:
        reply = await self.identity().Login(
            ipb.LoginRequest(email=email, password=password), timeout=30
        )
        return User(reply.user.name, email, reply.token.access_token)

    async def admin(self) -> User:
        """The organisation's admin (a superuser), made by `corral admin`."""
        if self._admin is None:
            accounts = self.topology.accounts
            assert accounts is not None
            self._admin = await self.login(accounts.admin_email, accounts.admin_password)
        return self._admin

    async def new_users(self, count: int, label: str) -> list[User]:
        """``count`` users of the organisation, created by its admin, each signed in."""
        admin = await self.admin()
        accounts = self.topology.accounts
        assert accounts is not None
        tag = uuid.uuid4().hex[:8]

        async def one(i: int) -> User:
            email = f"{label}-{tag}-{i}@faults.test"
            await self.identity().CreateUser(
                ipb.CreateUserRequest(
                    parent=accounts.organization,
                    user=user_pb2.User(email=email, role=role_pb2.ROLE_USER, password=PASSWORD),
                    request_id=str(uuid.uuid4()),
                ),
                metadata=admin.auth,
                timeout=30,
            )
            return await self.login(email, PASSWORD)

        return list(await asyncio.gather(*(one(i) for i in range(count))))

    async def new_session(self, user: User, target: str | None = None, **options: Any) -> str:
        """A session of ``user``'s, with these agent options (``allowed_tools=["Bash"]``)."""
        session = session_pb2.Session(
            display_name="faults", agent_options=agent_options_pb2.AgentOptions(**options)
        )
        created = await self.sessions(target).CreateSession(
            spb.CreateSessionRequest(session=session),
            metadata=user.auth,
            timeout=30,
        )
        return str(created.session.name)

    async def send(
        self, user: User, session: str, text: str, target: str | None = None
    ) -> turn_pb2.Turn:
        reply = await self.sessions(target).SendMessage(
            spb.SendMessageRequest(session=session, text=text, request_id=str(uuid.uuid4())),
            metadata=user.auth,
            timeout=30,
        )
        return reply.turn

    async def turn(self, user: User, name: str, target: str | None = None) -> turn_pb2.Turn:
        reply = await self.sessions(target).GetTurn(
            spb.GetTurnRequest(name=name), metadata=user.auth, timeout=10
        )
        return reply.turn

    async def finished_turn(
        self,
        user: User,
        name: str,
        *,
        within: float,
        target: str | None = None,
        every: float = POLL,
    ) -> turn_pb2.Turn:
        """The turn once FINISHED (GetTurn polled; UNAVAILABLE answers are waited out)."""

        async def probe() -> turn_pb2.Turn | None:
            try:
                turn = await self.turn(user, name, target)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in FAILED_CODES:
                    raise
                return None
            return turn if turn.state == turn_pb2.Turn.STATE_FINISHED else None

        return await until(probe, within=within, what=f"{name} FINISHED", every=every)

    async def history(self, user: User, session: str) -> list[event_pb2.SessionEvent]:
        """Every persisted event of the session (ListSessionEvents, all pages)."""
        events: list[event_pb2.SessionEvent] = []
        token = ""
        while True:
            page = await self.sessions().ListSessionEvents(
                spb.ListSessionEventsRequest(parent=session, page_size=500, page_token=token),
                metadata=user.auth,
                timeout=30,
            )
            events.extend(page.session_events)
            token = page.next_page_token
            if not token:
                return events

    async def session_names(self, user: User) -> set[str]:
        """The names of every session ``user`` can list."""
        names: set[str] = set()
        token = ""
        while True:
            page = await self.sessions().ListSessions(
                spb.ListSessionsRequest(page_size=1000, page_token=token),
                metadata=user.auth,
                timeout=30,
            )
            names.update(s.name for s in page.sessions)
            token = page.next_page_token
            if not token:
                return names

    async def quota(self, name: str) -> quota_pb2.Quota:
        admin = await self.admin()
        reply = await self.identity().GetQuota(
            ipb.GetQuotaRequest(name=name), metadata=admin.auth, timeout=10
        )
        return reply.quota

    async def set_quota(self, name: str, **limits: int) -> None:
        admin = await self.admin()
        await self.identity().UpdateQuota(
            ipb.UpdateQuotaRequest(
                quota=quota_pb2.Quota(name=name, **limits),
                update_mask=field_mask_pb2.FieldMask(paths=list(limits)),
            ),
            metadata=admin.auth,
            timeout=30,
        )

    async def usage(self, subject: str) -> ipb.GetUsageReportResponse:
        admin = await self.admin()
        return await self.identity().GetUsageReport(
            ipb.GetUsageReportRequest(name=f"{subject}/usageReport"),
            metadata=admin.auth,
            timeout=10,
        )


class Watcher:
    """A client following a session's events: a stream from the last sequence it saw, resumed
    from that sequence whenever the stream ends, on the next of ``targets`` (the last one is
    kept). Heartbeats are not kept (they carry no new sequence)."""

    def __init__(self, client: Client, user: User, session: str, targets: Sequence[str]):
        self._client = client
        self._user = user
        self._session = session
        self._targets = list(targets)
        self.events: list[event_pb2.SessionEvent] = []
        self.endings: list[Outcome] = []  # how each stream ended
        self.streams = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def last_sequence(self) -> int:
        return self.events[-1].sequence if self.events else 0

    def start(self) -> Watcher:
        self._task = asyncio.create_task(self._follow())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self) -> None:
        while True:
            target = self._targets[min(self.streams, len(self._targets) - 1)]
            self.streams += 1
            call = self._client.sessions(target).StreamSessionEvents(
                spb.StreamSessionEventsRequest(
                    session=self._session, after_sequence=self.last_sequence
                ),
                metadata=self._user.auth,
            )
            try:
                async for response in call:
                    if not response.event.HasField("heartbeat"):
                        self.events.append(response.event)
                self.endings.append(Outcome(f"stream via {target}", grpc.StatusCode.OK))
            except grpc.aio.AioRpcError as exc:
                ending = Outcome(f"stream via {target}", exc.code(), reason_of(exc), exc.details())
                self.endings.append(ending)
                await asyncio.sleep(0.2)  # a client's pause before it reconnects

    async def until(
        self, test: Callable[[event_pb2.SessionEvent], bool], *, within: float, what: str
    ) -> event_pb2.SessionEvent:
        """The first event seen (so far or later) that passes ``test``."""

        async def probe() -> event_pb2.SessionEvent | None:
            if self._task is not None and self._task.done():
                self._task.result()  # the follower broke: say why
            return next((e for e in self.events if test(e)), None)

        return await until(probe, within=within, what=what, every=0.05)

    async def streaming(self, turn: turn_pb2.Turn, *, within: float) -> None:
        """Until the agent streams the turn's answer (a text_delta); fails at once if the turn
        ends first."""
        turn_id = turn.name.rsplit("/", 1)[1]
        event = await self.until(
            lambda e: e.turn_id == turn_id and e.WhichOneof("payload") in _STREAMING_OR_END,
            within=within,
            what=f"the agent streaming the answer of {turn.name}",
        )
        assert not event.HasField("turn_result"), f"the turn ended before it streamed: {event}"

    async def result_of(self, turn: turn_pb2.Turn, *, within: float) -> event_pb2.TurnResult:
        turn_id = turn.name.rsplit("/", 1)[1]
        event = await self.until(
            lambda e: e.turn_id == turn_id and e.HasField("turn_result"),
            within=within,
            what=f"the turn_result of {turn.name}",
        )
        return event.turn_result

    async def caught_up(self, within: float = 30) -> list[event_pb2.SessionEvent]:
        """Until this watcher has seen every event the session's history holds now (the
        history, returned)."""
        history = await self._client.history(self._user, self._session)
        last = history[-1].sequence if history else 0
        await self.until(
            lambda e: e.sequence >= last, within=within, what=f"the watcher seeing event {last}"
        )
        return history

    def duplicates_or_gaps(self) -> list[str]:
        """What breaks "every event exactly once, in order" in what this watcher saw."""
        problems = []
        expected = self.events[0].sequence if self.events else 1
        if expected != 1:
            problems.append(f"the first event seen is {expected}, not 1")
        for event in self.events:
            if event.sequence != expected:
                kind = "duplicate" if event.sequence < expected else "gap"
                problems.append(f"{kind}: saw {event.sequence} where {expected} was next")
            expected = event.sequence + 1
        return problems


def same_events(
    seen: Sequence[event_pb2.SessionEvent], stored: Sequence[event_pb2.SessionEvent]
) -> list[str]:
    """Events a client saw that the history does not hold (missing or changed)."""
    by_sequence = {e.sequence: e for e in stored}
    problems = []
    for event in seen:
        kept = by_sequence.get(event.sequence)
        if kept is None:
            problems.append(f"event {event.sequence} ({event.WhichOneof('payload')}) is gone")
        elif kept.SerializeToString(deterministic=True) != event.SerializeToString(
            deterministic=True
        ):
            problems.append(f"event {event.sequence} changed")
    return problems


async def attempt(what: str, call: Awaitable[T]) -> tuple[Outcome, T | None]:
    """Run one call; how it ended, and its answer when it succeeded."""
    try:
        answer = await call
    except grpc.aio.AioRpcError as exc:
        return Outcome(what, exc.code(), reason_of(exc), exc.details() or ""), None
    return Outcome(what, grpc.StatusCode.OK), answer


async def outcome_of(what: str, call: Awaitable[Any]) -> Outcome:
    return (await attempt(what, call))[0]


async def noted(problems: list[str], wait: Awaitable[T]) -> T | None:
    """``wait``'s value; when it fails (a bounded wait that ran out), its message goes to
    ``problems`` and the answer is None, so a scenario reports everything it found."""
    try:
        return await wait
    except AssertionError as exc:
        problems.append(str(exc))
        return None


class Prober:
    """A client calling a read and a create over and over, through the edge and to each
    replica directly, keeping every outcome and the sessions it was told were created."""

    def __init__(self, client: Client, user: User, session: str) -> None:
        self._client = client
        self._user = user
        self._session = session
        self.outcomes: list[Outcome] = []
        self.created: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Prober:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        topology = self._client.topology
        targets = [topology.edge, *(s.target for s in topology.sessions)]
        auth = self._user.auth
        while True:
            for target in targets:
                stub = self._client.sessions(target)
                get = stub.GetSession(spb.GetSessionRequest(name=self._session), metadata=auth)
                self.outcomes.append(await outcome_of(f"GetSession via {target}", get))
                create = stub.CreateSession(
                    spb.CreateSessionRequest(session=session_pb2.Session(display_name="probe")),
                    metadata=auth,
                    timeout=10,
                )
                outcome, created = await attempt(f"CreateSession via {target}", create)
                self.outcomes.append(outcome)
                if created is not None:
                    self.created.append(created.session.name)
                await asyncio.sleep(0.8)  # a user's pace: well under the per-minute limit
