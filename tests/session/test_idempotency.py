"""request_id on every create (AIP-155), through a real gRPC server: a retry gets the first
result and creates nothing; the same request_id with another payload is REQUEST_ID_REUSED;
another caller's request_id is its own."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from corral.session.v1 import session_pb2
from corral.session.v1 import session_service_pb2 as pb
from tests.session.conftest import Stack
from tests.session.test_session_stream import collect, create
from tests.support.idempotency_contract import Caller, CreateCase, assert_idempotent_create

OWNER, OTHER = "alice", "ada"  # ada: an admin of the same organisation


@dataclass(frozen=True)
class Case:
    name: str
    # What the create acts on (a session name, or "" for CreateSession).
    setup: Callable[[Stack], Awaitable[str]]
    # One create as ``user`` with ``request_id`` and a payload that varies with ``variant``;
    # returns the created resource's name.
    call: Callable[[Stack, str, str, str, str], Awaitable[str]]
    # How many such resources exist.
    count: Callable[[Stack, str], Awaitable[int]]


def _auth(stack: Stack, user: str) -> tuple[tuple[str, str], ...]:
    return stack.auth(user, roles=("admin",) if user == OTHER else ("user",))


async def _nothing(stack: Stack) -> str:
    return ""


async def _session(stack: Stack) -> str:
    stack.runtime.auto_reply = "ok"
    return (await create(stack)).name


async def _session_with_a_conversation(stack: Stack) -> str:
    name = await _session(stack)
    await stack.stub.SendMessage(
        pb.SendMessageRequest(session=name, text="hi"), metadata=_auth(stack, OWNER)
    )
    await collect(stack, name)
    return name


async def _create_session(stack: Stack, _: str, request_id: str, variant: str, user: str) -> str:
    reply = await stack.stub.CreateSession(
        pb.CreateSessionRequest(
            session=session_pb2.Session(display_name=variant), request_id=request_id
        ),
        metadata=_auth(stack, user),
    )
    return str(reply.session.name)


async def _sessions(stack: Stack, _: str) -> int:
    listed = await stack.stub.ListSessions(pb.ListSessionsRequest(), metadata=_auth(stack, OTHER))
    return int(listed.total_size)


async def _send_message(
    stack: Stack, session: str, request_id: str, variant: str, user: str
) -> str:
    reply = await stack.stub.SendMessage(
        pb.SendMessageRequest(
            session=session,
            text=variant,
            request_id=request_id,
            busy_strategy=pb.SendMessageRequest.BUSY_STRATEGY_ENQUEUE,
        ),
        metadata=_auth(stack, user),
    )
    return str(reply.turn.name)


async def _turns(stack: Stack, session: str) -> int:
    listed = await stack.stub.ListTurns(
        pb.ListTurnsRequest(parent=session), metadata=_auth(stack, OTHER)
    )
    return len(listed.turns)


async def _fork_session(
    stack: Stack, session: str, request_id: str, variant: str, user: str
) -> str:
    reply = await stack.stub.ForkSession(
        pb.ForkSessionRequest(name=session, display_name=variant, request_id=request_id),
        metadata=_auth(stack, user),
    )
    return str(reply.session.name)


async def _forks(stack: Stack, session: str) -> int:
    listed = await stack.stub.ListSessions(
        pb.ListSessionsRequest(filter=f'parent_session = "{session}"'),
        metadata=_auth(stack, OTHER),
    )
    return int(listed.total_size)


CASES = [
    Case("CreateSession", _nothing, _create_session, _sessions),
    Case("SendMessage", _session, _send_message, _turns),
    Case("ForkSession", _session_with_a_conversation, _fork_session, _forks),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_request_id_makes_a_create_happen_once_per_caller(stack: Stack, case: Case) -> None:
    """The contract every Create keeps (tests/support/idempotency_contract.py)."""
    target = await case.setup(stack)

    async def call(caller: Caller, request_id: str, payload: str) -> str:
        return await case.call(stack, target, request_id, payload, caller.label)

    async def count() -> int:
        return await case.count(stack, target)

    await assert_idempotent_create(
        CreateCase(case.name, call, count),
        Caller(OWNER, _auth(stack, OWNER)),
        Caller(OTHER, _auth(stack, OTHER)),
    )
