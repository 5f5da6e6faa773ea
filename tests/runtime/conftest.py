"""A real RuntimeService on port 0, wired by the runtime's own composition root (``compose``,
which ``build`` uses too): with the real SDK and CLI and the offline model server the runtime
starts itself when no API key is configured (``runtime``), or with a scripted fake SDK
(``make_runtime(sdk=FakeSdk(...))``)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.metrics import Meter

from corral.libs.app import ServiceApp
from corral.libs.auth import StaticJwksSource
from corral.libs.config import Settings
from corral.runtime.v1 import agent_options_pb2 as options_pb
from corral.runtime.v1 import runtime_event_pb2 as event_pb
from corral.runtime.v1 import runtime_service_pb2 as pb
from corral.runtime.v1 import runtime_service_pb2_grpc as pb_grpc
from corral.services.runtime.main import compose
from corral.services.runtime.offline_model import server as offline_server
from corral.services.runtime.service import RuntimeService
from tests.runtime.fake_sdk import FakeSdk
from tests.support.keys import SigningKey

MODEL = "claude-sonnet-4-5"
ORG = "organizations/acme"
# What the test MCP server (mcp_calc_server.py, run by this Python) needs to read inside an
# agent's sandbox: the virtualenv, the base interpreter, and this folder.
SANDBOX_READ_ONLY = [Path(sys.prefix), Path(sys.base_prefix), Path(__file__).parent]
# The session service's own principal: the runtime answers internal services only.
SERVICE_SUBJECT = "organizations/default/serviceAccounts/corral-session"


def service_token(signing_key: SigningKey) -> str:
    """A token like identity gives an internal service account (the ``service`` role)."""
    return signing_key.token(
        sub=SERVICE_SUBJECT, org="organizations/default", roles=["admin", "service"]
    )


CLI_MARKER = "claude_agent_sdk/_bundled/claude"


def directive(*steps: dict[str, Any]) -> str:
    """A prompt that scripts the offline model (see offline_model.script)."""
    return f"<<corral-model {json.dumps(list(steps))}>>"


def cli_processes() -> list[int]:
    """Claude CLI processes this test process started (the runtime's agents)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().decode(errors="replace")
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if CLI_MARKER in cmdline and int(fields[1]) == me and fields[0] != "Z":
            found.append(int(entry))
    return found


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if marker.encode() in handle.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def options(**fields: Any) -> options_pb.AgentOptions:
    fields.setdefault("model", MODEL)
    fields.setdefault("max_turns", 8)
    return options_pb.AgentOptions(**fields)


class Clock:
    """The pool's clock, driven by the test."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Runtime:
    app: ServiceApp
    root: Path
    stub: pb_grpc.RuntimeServiceStub
    token: str
    signing_key: SigningKey
    channel: grpc.aio.Channel
    service: RuntimeService  # for tests that drive it directly or await its turns
    workspaces: Path  # storage's folder of workspaces (CORRAL_STORAGE_ROOT/workspaces)
    sdk: FakeSdk | None = None  # None: the Claude Agent SDK
    turns: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self, token: str | None = None) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token or self.token}"),)

    def request(
        self,
        session: str,
        prompt: str,
        *,
        agent: options_pb.AgentOptions | None = None,
        resume: str = "",
        workspace: str | None = None,
        turn_id: str | None = None,
        organization: str = ORG,
    ) -> pb.RunTurnRequest:
        """A turn of ``session``; its workspace is made first, as storage makes a session's."""
        self.turns += 1
        self.workspace(workspace or session).mkdir(parents=True, exist_ok=True)
        return pb.RunTurnRequest(
            session=f"sessions/{session}",
            turn_id=turn_id or f"turn-{self.turns}",
            organization=organization,
            actor="organizations/acme/users/alice",
            workspace=f"workspaces/{workspace or session}",
            options=agent or options(),
            prompt=prompt,
            resume_transcript_id=resume,
        )

    def stream(
        self, request: pb.RunTurnRequest, token: str | None = None
    ) -> grpc.aio.UnaryStreamCall[pb.RunTurnRequest, pb.RunTurnResponse]:
        return self.stub.RunTurn(request, metadata=self.metadata(token), timeout=60)

    async def turn(self, session: str, prompt: str, **kwargs: Any) -> list[event_pb.RuntimeEvent]:
        call = self.stream(self.request(session, prompt, **kwargs))
        return [response.event async for response in call]

    def workspace(self, name: str) -> Path:
        return self.workspaces / name

    def new_session(self) -> str:
        """A new session id, with its workspace made as storage makes a session's."""
        session = new_session()
        self.workspace(session).mkdir(parents=True)
        return session


RuntimeFactory = Callable[..., Any]


@pytest.fixture
async def make_runtime(
    tmp_path: Path, signing_key: SigningKey
) -> AsyncIterator[Callable[..., Any]]:
    """Builds and starts runtimes with extra settings; stops them after the test."""
    started: list[Runtime] = []

    async def make(
        sdk: FakeSdk | None = None,
        clock: Callable[[], float] = time.monotonic,
        meter: Meter | None = None,
        **settings: Any,
    ) -> Runtime:
        root = settings.pop("runtime_root", tmp_path / f"runtime-{len(started)}")
        settings.setdefault("runtime_sandbox_read_only", SANDBOX_READ_ONLY)
        config = Settings(
            data_dir=tmp_path,
            runtime_root=root,
            anthropic_api_key="",
            anthropic_base_url="",
            rate_limit_burst=1000,
            **settings,
        )
        app, service = await compose(
            config,
            sdk,
            port=0,
            jwks_source=StaticJwksSource(signing_key.jwks()),
            clock=clock,
            meter=meter,
        )
        await app.start()
        channel = grpc.aio.insecure_channel(app.server.address)
        runtime = Runtime(
            app=app,
            root=root,
            stub=pb_grpc.RuntimeServiceStub(channel),
            token=service_token(signing_key),
            signing_key=signing_key,
            channel=channel,
            service=service,
            workspaces=config.workspaces_dir(),
            sdk=sdk,
        )
        started.append(runtime)
        return runtime

    yield make
    for runtime in started:
        await runtime.channel.close()
        await runtime.app.stop(0)


@pytest.fixture
async def runtime(make_runtime: Callable[..., Any]) -> Runtime:
    result: Runtime = await make_runtime()
    return result


def payloads(events: Sequence[event_pb.RuntimeEvent]) -> list[str]:
    return [str(event.WhichOneof("payload")) for event in events]


def new_session() -> str:
    return f"s-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def recorded_model_requests() -> Iterator[list[bytes]]:
    """Every request body the offline model answers (it runs in this process)."""
    bodies: list[bytes] = []
    original = offline_server.plan_reply

    def recording(body: Any, *args: Any, **kwargs: Any) -> Any:
        bodies.append(body if isinstance(body, bytes) else str(body).encode())
        return original(body, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(offline_server, "plan_reply", recording)
        yield bodies
