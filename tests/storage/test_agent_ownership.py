"""What storage makes in a workspace is the agent's to change, and a new workspace needs room
on its owner's quota.

Run as root, storage gives everything it writes into a workspace (the workspace itself, the
directories of a path, written and uploaded files, a clone's copies) to the user agents run as
(CORRAL_RUNTIME_AGENT_UID/GID), by descriptor before the file is placed: tested here on the
filesystem adapter itself, since the service's stack runs without that setting.
tests/e2e/test_workspace_files.py shows the agent reading and appending to an uploaded file."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from corral.services.storage.workspace_fs import WorkspaceFiles
from corral.storage.v1 import storage_service_pb2 as pb
from tests.storage.stack import ACME, ALICE, BOB, Stack
from tests.support.grpc_tools import error_reason

AGENT = (10001, 10002)
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root gives files to another user")


def owner(path: Path) -> tuple[int, int]:
    found = path.lstat()
    return found.st_uid, found.st_gid


async def chunks(*blocks: bytes) -> AsyncIterator[bytes]:
    for block in blocks:
        yield block


@as_root
async def test_what_storage_writes_in_a_workspace_is_the_agents(tmp_path: Path) -> None:
    files = WorkspaceFiles(tmp_path, agent=AGENT)
    assert await files.create("w1")
    top = files.directory("w1")
    assert owner(top) == AGENT

    await files.write("w1", "a/b/c.txt", chunks(b"hello"), overwrite=False, max_bytes=100)
    for path in (top / "a", top / "a" / "b", top / "a" / "b" / "c.txt"):
        assert owner(path) == AGENT, path
    await files.write("w1", "a/b/c.txt", chunks(b"again"), overwrite=True, max_bytes=100)
    assert owner(top / "a" / "b" / "c.txt") == AGENT
    await files.move("w1", "a/b/c.txt", "d/e.txt", overwrite=False)
    assert owner(top / "d") == owner(top / "d" / "e.txt") == AGENT

    # A clone: every copy is the agent's, with the original's permission bits.
    script = top / "run.sh"
    script.write_text("#!/bin/sh\n")
    os.chown(script, 0, 0)
    script.chmod(0o750)
    (top / "link").symlink_to("/etc/passwd")
    assert await files.clone("w1", "w2")
    copy = files.directory("w2")
    assert owner(copy) == owner(copy / "d") == owner(copy / "d" / "e.txt") == AGENT
    assert owner(copy / "run.sh") == AGENT
    assert stat.S_IMODE((copy / "run.sh").stat().st_mode) == 0o750
    assert not (copy / "link").exists() and not (copy / "link").is_symlink()
    assert owner(Path("/etc/passwd")) == (0, 0)
    # Nothing of the agent's own is changed: the original keeps root's file as it was.
    assert owner(script) == (0, 0)


async def test_without_the_setting_or_root_files_stay_storages(tmp_path: Path) -> None:
    files = WorkspaceFiles(tmp_path)
    assert files.owner is None
    assert await files.create("w")
    await files.write("w", "x/y.txt", chunks(b"y"), overwrite=False, max_bytes=10)
    me = (os.geteuid(), os.getegid())
    assert owner(files.directory("w") / "x" / "y.txt") == me
    if os.geteuid() != 0:
        assert WorkspaceFiles(tmp_path, agent=AGENT).owner is None  # only root can give away


async def test_a_new_workspace_needs_a_byte_of_room_on_its_owners_quota(stack: Stack) -> None:
    stack.ledger.limits[ALICE] = 0
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.workspace(owner=ALICE)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(refused.value) == "STORAGE_QUOTA_EXCEEDED"
    status = rpc_status.from_call(refused.value)  # type: ignore[arg-type]
    assert status is not None
    assert any(d.Is(error_details_pb2.QuotaFailure.DESCRIPTOR) for d in status.details)
    listed = await stack.stub.ListWorkspaces(pb.ListWorkspacesRequest(), metadata=stack.auth())
    assert list(listed.workspaces) == []

    made = await stack.workspace(owner=BOB)  # another user, with room
    assert made.owner == BOB and made.organization == ACME
    await stack.settle()
    assert stack.ledger.live() == []  # the byte that was held to check is given back

    stack.ledger.limits[ACME] = 0  # the organisation's quota holds back everyone in it
    with pytest.raises(grpc.aio.AioRpcError) as organisation:
        await stack.workspace(owner=BOB)
    assert error_reason(organisation.value) == "STORAGE_QUOTA_EXCEEDED"
