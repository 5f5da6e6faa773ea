"""Agents are hostile code: two organisations' agents (the real SDK and CLI against the offline
model, in the runtime's bubblewrap sandbox) each try to read the other's workspace, the
runtime's data directory, the platform's keys and other processes' command lines and
environments, through Bash and through the Read tool, and get nothing; they do not run as root.

Every secret is first shown to be where the agent looks (on the host), so the test fails if the
sandbox stops hiding it."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.runtime.v1 import agent_options_pb2 as options_pb
from corral.runtime.v1 import runtime_event_pb2 as event_pb
from tests.runtime.conftest import Runtime, directive, new_session, options

ALLOW = options_pb.PermissionRule.ACTION_ALLOW
ORGS = ("organizations/acme", "organizations/globex")
AGENT_UID = 10001
MCP_SERVER = Path(__file__).parent.parent / "runtime" / "mcp_calc_server.py"


def _secret(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex}"


def _probe_script(other_workspace: Path, root: Path, data_dir: Path) -> str:
    """What a curious agent runs; everything it finds goes to probe.txt in its own workspace.
    It names paths only, never a secret value (its own command line must not contain one)."""
    return "; ".join(
        [
            "exec > probe.txt 2>&1",
            'echo "uid=$(id -u)"',
            "echo --other-workspace",
            f"ls -la {other_workspace}",
            f"cat {other_workspace}/secret.txt",
            "echo --runtime-data",
            f"ls -R {root}",
            f"cat {root}/state/*.json",
            "echo --platform-keys",
            f"ls -la {data_dir}",
            f"cat {data_dir}/service-api-key {data_dir}/encryption-keys",
            "echo --processes",
            "ls -d /proc/[0-9]* | wc -l",
            "for p in /proc/[0-9]*; do cat $p/cmdline $p/environ; echo; done | tr '\\0' '\\n'",
            "echo --end",
        ]
    )


def _section(text: str, name: str) -> str:
    start = text.index(f"--{name}\n")
    return text[start : text.index("\n--", start + 1)]


def _processes_with(value: str) -> list[int]:
    """Host pids whose environment or command line holds ``value``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        for part in ("environ", "cmdline"):
            try:
                with open(f"/proc/{entry}/{part}", "rb") as handle:
                    if value.encode() in handle.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


@pytest.fixture
def platform_process() -> Iterator[tuple[str, str]]:
    """A process of the platform's (a database, another service) with a secret in its
    environment and one in its command line."""
    secret, argument = _secret("platform-env"), _secret("platform-arg")
    child = subprocess.Popen(
        ["/bin/sh", "-c", "sleep 600", argument], env={"PLATFORM_SECRET": secret}
    )
    try:
        yield secret, argument
    finally:
        child.kill()
        child.wait()


