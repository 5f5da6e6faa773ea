"""The Go client (clients/go), generated from the protos and compiled with Debian's Go toolchain
offline (clients/go/build.py), run against the real edge: it signs in, creates a session, sends
a message and streams that turn to its result. Nothing is installed here: `.ci/run` installs
the Debian packages; without them the test skips locally and fails under CI=true."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import pytest

from corral.session.v1 import session_service_pb2 as spb
from tests.clients.edge_platform import Edged
from tests.conftest import _unavailable
from tests.support.platform import directive

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "clients" / "go" / "build.py"
DEBIAN = ("go", "protoc-gen-go", "protoc-gen-go-grpc")


async def run(*command: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(process.communicate(), 240)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.fixture(scope="module")
async def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for name in DEBIAN:
        if shutil.which(name) is None:
            _unavailable(f"{name} (Debian's Go toolchain)", FileNotFoundError(name))
    if not await asyncio.to_thread(Path("/usr/share/gocode/src/google.golang.org/grpc").is_dir):
        _unavailable("golang-google-grpc-dev", FileNotFoundError("/usr/share/gocode"))
    out = tmp_path_factory.mktemp("go") / "corral-example"
    code, stdout, stderr = await run(sys.executable, str(BUILD), str(out))
    assert code == 0, stdout + stderr
    return out


@pytest.mark.timeout(300)
async def test_go_client_signs_in_and_streams_a_turn(binary: Path, edged: Edged) -> None:
    email, password = edged.admin
    message = directive({"text": "Hello from Go's side.", "chunk": 5})
    env = {"CORRAL_EMAIL": email, "CORRAL_PASSWORD": password}
    code, out, err = await run(str(binary), "-target", edged.target, "-message", message, env=env)
    assert code == 0, out + err
    lines = out.splitlines()
    session = lines[0].removeprefix("session ")
    assert session.startswith("sessions/")
    assert lines[1] == "Hello from Go's side."  # streamed in chunks, printed as they came
    assert lines[-1].startswith("turn_result STATUS_SUCCEEDED")
    got = await edged.platform.sessions.GetSession(
        spb.GetSessionRequest(name=session), metadata=edged.platform.auth
    )
    assert got.session.display_name == "from Go" and got.session.turn_count == 1


@pytest.mark.timeout(300)
async def test_go_client_reports_the_error_reason(binary: Path, edged: Edged) -> None:
    env = {"CORRAL_EMAIL": "nobody@corral.test", "CORRAL_PASSWORD": "wrong-password-123"}
    code, _, err = await run(str(binary), "-target", edged.target, env=env)
    assert code == 1
    assert "Unauthenticated" in err and "reason INVALID_CREDENTIALS" in err
