"""Storage behind the real Envoy: REST downloads are the raw bytes (google.api.HttpBody, streamed
by the transcoder), byte for byte, always as an attachment; the internal methods are not routed.

The upstream is the real storage service (tests/storage/stack.py: SQLite, the local blob store);
identity's JWKS server publishes the test key.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from corral.libs.config import Settings
from corral.libs.envoy import Envoy, write_config
from corral.services.identity.jwks_http import JwksHttpServer
from corral.services.storage.paths import file_name
from corral.storage.v1 import report_pb2, workspace_pb2
from corral.storage.v1 import storage_service_pb2 as pb
from corral.storage.v1 import storage_service_pb2_grpc as rpc
from tests.storage.stack import ACME, ALICE, Stack, running_stack
from tests.support.keys import SigningKey


@dataclass
class StorageEdge:
    envoy: Envoy
    stack: Stack

    @property
    def target(self) -> str:
        return self.envoy.url.removeprefix("http://")

    async def get(self, path: str, token: str | None) -> tuple[int, dict[str, str], bytes]:
        headers = {"authorization": f"Bearer {token}"} if token else {}

        def send() -> tuple[int, dict[str, str], bytes]:
            connection = http.client.HTTPConnection(self.target, timeout=30)
            try:
                connection.request("GET", path, headers=headers)
                response = connection.getresponse()
                return (
                    response.status,
                    {k.lower(): v for k, v in response.getheaders()},
                    response.read(),
                )
            finally:
                connection.close()

        return await asyncio.to_thread(send)


@pytest.fixture(scope="module")
async def storage_edge(
    signing_key: SigningKey, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[StorageEdge]:
    directory: Path = tmp_path_factory.mktemp("storage-edge")
    async with running_stack("sqlite", directory, signing_key) as stack:

        async def keys() -> list[dict[str, str]]:
            return [signing_key.jwk()]

        jwks = JwksHttpServer(keys, host="127.0.0.1", port=0, max_age=300)
        await jwks.start()
        settings = Settings(
            data_dir=directory,
            edge_port=0,
            jwks_url=f"http://127.0.0.1:{jwks.port}/.well-known/jwks.json",
        )
        config = write_config(
            settings,
            directory / "envoy",
            upstreams={
                name: [stack.address] for name in ("identity", "session", "task", "storage")
            },
            health_interval=0.25,
        )
        envoy = Envoy(config, log_file=directory / "envoy.log")
        await envoy.start()
        try:
            await envoy.wait_healthy({("storage", stack.address)}, within=10)
            yield StorageEdge(envoy, stack)
        finally:
            await envoy.stop()
            await jwks.stop()


async def test_a_rest_download_is_byte_identical(storage_edge: StorageEdge) -> None:
    stack = storage_edge.stack
    ws = await stack.workspace()
    content = os.urandom(9 * 1024 * 1024 + 7)  # several HttpBody chunks
    (stack.workspace_dir(ws.name) / "result.bin").write_bytes(content)
    name = file_name(ws.name.removeprefix("workspaces/"), "result.bin")
    status, headers, body = await storage_edge.get(f"/v1/{name}:download", stack.token())
    assert status == 200, body[:300]
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(content).hexdigest()
    assert len(body) == len(content)
    assert headers["content-type"] == "application/octet-stream"
    assert headers["content-disposition"] == "attachment"
    assert headers["x-content-type-options"] == "nosniff"
    status, _, part = await storage_edge.get(
        f"/v1/{name}:download?offset=1000&limit=5000", stack.token()
    )
    assert (status, part) == (200, content[1000:6000])
    status, _, _ = await storage_edge.get(f"/v1/{name}:download", None)
    assert status == 401
    stranger = stack.key.token(sub="organizations/globex/users/eve", org="organizations/globex")
    status, _, _ = await storage_edge.get(f"/v1/{name}:download", stranger)
    assert status == 404


async def test_an_html_report_downloads_as_an_inert_attachment(storage_edge: StorageEdge) -> None:
    stack = storage_edge.stack
    page = b"<html><script>alert(document.cookie)</script></html>"
    report = await stack.stub.CreateReport(
        pb.CreateReportRequest(
            report=report_pb2.Report(
                title="page", format=report_pb2.REPORT_FORMAT_HTML, content=page
            )
        ),
        metadata=stack.auth(),
    )
    status, headers, body = await storage_edge.get(
        f"/v1/{report.report.name}:download", stack.token()
    )
    assert (status, body) == (200, page)
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert headers["content-disposition"] == "attachment"
    assert headers["content-security-policy"] == "sandbox; default-src 'none'"
    assert headers["x-content-type-options"] == "nosniff"


async def test_the_internal_methods_are_not_routed(storage_edge: StorageEdge) -> None:
    stack = storage_edge.stack
    session = uuid.uuid4().hex
    async with grpc.aio.insecure_channel(storage_edge.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await rpc.StorageServiceStub(channel).CreateWorkspace(
                pb.CreateWorkspaceRequest(
                    workspace=workspace_pb2.Workspace(
                        organization=ACME, session=f"sessions/{session}", owner=ALICE
                    )
                ),
                metadata=stack.as_service(),  # even a service's token: not through the edge
            )
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert not stack.workspace_dir(f"workspaces/{session}").exists()
    status, _, _ = await storage_edge.get("/v1/workspaces", stack.token())
    assert status == 200  # ListWorkspaces is public; CreateWorkspace has no REST binding