async def test_two_organizations_agents_cannot_reach_each_other_or_the_platform(
    make_runtime: Callable[..., Any], tmp_path: Path, platform_process: tuple[str, str]
) -> None:
    platform_secret, platform_argument = platform_process
    runtime: Runtime = await make_runtime()
    data_dir = tmp_path  # the runtime's data_dir (its root is a folder in it)
    service_key, ring = _secret("crl_service"), _secret("enc-key")
    (data_dir / "service-api-key").write_text(service_key)
    (data_dir / "encryption-keys").write_text(f"k1:{ring}")

    sessions = [new_session(), new_session()]
    env_secrets = [_secret("acme-env"), _secret("globex-env")]
    file_secrets = [_secret("acme-file"), _secret("globex-file")]
    agents = [
        options(
            allowed_tools=["Bash", "Read"],
            env={"ORG_TOKEN": env_secrets[i]},
            permission_rules=[options_pb.PermissionRule(tool_pattern="Read", action=ALLOW)],
        )
        for i in range(2)
    ]
    # Each organisation's agent leaves a secret in its workspace; its process stays warm (its
    # environment holds the organisation's variable) while the other one probes.
    transcripts = ["", ""]
    for i in range(2):
        events = await runtime.turn(
            sessions[i],
            directive(
                {"tool": "Bash", "input": {"command": f"echo {file_secrets[i]} > secret.txt"}},
                {"text": "saved"},
            ),
            agent=agents[i],
            organization=ORGS[i],
        )
        assert events[-1].turn_result.status == event_pb.TurnResult.STATUS_SUCCEEDED
        transcripts[i] = events[-1].turn_result.transcript_id
        assert (runtime.workspace(sessions[i]) / "secret.txt").read_text().strip() == (
            file_secrets[i]
        )

    for me, other in ((0, 1), (1, 0)):
        other_workspace = runtime.workspace(sessions[other])
        # On the host, everything the agent will look for is there to be found.
        assert (other_workspace / "secret.txt").exists()
        assert _processes_with(env_secrets[other]), "the other agent's process is not running"
        assert _processes_with(platform_secret) and _processes_with(platform_argument)
        assert list((runtime.root / "state").glob("*.json"))

        script = _probe_script(other_workspace, runtime.root, data_dir)
        reads = [other_workspace / "secret.txt", data_dir / "service-api-key"]
        steps: list[dict[str, Any]] = [{"tool": "Bash", "input": {"command": script}}]
        steps += [{"tool": "Read", "input": {"file_path": str(path)}} for path in reads]
        events = await runtime.turn(
            sessions[me],
            directive(*steps, {"text": "probed"}),
            agent=agents[me],
            organization=ORGS[me],
            resume=transcripts[me],
        )
        assert events[-1].turn_result.status == event_pb.TurnResult.STATUS_SUCCEEDED
        probe = (runtime.workspace(sessions[me]) / "probe.txt").read_text()
        assert "--end" in probe, probe  # the script ran to its end

        assert f"uid={AGENT_UID}\n" in probe and "uid=0\n" not in probe
        hidden = (file_secrets[other], env_secrets[other], platform_secret, platform_argument)
        for value in (*hidden, service_key, ring):
            assert value not in probe
        # The runtime's data: the agent's own session only, no state files, no other session.
        assert sessions[other] not in _section(probe, "runtime-data").replace(
            str(other_workspace), ""
        )
        assert "organizations/" not in _section(probe, "runtime-data")
        # Its own process table: a handful of processes, none of the platform's.
        count = int(_section(probe, "processes").split("\n")[1])
        assert 0 < count < 10
        assert "pytest" not in _section(probe, "processes")

        # The Read tool (run by the CLI, inside the sandbox) finds nothing either.
        results = [e.tool_result for e in events if e.HasField("tool_result")]
        assert len(results) == 3
        for result in results[1:]:
            assert file_secrets[other] not in result.content
            assert service_key not in result.content
            assert result.is_error

    # The agents' own work is where it should be; nothing of ours is in their workspaces.
    for i in range(2):
        names = sorted(p.name for p in runtime.workspace(sessions[i]).iterdir())
        assert names == ["probe.txt", "secret.txt"]


async def test_an_mcp_servers_secrets_are_out_of_the_agents_reach(
    make_runtime: Callable[..., Any],
) -> None:
    runtime: Runtime = await make_runtime()
    secret = _secret("mcp-token")
    calc = options_pb.McpServer(
        name="calc",
        stdio=options_pb.McpStdioTransport(
            command=sys.executable, args=[str(MCP_SERVER)], env={"CALC_API_TOKEN": secret}
        ),
    )
    agent = options(
        allowed_tools=["Bash"],
        mcp_servers=[calc],
        permission_rules=[options_pb.PermissionRule(tool_pattern="mcp__calc__*", action=ALLOW)],
    )
    # Everything the agent's tools can read: every process's command line and environment,
    # and every file in its home (the CLI's configuration), its /tmp and its workspace.
    search = "; ".join(
        [
            "exec > probe.txt 2>&1",
            "for p in /proc/[0-9]*; do cat $p/cmdline $p/environ; echo; done | tr '\\0' '\\n'",
            "find $HOME /tmp . -type f ! -name probe.txt -exec cat {} + 2>/dev/null",
            "echo --end",
        ]
    )
    session = new_session()
    events = await runtime.turn(
        session,
        directive(
            {"tool": "mcp__calc__add", "input": {"a": 2, "b": 40}},
            {"tool": "Bash", "input": {"command": search}},
            {"text": "searched"},
        ),
        agent=agent,
    )
    assert events[-1].turn_result.status == event_pb.TurnResult.STATUS_SUCCEEDED
    results = [e.tool_result for e in events if e.HasField("tool_result")]
    assert "sum=42" in results[0].content and not results[0].is_error  # the tool works
    # The server has its secret (on the host it is there to be found) ...
    assert _processes_with(secret)
    # ... and the agent finds it nowhere.
    probe = (runtime.workspace(session) / "probe.txt").read_text(errors="replace")
    assert "--end" in probe and "claude" in probe  # it read the processes and files it has
    assert secret not in probe
