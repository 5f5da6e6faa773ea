"""`corral workspaces|files|reports` against the real storage service (with identity for its
tokens and quotas): a report filed from a file, listed, shown and fetched byte for byte; a
workspace's files listed and downloaded; --json parsed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.client import Client
from corral.libs.app import ServiceApp
from corral.services import registry
from corral.storage.v1 import storage_service_pb2 as pb
from corral.storage.v1 import workspace_pb2
from tests.cli.conftest import Platform, corral
from tests.support.platform import ADMIN


@pytest.fixture(scope="module")
async def storage(platform: Platform) -> AsyncIterator[dict[str, str]]:
    """Storage started beside the platform; the env that points the CLI at it."""
    app: ServiceApp = await registry.build("storage", platform.settings)
    port = await app.start()
    try:
        yield {"CORRAL_STORAGE_TARGET": f"127.0.0.1:{port}"}
    finally:
        await app.stop(0)


async def test_reports_create_ls_show_get(
    platform: Platform, storage: dict[str, str], tmp_path: Path
) -> None:
    source = tmp_path / "summary.md"
    source.write_text("# Weekly\n\nAll green.\n")
    created = await corral(
        platform, "reports", "create", str(source), "--title", "Weekly", "--json", env=storage
    )
    assert created.code == 0, created
    name = json.loads(created.out)["name"]
    assert name.startswith("reports/")

    listed = json.loads((await corral(platform, "reports", "ls", "--json", env=storage)).out)
    assert [r["title"] for r in listed["reports"] if r["name"] == name] == ["Weekly"]
    shown = await corral(platform, "reports", "show", name, env=storage)
    assert "Weekly" in shown.out and "All green." in shown.out
    fetched = tmp_path / "back.md"
    got = await corral(platform, "reports", "get", name, "-o", str(fetched), env=storage)
    assert got.code == 0, got
    assert fetched.read_bytes() == source.read_bytes()


async def test_files_ls_and_get(platform: Platform, storage: dict[str, str]) -> None:
    """A session's workspace, made as the session service makes it (a service principal),
    then written and read back through the CLI as its owner."""
    key = (platform.settings.data_dir / "service-api-key").read_text().strip()
    targets = {
        "identity": platform.settings.target_for("identity"),
        "storage": storage["CORRAL_STORAGE_TARGET"],
    }
    async with Client(targets) as service:
        await service.exchange_api_key(key)
        async with Client(targets) as admin:
            login = await admin.login(*ADMIN)
            workspace = workspace_pb2.Workspace(
                organization="organizations/default",
                session="sessions/clifiles",
                owner=login.user.name,
            )
            await service.storage.CreateWorkspace(pb.CreateWorkspaceRequest(workspace=workspace))
            await admin.storage.WriteFile(
                pb.WriteFileRequest(
                    parent="workspaces/clifiles", path="out/result.txt", data=b"forty-two\n"
                )
            )
    listed = await corral(platform, "files", "ls", "workspaces/clifiles", "--json", env=storage)
    assert listed.code == 0, listed
    (entry,) = json.loads(listed.out)["files"]
    assert (entry["path"], entry["sizeBytes"]) == ("out/result.txt", "10")
    got = await corral(platform, "files", "get", entry["name"], env=storage)
    assert got.out == "forty-two\n"
    workspaces = json.loads((await corral(platform, "workspaces", "ls", "--json", env=storage)).out)
    assert "workspaces/clifiles" in [w["name"] for w in workspaces["workspaces"]]
