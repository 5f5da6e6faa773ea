"""A session's workspace end to end: identity, storage, runtime and session over gRPC, the real
Claude Agent SDK and CLI (sandboxed) against the offline model. The session service asks storage
for the workspace at CreateSession, copies it on ForkSession and deletes it with the session;
the agent works in the directory storage made, so what it writes is in the Files API at once,
and what a person uploads is the agent's to read and change. Also the refusals: storage down,
a full storage quota, and another organisation's people."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from corral.identity.v1 import identity_service_pb2 as ipb
from corral.identity.v1 import quota_pb2
from corral.session.v1 import event_pb2
from corral.session.v1 import session_service_pb2 as spb
from corral.storage.v1 import storage_service_pb2 as pb
from corral.storage.v1 import storage_service_pb2_grpc as rpc
from tests.security.conftest import World, populate
from tests.support.grpc_tools import error_reason
from tests.support.platform import directive, running_platform

AGENT_IDS = (10001, 10001)  # CORRAL_RUNTIME_AGENT_UID/GID, the defaults
Event = event_pb2.SessionEvent


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with running_platform(tmp_path) as platform:
        yield await populate(platform)


def storage(world: World) -> rpc.StorageServiceStub:
    return rpc.StorageServiceStub(world.platform.channel("storage"))


def bash(command: str, then: str = "Done.") -> str:
    return directive({"tool": "Bash", "input": {"command": command}}, {"text": then})


async def turn(
    world: World, principal: str, session: str, text: str, *, nth: int = 1
) -> list[Event]:
    """Send ``text`` and wait for its turn's result (the session's ``nth``)."""
    await world.say(principal, session, text)
    events = await world.turn_results(principal, session, count=nth)
    result = [e for e in events if e.HasField("turn_result")][-1].turn_result
    assert result.status == event_pb2.TurnResult.STATUS_SUCCEEDED, events
    return events


def tool_output(events: list[Event]) -> str:
    results = [e.tool_result for e in events if e.HasField("tool_result")]
    assert results and not results[-1].is_error, results
    return str(results[-1].content)


async def download(world: World, principal: str, name: str) -> bytes:
    call = storage(world).DownloadFileContent(
        pb.DownloadFileContentRequest(name=name), metadata=world.auth(principal)
    )
    return b"".join([chunk.data async for chunk in call])


async def paths(world: World, principal: str, workspace: str) -> dict[str, str]:
    """path -> file name of every file in ``workspace``, as ``principal`` lists them."""
    listed = await storage(world).ListFiles(
        pb.ListFilesRequest(parent=workspace), metadata=world.auth(principal)
    )
    return {f.path: f.name for f in listed.files}


async def workspace_of(world: World, session: str) -> str:
    got = await world.platform.sessions.GetSession(
        spb.GetSessionRequest(name=session), metadata=world.auth("user")
    )
    return str(got.session.workspace)


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, error
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in {error}")


def has_detail(error: grpc.aio.AioRpcError, kind: type) -> bool:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    return status is not None and any(d.Is(kind.DESCRIPTOR) for d in status.details)


async def test_a_file_the_agent_writes_is_listed_and_downloaded_at_once(world: World) -> None:
    session = await world.new_session("user", allowed_tools=["Bash"])
    workspace = await workspace_of(world, session)
    assert workspace == "workspaces/" + session.removeprefix("sessions/")
    made = await storage(world).GetWorkspace(
        pb.GetWorkspaceRequest(name=workspace), metadata=world.auth("user")
    )
    assert made.workspace.owner == world.names["user"]
    assert made.workspace.organization == "organizations/acme"
    assert made.workspace.session == session
    assert await paths(world, "user", workspace) == {}

    await turn(
        world, "user", session, bash("mkdir -p out && printf 'forty-two\\n' > out/result.txt")
    )

    files = await paths(world, "user", workspace)
    assert list(files) == ["out/result.txt"]
    assert await download(world, "user", files["out/result.txt"]) == b"forty-two\n"
    # The agent's working directory is the workspace storage made (where the console looks).
    on_disk = world.workspace(session) / "out" / "result.txt"
    assert on_disk.read_bytes() == b"forty-two\n"
    if os.geteuid() == 0:  # the agent ran as the agent user, in the sandbox
        assert (on_disk.stat().st_uid, on_disk.stat().st_gid) == AGENT_IDS


async def test_an_uploaded_file_is_the_agents_to_read_and_change(world: World) -> None:
    session = await world.new_session("user", allowed_tools=["Bash"])
    workspace = await workspace_of(world, session)
    await storage(world).WriteFile(
        pb.WriteFileRequest(parent=workspace, path="notes/in.txt", data=b"from the person\n"),
        metadata=world.auth("user"),
    )
    if os.geteuid() == 0:  # storage as root gives what it writes to the agent user
        for path in (world.workspace(session) / "notes", world.workspace(session) / "notes/in.txt"):
            assert (path.stat().st_uid, path.stat().st_gid) == AGENT_IDS

    events = await turn(
        world,
        "user",
        session,
        bash("cat notes/in.txt && echo 'and the agent' >> notes/in.txt && touch notes/new.txt"),
    )

    assert "from the person" in tool_output(events)
    files = await paths(world, "user", workspace)
    assert sorted(files) == ["notes/in.txt", "notes/new.txt"]
    assert await download(world, "user", files["notes/in.txt"]) == (
        b"from the person\nand the agent\n"
    )


async def test_a_fork_copies_the_files_and_a_delete_removes_them(world: World) -> None:
    parent = await world.new_session("user", allowed_tools=["Bash"])
    await turn(world, "user", parent, bash("printf 'jam\\n' > pantry.txt && chmod +x pantry.txt"))
    parent_workspace = await workspace_of(world, parent)

    forked = await world.platform.sessions.ForkSession(
        spb.ForkSessionRequest(name=parent, request_id=str(uuid.uuid4())),
        metadata=world.auth("user"),
    )
    child = forked.session.name
    child_workspace = forked.session.workspace
    assert child_workspace == "workspaces/" + child.removeprefix("sessions/")
    copy = await storage(world).GetWorkspace(
        pb.GetWorkspaceRequest(name=child_workspace), metadata=world.auth("user")
    )
    assert copy.workspace.source_workspace == parent_workspace
    assert list(await paths(world, "user", child_workspace)) == ["pantry.txt"]
    assert os.access(world.workspace(child) / "pantry.txt", os.X_OK)  # the mode came along

    events = await turn(world, "user", child, bash("cat pantry.txt && echo fork > mine.txt"))
    assert "jam" in tool_output(events)
    assert sorted(await paths(world, "user", child_workspace)) == ["mine.txt", "pantry.txt"]
    assert list(await paths(world, "user", parent_workspace)) == ["pantry.txt"]  # a copy

    await world.platform.sessions.DeleteSession(
        spb.DeleteSessionRequest(name=parent), metadata=world.auth("user")
    )
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await storage(world).GetWorkspace(
            pb.GetWorkspaceRequest(name=parent_workspace), metadata=world.auth("user")
        )
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(gone.value) == "WORKSPACE_NOT_FOUND"
    assert not world.workspace(parent).exists()
    assert sorted(await paths(world, "user", child_workspace)) == ["mine.txt", "pantry.txt"]


async def test_storage_down_refuses_new_sessions_and_a_delete_waits_for_it(world: World) -> None:
    kept = await world.new_session("user")
    kept_workspace = await workspace_of(world, kept)
    await world.platform.apps["storage"].stop(0)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await world.new_session("user")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(refused.value)
    assert (info.reason, info.domain) == ("WORKSPACE_UNAVAILABLE", "corral.dev")
    assert has_detail(refused.value, error_details_pb2.RetryInfo)

    # A delete still answers OK: the workspace's deletion waits in the outbox for storage.
    await world.platform.sessions.DeleteSession(
        spb.DeleteSessionRequest(name=kept), metadata=world.auth("user")
    )
    assert world.workspace(kept).is_dir()
    await world.platform.restart("storage")
    async with asyncio.timeout(90):  # the outbox retries with backoff (1 s, 2 s, 4 s, ...)
        while True:
            if not world.workspace(kept).exists():
                break
            await asyncio.sleep(0.2)
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await storage(world).GetWorkspace(
            pb.GetWorkspaceRequest(name=kept_workspace), metadata=world.auth("user")
        )
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert await world.new_session("user")  # and sessions can be made again


async def test_a_full_storage_quota_refuses_a_new_session_and_a_fork(world: World) -> None:
    parent = await world.new_session("user")
    parent_workspace = await workspace_of(world, parent)
    await storage(world).WriteFile(
        pb.WriteFileRequest(parent=parent_workspace, path="big.bin", data=b"x" * 1000),
        metadata=world.auth("user"),
    )
    await turn(world, "user", parent, "hello")  # a conversation to fork

    async def limit(storage_bytes: int) -> None:
        await world.platform.identity.UpdateQuota(
            ipb.UpdateQuotaRequest(
                quota=quota_pb2.Quota(
                    name=f"{world.names['user']}/quota", storage_bytes=storage_bytes
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["storage_bytes"]),
            ),
            metadata=world.platform.auth,
        )

    await limit(1500)  # room for the parent's 1000 bytes, not for a copy of them
    with pytest.raises(grpc.aio.AioRpcError) as no_copy:
        await world.platform.sessions.ForkSession(
            spb.ForkSessionRequest(name=parent, request_id=str(uuid.uuid4())),
            metadata=world.auth("user"),
        )
    assert no_copy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(no_copy.value).reason == "QUOTA_EXCEEDED"
    assert has_detail(no_copy.value, error_details_pb2.QuotaFailure)

    await limit(1000)  # not a byte left
    with pytest.raises(grpc.aio.AioRpcError) as no_room:
        await world.new_session("user")
    assert no_room.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(no_room.value).reason == "QUOTA_EXCEEDED"
    assert has_detail(no_room.value, error_details_pb2.QuotaFailure)
    listed = await world.platform.sessions.ListSessions(
        spb.ListSessionsRequest(), metadata=world.auth("user")
    )
    assert [s.name for s in listed.sessions] == [parent]  # nothing half-made is left
    assert await world.new_session("admin")  # the organisation's others are not held back


async def test_another_organisations_people_cannot_see_the_workspace(world: World) -> None:
    session = await world.new_session("user", allowed_tools=["Bash"])
    workspace = await workspace_of(world, session)
    await storage(world).WriteFile(
        pb.WriteFileRequest(parent=workspace, path="secret.txt", data=b"acme only\n"),
        metadata=world.auth("user"),
    )
    name = (await paths(world, "user", workspace))["secret.txt"]

    for outsider in ("other_user", "other_admin"):
        who = world.auth(outsider)
        for attempt in (
            storage(world).GetWorkspace(pb.GetWorkspaceRequest(name=workspace), metadata=who),
            storage(world).ListFiles(pb.ListFilesRequest(parent=workspace), metadata=who),
            storage(world).GetFile(pb.GetFileRequest(name=name), metadata=who),
            storage(world).WriteFile(
                pb.WriteFileRequest(parent=workspace, path="x.txt", data=b"x"), metadata=who
            ),
            world.platform.sessions.ForkSession(
                spb.ForkSessionRequest(name=session, request_id=str(uuid.uuid4())), metadata=who
            ),
            world.platform.sessions.DeleteSession(
                spb.DeleteSessionRequest(name=session), metadata=who
            ),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await attempt
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND, outsider
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await download(world, outsider, name)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await storage(world).ListWorkspaces(pb.ListWorkspacesRequest(), metadata=who)
        assert workspace not in [w.name for w in listed.workspaces]

    # Inside acme the session's rule holds: a viewer reads, but cannot write.
    assert "secret.txt" in await paths(world, "viewer", workspace)
    with pytest.raises(grpc.aio.AioRpcError) as read_only:
        await storage(world).WriteFile(
            pb.WriteFileRequest(parent=workspace, path="x.txt", data=b"x"),
            metadata=world.auth("viewer"),
        )
    assert read_only.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert sorted(await paths(world, "user", workspace)) == ["secret.txt"]
    assert world.workspace(session).is_dir()
