"""`corral chat` as a person runs it: a terminal client against the running platform that
streams the answer, runs a Bash tool after asking, and calls an MCP tool."""

from __future__ import annotations

import asyncio
import os
import re
import sys

from tests.e2e.conftest import Platform, directive
from tests.support.platform import ADMIN, MCP_SERVER, allow_mcp_commands


async def _read_until(stream: asyncio.StreamReader, needle: str, seen: list[str]) -> str:
    async with asyncio.timeout(60):
        while needle not in "".join(seen):
            chunk = await stream.read(4096)
            if not chunk:
                raise AssertionError(f"chat ended before {needle!r}: {''.join(seen)}")
            seen.append(chunk.decode(errors="replace"))
    return "".join(seen)


def _cli_env(platform: Platform) -> dict[str, str]:
    """`corral chat` pointed at the test platform, signed in as its admin."""
    return {
        **os.environ,
        "CORRAL_SESSION_TARGET": platform.settings.target_for("session"),
        "CORRAL_IDENTITY_TARGET": platform.settings.target_for("identity"),
        "CORRAL_EMAIL": ADMIN[0],
        "CORRAL_PASSWORD": ADMIN[1],
    }


async def test_corral_chat_streams_asks_runs_bash_and_mcp(platform: Platform) -> None:
    await allow_mcp_commands(platform, sys.executable)
    env = _cli_env(platform)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "corral.services.cli",
        "chat",
        "--ask",
        "Bash",
        "--allow",
        "mcp__calc__add",
        "--mcp",
        f"calc={sys.executable} {MCP_SERVER}",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    assert process.stdin is not None and process.stdout is not None
    seen: list[str] = []
    try:
        banner = await _read_until(process.stdout, "Ctrl-C interrupts", seen)
        session = re.search(r"sessions/[0-9a-f]+", banner)
        assert session is not None
        prompt = directive(
            {"text": "Let me write the file.", "chunk": 4},
            {"tool": "Bash", "input": {"command": "echo from-the-terminal > chat.txt"}},
            {"tool": "mcp__calc__add", "input": {"a": 20, "b": 22}},
            {"text": "Both tools ran.", "chunk": 4},
        )
        process.stdin.write(f"{prompt}\n".encode())
        await process.stdin.drain()
        await _read_until(process.stdout, "[y/n]", seen)
        process.stdin.write(b"y\n")
        await process.stdin.drain()
        output = await _read_until(process.stdout, "[succeeded", seen)
        process.stdin.close()  # Ctrl-D: leave
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "Let me write the file." in output and "Both tools ran." in output
    assert "(allowed)" in output and "sum=42" in output
    assert (
        platform.workspace(session.group(0)) / "chat.txt"
    ).read_text().strip() == "from-the-terminal"


async def test_corral_chat_says_what_the_policy_refuses_and_how_to_allow_it(
    platform: Platform,
) -> None:
    """No stdio MCP command is allowed by default: the CLI says so, names the policy field an
    admin sets, and exits 1 without a traceback."""
    env = _cli_env(platform)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "corral.services.cli",
        "chat",
        "--mcp",
        f"calc={sys.executable} {MCP_SERVER}",
        "-m",
        "hello",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    text = output.decode()
    assert process.returncode == 1, text
    assert "allowed_mcp_commands" in text and "Traceback" not in text
