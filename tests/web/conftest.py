"""The whole platform for browser and SDK tests: the five real services (SQLite, in-process hub,
the offline model), the real Envoy in front (``start_edge``, as ``corral dev`` does) and the web
console's static server, all in this process on free ports; Node and Debian's Chromium outside.

The TypeScript SDK and the console are built from source first (``npm run build``: tsc and
esbuild, a few seconds), so the tests never run a stale bundle. Node, Chromium or the npm
packages missing skip these tests locally and fail them under CI=true (``make ts-sdk console``
installs the packages; ``.ci/run`` installs Chromium).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from corral.identity.v1 import identity_service_pb2 as ipb
from corral.identity.v1 import identity_service_pb2_grpc as irpc
from corral.libs.config import SERVICE_NAMES
from corral.libs.envoy import start_edge
from corral.libs.web_console import ConsoleServer
from corral.services import registry
from corral.services.identity.config import IdentitySettings
from corral.storage.v1 import storage_service_pb2 as spb
from corral.storage.v1 import storage_service_pb2_grpc as srpc
from corral.storage.v1 import workspace_pb2
from tests.conftest import _unavailable
from tests.support.grpc_tools import free_port

ROOT = Path(__file__).resolve().parents[2]
SDK = ROOT / "libs" / "ts-sdk"
CONSOLE = ROOT / "libs" / "web-console"
ARTIFACTS = ROOT / "test-artifacts" / "web"
CHROMIUM = os.environ.get("CORRAL_TEST_CHROMIUM", "/usr/bin/chromium")
EMAIL = "admin@corral.local"
PASSWORD = "web-test-password"


@dataclass(frozen=True)
class Stack:
    edge_url: str
    console_url: str
    email: str
    password: str
    data_dir: Path
    settings: IdentitySettings


def node() -> str:
    found = shutil.which("node")
    if found is None:
        _unavailable("Node.js (node)", FileNotFoundError("node is not on PATH"))
    assert found is not None
    return found


def require_packages(*packages: Path) -> None:
    for package in packages:
        if not (package / "node_modules").is_dir():
            _unavailable(
                f"npm packages of {package.relative_to(ROOT)}",
                FileNotFoundError("node_modules missing: run `make ts-sdk console` (npm ci)"),
            )


def require_chromium() -> str:
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
        _unavailable(f"Chromium at {CHROMIUM}", FileNotFoundError("apt-get install -y chromium"))
    return CHROMIUM


async def run(
    *command: str, cwd: Path, env: dict[str, str] | None = None, limit: float = 120
) -> str:
    """Run a command without blocking the event loop the services run on; fail with its output."""
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), limit)
    except TimeoutError:
        process.kill()
        output, _ = await process.communicate()
        pytest.fail(f"{' '.join(command)} timed out after {limit:g} s:\n{output.decode()}")
    text = output.decode(errors="replace")
    if process.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited with {process.returncode}:\n{text}")
    return text


@pytest.fixture
def chromium() -> str:
    return require_chromium()


@pytest.fixture(scope="session")
async def built() -> None:
    """The SDK (tsc) and the console (esbuild) built from the current sources."""
    node()
    require_packages(SDK, CONSOLE)
    npm = shutil.which("npm") or "npm"
    await run(npm, "run", "--silent", "build", cwd=SDK)
    await run(npm, "run", "--silent", "build", cwd=CONSOLE)


@pytest.fixture(scope="session")
async def stack(built: None, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    directory = tmp_path_factory.mktemp("web")
    console_port = free_port()
    console_origins = [f"http://127.0.0.1:{console_port}", f"http://localhost:{console_port}"]
    settings = IdentitySettings(
        data_dir=directory,
        identity_http_port=free_port(),
        edge_port=0,
        console_port=console_port,
        cors_origins=console_origins,
        bootstrap_admin_email=EMAIL,
        bootstrap_admin_password=PASSWORD,
        log_level="WARNING",
        # Real ports: services reach each other at target_for(name), built from these.
        **{f"{name}_port": free_port() for name in SERVICE_NAMES},
    )
    apps = [await registry.build(name, settings) for name in SERVICE_NAMES]
    console: ConsoleServer | None = None
    try:
        for app in apps:
            await app.start()
        envoy = await start_edge(settings, apps)
        console = ConsoleServer(
            envoy.url, host="127.0.0.1", port=console_port, directory=settings.console_dir
        )
        console.start()
        yield Stack(envoy.url, console.url, EMAIL, PASSWORD, directory, settings)
    finally:
        if console is not None:
            await console.stop()
        await asyncio.gather(*(app.stop(0) for app in apps))


async def service_workspace(stack: Stack) -> str:
    """A new workspace owned by the signed-in user, for a session of its own, made as the
    session service makes one: CreateWorkspace is internal (not routed by the edge, services
    only), so the platform's service account calls storage's port directly."""
    settings = stack.settings
    async with grpc.aio.insecure_channel(settings.target_for("identity")) as channel:
        identity = irpc.IdentityServiceStub(channel)
        user = (await identity.Login(ipb.LoginRequest(email=EMAIL, password=PASSWORD))).user
        service = await identity.ExchangeApiKey(
            ipb.ExchangeApiKeyRequest(api_key=settings.resolved_service_api_key())
        )
    organization = "/".join(user.name.split("/")[:2])
    async with grpc.aio.insecure_channel(settings.target_for("storage")) as channel:
        reply = await srpc.StorageServiceStub(channel).CreateWorkspace(
            spb.CreateWorkspaceRequest(
                workspace=workspace_pb2.Workspace(
                    organization=organization,
                    session=f"sessions/{uuid.uuid4().hex}",
                    owner=user.name,
                ),
                request_id=str(uuid.uuid4()),
            ),
            metadata=(("authorization", f"Bearer {service.token.access_token}"),),
        )
    return reply.workspace.name
