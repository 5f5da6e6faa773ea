"""The README's examples, run verbatim against the platform behind the real edge: the CLI's
one-shot approvals and --json read by a script, gRPC through the edge with server reflection
(`buf curl`, which the project installs), REST with curl, the Python snippet and the Go client.

Each example is the fenced block after a `<!-- README example ... : NAME -->` line. The only
changes: the edge listens on a free port, not 127.0.0.1:8080, and the CLI is pointed at it with
CORRAL_TARGET (the variable the README names); the bootstrap admin's credentials file is the
test's own."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.libs.grpc.reflection import PUBLIC_API
from tests.clients.edge_platform import Edged, platform_behind_edge
from tests.conftest import _unavailable

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(
    r"<!-- README example \(tests/e2e/test_readme\.py runs it\): (?P<name>[\w-]+) -->\n"
    r"```(?P<lang>\w+)\n(?P<code>.*?)```",
    re.S,
)


def examples() -> dict[str, str]:
    found = {m["name"]: m["code"] for m in MARKER.finditer((ROOT / "README.md").read_text())}
    assert set(found) == {"cli", "sign-in", "grpc", "python", "go", "rest"}, sorted(found)
    return found


@pytest.fixture(scope="module")
async def edged(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Edged]:
    async with platform_behind_edge(tmp_path_factory.mktemp("readme")) as running:
        yield running


def here(edged: Edged, code: str) -> str:
    return code.replace("127.0.0.1:8080", edged.target)


async def run(
    edged: Edged, *command: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> str:
    email, password = edged.admin
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={
            **os.environ,
            "CORRAL_EMAIL": email,
            "CORRAL_PASSWORD": password,
            "CORRAL_TARGET": edged.target,
            **(env or {}),
        },
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), 240)
    except TimeoutError:
        process.kill()
        out, _ = await process.communicate()
    text = out.decode(errors="replace")
    assert process.returncode == 0, f"{command} exited {process.returncode}:\n{text}"
    return text


def sections(output: str) -> dict[str, str]:
    parts = re.split(r"^=== (\w+) ===$", output, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


async def test_sign_in_grpc_and_rest_examples(edged: Edged, tmp_path: Path) -> None:
    """The sign-in line reads the saved credentials; the gRPC example signs in, lists the
    public API by reflection through the edge and calls it; the REST example uses its token."""
    email, password = edged.admin
    (tmp_path / ".corral").mkdir()
    (tmp_path / ".corral" / "admin-credentials").write_text(f"{email}\n{password}\n")
    found = examples()
    script = "\n".join(
        [
            "set -euo pipefail",
            "unset CORRAL_EMAIL CORRAL_PASSWORD",
            f"cd {tmp_path}",
            found["sign-in"],
            f"cd {ROOT}",
            'echo "=== signin ==="; echo "$CORRAL_EMAIL"',
            'echo "=== grpc ==="',
            here(edged, found["grpc"]),
            'echo "=== rest ==="',
            here(edged, found["rest"]),
        ]
    )
    out = sections(await run(edged, "bash", "-c", script))
    assert out["signin"].strip() == email

    grpc = out["grpc"]
    for service in PUBLIC_API:
        assert service in grpc
    assert "corral.runtime" not in grpc
    assert "corral.session.v1.SessionService/CreateSession" in grpc  # --list-methods
    created = re.search(r'"name": "(sessions/\w+)"', grpc)
    assert created is not None and '"displayName": "ops"' in grpc

    rest = out["rest"]
    assert '"turn":' in rest and "over REST" in rest
    assert "HTTP/1.1 401" in rest and "TOKEN_MISSING" in rest and "x-request-id:" in rest


async def test_python_example(edged: Edged, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(here(edged, examples()["python"]))
    out = await run(edged, sys.executable, str(script))
    assert "You said: hello" in out
    assert re.search(r"\[\d+ tokens\]", out), out


@pytest.mark.timeout(300)
async def test_go_example(edged: Edged) -> None:
    for tool in ("go", "protoc-gen-go", "protoc-gen-go-grpc"):
        if shutil.which(tool) is None:
            _unavailable(f"{tool} (Debian's Go toolchain)", FileNotFoundError(tool))
    code = here(edged, examples()["go"])
    out = await run(edged, "bash", "-c", f"set -euo pipefail\n{code}")
    assert "You said: hello" in out
    assert "turn_result STATUS_SUCCEEDED" in out


async def test_cli_example(edged: Edged) -> None:
    """One-shot approvals (a pattern, a `n` on stdin) and --json read by a script."""
    code = here(edged, examples()["cli"])
    out = await run(edged, "bash", "-c", f"set -euo pipefail\n{code}")
    assert "(allowed)" in out and "Listed." in out
    assert "(denied)" in out and "Asked." in out
    assert "STATUS_SUCCEEDED" in out
    assert re.search(r"^\d+$", out.strip().splitlines()[-1]), out  # sessions counted
    assert int(out.strip().splitlines()[-1]) >= 3
