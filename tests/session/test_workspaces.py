"""The session's workspace in storage, through a real gRPC server with storage faked at its port
(tests/e2e/test_workspace_files.py runs the real one): made at CreateSession, copied at
ForkSession, deleted with the session through the outbox; what each refusal looks like; and no
workspace outlives a session that was never stored."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import grpc
import pytest
from grpc_status import rpc_status

from corral.services.session.domain import now
from corral.session.v1 import session_pb2
from corral.session.v1 import session_service_pb2 as pb
from tests.session.conftest import Stack
from tests.session.test_idempotency import _session_with_a_conversation
from tests.session.test_session_stream import create
from tests.support.grpc_tools import error_reason


def _details(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    return [d.type_url.rsplit(".", 1)[-1] for d in status.details]


def _workspace(session: str) -> str:
    return "workspaces/" + session.removeprefix("sessions/")


async def _sessions(stack: Stack) -> list[str]:
    listed = await stack.stub.ListSessions(pb.ListSessionsRequest(), metadata=stack.auth())
    return [s.name for s in listed.sessions]


async def _fork(stack: Stack, session: str) -> pb.ForkSessionResponse:
    return await stack.stub.ForkSession(
        pb.ForkSessionRequest(name=session, request_id=str(uuid.uuid4())), metadata=stack.auth()
    )


async def test_a_session_gets_its_own_workspace_on_its_owners_quota(stack: Stack) -> None:
    session = await create(stack)
    assert session.workspace == _workspace(session.name)
    assert stack.workspaces.workspaces == {session.workspace: "organizations/acme/users/alice"}


async def test_storage_down_is_unavailable_and_leaves_nothing_behind(stack: Stack) -> None:
    stack.workspaces.down = True
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await create(stack)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(refused.value) == "WORKSPACE_UNAVAILABLE"
    assert await _sessions(stack) == []

    # Storage made it, but its answer was lost: the session is not stored, and the workspace
    # is deleted through the outbox.
    stack.workspaces.down, stack.workspaces.lost = False, 1
    with pytest.raises(grpc.aio.AioRpcError) as lost:
        await create(stack)
    assert error_reason(lost.value) == "WORKSPACE_UNAVAILABLE"
    (made,) = stack.workspaces.made
    await stack.workspaces.wait(lambda: made in stack.workspaces.deleted)
    assert stack.workspaces.workspaces == {} and await _sessions(stack) == []


async def test_a_full_storage_quota_is_quota_exceeded(stack: Stack) -> None:
    stack.workspaces.full = True
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await create(stack)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(refused.value) == "QUOTA_EXCEEDED"
    assert "QuotaFailure" in _details(refused.value)
    assert await _sessions(stack) == [] and stack.workspaces.workspaces == {}


async def test_a_retried_create_makes_one_session_and_keeps_one_workspace(stack: Stack) -> None:
    """Two CreateSession calls with one request_id, both past storage before either stores its
    session: one wins, the other answers with its session, and the loser's workspace goes."""
    stack.workspaces.gate = asyncio.Event()
    request = pb.CreateSessionRequest(
        session=session_pb2.Session(display_name="twice"), request_id=str(uuid.uuid4())
    )
    calls = [
        asyncio.ensure_future(stack.stub.CreateSession(request, metadata=stack.auth()))
        for _ in range(2)
    ]
    await stack.workspaces.wait(lambda: stack.workspaces.waiting == 2)
    stack.workspaces.gate.set()
    first, second = await asyncio.gather(*calls)
    assert first.session.name == second.session.name
    kept = first.session.workspace
    await stack.workspaces.wait(lambda: len(stack.workspaces.deleted) == 1)
    assert list(stack.workspaces.workspaces) == [kept]
    assert await _sessions(stack) == [first.session.name]


async def test_a_fork_copies_the_workspace_for_its_owner(stack: Stack) -> None:
    parent = await _session_with_a_conversation(stack)
    child = (await _fork(stack, parent)).session
    assert child.workspace == _workspace(child.name)
    assert stack.workspaces.copied == {child.workspace: _workspace(parent)}

    stack.workspaces.full = True
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _fork(stack, parent)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(refused.value) == "QUOTA_EXCEEDED"
    assert "QuotaFailure" in _details(refused.value)
    stack.workspaces.full, stack.workspaces.down = False, True
    with pytest.raises(grpc.aio.AioRpcError) as down:
        await _fork(stack, parent)
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(down.value) == "WORKSPACE_UNAVAILABLE"
    assert sorted(await _sessions(stack)) == sorted([parent, child.name])

    # A parent whose workspace was deleted in storage gives its fork an empty one.
    stack.workspaces.down = False
    del stack.workspaces.workspaces[_workspace(parent)]
    orphan = (await _fork(stack, parent)).session
    assert orphan.workspace in stack.workspaces.workspaces
    assert orphan.workspace not in stack.workspaces.copied


async def test_a_delete_takes_the_workspace_now_or_once_storage_is_back(stack: Stack) -> None:
    gone = await create(stack)
    await stack.stub.DeleteSession(pb.DeleteSessionRequest(name=gone.name), metadata=stack.auth())
    assert stack.workspaces.deleted == [gone.workspace]  # before the call answered

    waiting = await create(stack)
    stack.workspaces.down = True
    await stack.stub.DeleteSession(
        pb.DeleteSessionRequest(name=waiting.name), metadata=stack.auth()
    )
    assert waiting.workspace in stack.workspaces.workspaces
    assert await _sessions(stack) == []

    stack.workspaces.down = False
    later = stack.make_service(clock=lambda: now() + timedelta(minutes=10))
    try:
        assert await later.outbox.drain() == 1  # another replica's retry loop, once it is due
    finally:
        await later.close()
    assert stack.workspaces.deleted == [gone.workspace, waiting.workspace]
    assert stack.workspaces.workspaces == {}


async def test_only_the_owner_side_changes_a_sessions_workspace(stack: Stack) -> None:
    """Another organisation's people never reach storage through the session API."""
    mine = await _session_with_a_conversation(stack)
    outsider = stack.auth("mallory", org="organizations/globex", roles=("admin",))
    for call in (
        stack.stub.ForkSession(pb.ForkSessionRequest(name=mine), metadata=outsider),
        stack.stub.DeleteSession(pb.DeleteSessionRequest(name=mine), metadata=outsider),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    viewer = stack.auth("vic", roles=("viewer",))
    with pytest.raises(grpc.aio.AioRpcError) as read_only:
        await stack.stub.ForkSession(pb.ForkSessionRequest(name=mine), metadata=viewer)
    assert read_only.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert list(stack.workspaces.workspaces) == [_workspace(mine)]
    assert stack.workspaces.copied == {} and stack.workspaces.deleted == []
