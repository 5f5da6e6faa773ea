"""No agent process outlives its runtime. A runtime runs in a process of its own (the real SDK
and CLI, the offline model), mid-turn with a long Bash tool and a stdio MCP server: killed with
SIGKILL (sandboxed and not), it leaves nothing running; what survives anyway (here: started
outside the die-with-parent chain, with the guard killed too) is reaped by the next runtime on
the same root, and nothing of a live runtime or of another root is; SIGTERM drains the turn and
reports its cost. Processes are found in /proc, by their environment and command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from corral.runtime.v1 import agent_options_pb2 as options_pb
from corral.runtime.v1 import runtime_event_pb2 as event_pb
from corral.runtime.v1 import runtime_service_pb2 as pb
from corral.runtime.v1 import runtime_service_pb2_grpc as pb_grpc
from tests.runtime.conftest import (
    CLI_MARKER,
    ORG,
    SANDBOX_READ_ONLY,
    directive,
    new_session,
    options,
    processes_with,
    service_token,
)
from tests.runtime.test_runtime_pool import eventually, long_tool
from tests.support.keys import SigningKey

REPO = Path(__file__).resolve().parents[2]
MCP_SERVER = Path(__file__).with_name("mcp_calc_server.py")
OWNER = "CORRAL_AGENT_OWNER"  # "<root digest>:<runtime pid>:<its start time>:<instance>"
GUARD = "corral.services.runtime.orphans"
INTERRUPTED = event_pb.TurnResult.STATUS_INTERRUPTED


def environment(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            entries = handle.read().split(b"\0")
    except OSError:
        return {}
    pairs = (entry.decode(errors="replace").partition("=") for entry in entries if entry)
    return {name: value for name, _, value in pairs}


def start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        text = handle.read()
    return int(text[text.rfind(")") + 2 :].split()[19])


def owned_by(runtime_pid: int) -> list[int]:
    """Live processes whose environment names the runtime with this pid as their owner."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            owner = environment(int(entry)).get(OWNER, "").split(":")
            if len(owner) == 4 and owner[1] == str(runtime_pid):
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children_running(parent: int, marker: str) -> list[int]:
    found = []
    for pid in processes_with(marker):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as handle:
            if int(handle.read().rsplit(")", 1)[1].split()[1]) == parent:
                found.append(pid)
    return found


@dataclass
class RuntimeProcess:
    child: asyncio.subprocess.Process
    stub: pb_grpc.RuntimeServiceStub
    channel: grpc.aio.Channel
    token: str
    workspaces: Path  # storage's folder of workspaces
    strays: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.child.pid

    def run(
        self, prompt: str, agent: options_pb.AgentOptions
    ) -> grpc.aio.UnaryStreamCall[pb.RunTurnRequest, pb.RunTurnResponse]:
        session = new_session()
        (self.workspaces / session).mkdir(parents=True)  # as storage makes a session's
        request = pb.RunTurnRequest(
            session=f"sessions/{session}",
            turn_id="turn-1",
            organization=ORG,
            actor="organizations/acme/users/alice",
            workspace=f"workspaces/{session}",
            options=agent,
            prompt=prompt,
        )
        return self.stub.RunTurn(
            request, metadata=(("authorization", f"Bearer {self.token}"),), timeout=60
        )

    def guard(self) -> int:
        (pid,) = children_running(self.pid, GUARD)
        return pid


StartRuntime = Callable[..., Awaitable[RuntimeProcess]]


@pytest.fixture
async def start_runtime(tmp_path: Path, signing_key: SigningKey) -> AsyncIterator[StartRuntime]:
    """Starts runtimes in processes of their own; kills them and anything they left, after."""
    started: list[RuntimeProcess] = []

    async def start(root: Path, **settings: str) -> RuntimeProcess:
        env = {
            **os.environ,
            "TEST_JWKS": json.dumps(signing_key.jwks()),
            "CORRAL_DATA_DIR": str(tmp_path),
            "CORRAL_RUNTIME_ROOT": str(root),
            "CORRAL_STORAGE_ROOT": str(tmp_path / "storage"),
            "CORRAL_RUNTIME_SANDBOX_READ_ONLY": json.dumps([str(p) for p in SANDBOX_READ_ONLY]),
            "CORRAL_METRICS_ENABLED": "false",
            "CORRAL_LOG_LEVEL": "WARNING",
            "ANTHROPIC_API_KEY": "",
            "ANTHROPIC_BASE_URL": "",
            **settings,
        }
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.runtime.runtime_process",
            env=env,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
        )
        assert child.stdout is not None
        address = (await asyncio.wait_for(child.stdout.readline(), 60)).decode().strip()
        assert address, "the runtime did not start"
        channel = grpc.aio.insecure_channel(address)
        runtime = RuntimeProcess(
            child,
            pb_grpc.RuntimeServiceStub(channel),
            channel,
            service_token(signing_key),
            tmp_path / "storage" / "workspaces",
        )
        started.append(runtime)
        return runtime

    yield start
    for runtime in started:
        await runtime.channel.close()
        if runtime.child.returncode is None:
            runtime.child.kill()
            await runtime.child.wait()
        for pid in owned_by(runtime.pid):  # a failed test leaves nothing running
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def stray(env: dict[str, str], marker: str) -> subprocess.Popen[bytes]:
    """A process outside any runtime's die-with-parent chain, marked as ``env`` says."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", marker],
        env={"PATH": os.environ["PATH"], **env},
        start_new_session=True,
    )


async def until_tool_runs(
    call: grpc.aio.UnaryStreamCall[pb.RunTurnRequest, pb.RunTurnResponse], marker: str
) -> list[event_pb.RuntimeEvent]:
    events = []
    async for response in call:
        events.append(response.event)
        if response.event.HasField("tool_use"):
            break
    assert await eventually(lambda: bool(processes_with(marker)), within=10), "no tool"
    return events


def calc_server() -> options_pb.McpServer:
    return options_pb.McpServer(
        name="calc",
        stdio=options_pb.McpStdioTransport(command=sys.executable, args=[str(MCP_SERVER)]),
    )


@pytest.mark.parametrize("sandbox", ["bwrap", "off"])
async def test_a_runtime_killed_mid_turn_takes_every_agent_process_with_it(
    start_runtime: StartRuntime, tmp_path: Path, sandbox: str
) -> None:
    runtime: RuntimeProcess = await start_runtime(tmp_path / "root", CORRAL_RUNTIME_SANDBOX=sandbox)
    marker, hidden = f"corral-marker-{uuid.uuid4().hex}", f"corral-hidden-{uuid.uuid4().hex}"
    agent = options(allowed_tools=["Bash"], mcp_servers=[calc_server()])
    prompt = long_tool(marker)
    if sandbox == "bwrap":
        # A hostile agent's process that sheds every mark (no environment, a session of its
        # own): its sandbox's PID namespace still takes it along.
        escape = f"setsid env -i /usr/bin/python3 -c 'import time; time.sleep(60)' {hidden} &"
        prompt = directive(
            {"tool": "Bash", "input": {"command": escape}},
            *json.loads(prompt.removeprefix("<<corral-model ").removesuffix(">>")),
        )
    call = runtime.run(prompt, agent)
    await until_tool_runs(call, marker)
    assert sandbox != "bwrap" or processes_with(hidden), "the unmarked process did not start"

    # Two scans of /proc: the tool's shell may fork between them, so the check is repeated
    # until it holds (a bounded poll) rather than judged on one pair of snapshots.
    assert await eventually(lambda: set(processes_with(marker)) <= set(owned_by(runtime.pid))), (
        "the tool does not carry its owner"
    )
    owned = set(owned_by(runtime.pid))
    assert set(processes_with(str(MCP_SERVER))) <= owned
    assert processes_with(str(MCP_SERVER)), "the MCP server did not start"
    assert owned & set(processes_with(CLI_MARKER)), "the CLI does not carry its owner"
    guard = runtime.guard()

    runtime.child.kill()
    killed = time.monotonic()
    assert await eventually(
        lambda: not owned_by(runtime.pid) and not processes_with(marker), within=10
    ), f"left running: {owned_by(runtime.pid)}"
    assert await eventually(lambda: not processes_with(hidden), within=10)
    gone = time.monotonic() - killed
    assert await eventually(lambda: not alive(guard), within=10), "the guard lives on"
    print(f"\n[{sandbox}] {len(owned)} agent processes gone {gone:.3f} s after SIGKILL")
    with pytest.raises(grpc.aio.AioRpcError):
        await call.read()


async def test_a_starting_runtime_reaps_what_a_dead_one_left_and_nothing_else(
    start_runtime: StartRuntime, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    first: RuntimeProcess = await start_runtime(root)
    marker = f"corral-marker-{uuid.uuid4().hex}"
    await until_tool_runs(first.run(long_tool(marker), options(allowed_tools=["Bash"])), marker)
    owner = environment(processes_with(marker)[0])[OWNER]
    digest, runtime_pid, runtime_start, _ = owner.split(":")
    assert int(runtime_pid) == first.pid
    me, my_start = os.getpid(), start_time(os.getpid())
    strays_marker = f"corral-stray-{uuid.uuid4().hex}"
    strays = {
        # As if it had escaped the first runtime's chain: the next runtime's to reap.
        "escaped": stray({OWNER: owner}, f"escaped-{strays_marker}"),
        # Its owner's pid is alive, but that is another process now (another start time).
        "reused pid": stray(
            {OWNER: f"{digest}:{me}:{my_start - 1}:gone"}, f"reused-{strays_marker}"
        ),
        # A live runtime's (this test process stands in for it): not to be touched.
        "live owner": stray({OWNER: f"{digest}:{me}:{my_start}:live"}, f"live-{strays_marker}"),
        # Another runtime root's: not this runtime's business.
        "other root": stray(
            {OWNER: f"{'0' * 16}:{first.pid}:{runtime_start}:x"}, f"other-{strays_marker}"
        ),
    }
    try:
        # The guard goes first, so that nothing cleans up after the runtime's death.
        os.kill(first.guard(), signal.SIGKILL)
        first.child.kill()
        await first.child.wait()
        assert await eventually(lambda: not processes_with(marker), within=10)
        assert all(p.poll() is None for p in strays.values()), "something reaped them early"

        await start_runtime(root)  # serving: it has reaped by now
        assert await eventually(
            lambda: strays["escaped"].poll() is not None and strays["reused pid"].poll() is not None
        )
        assert strays["escaped"].returncode == strays["reused pid"].returncode == -signal.SIGKILL
        assert strays["live owner"].poll() is None
        assert strays["other root"].poll() is None
    finally:
        for process in strays.values():
            process.kill()
            process.wait()


async def test_sigterm_interrupts_the_turn_reports_its_cost_and_leaves_nothing(
    start_runtime: StartRuntime, tmp_path: Path
) -> None:
    runtime: RuntimeProcess = await start_runtime(tmp_path / "root")
    marker = f"corral-marker-{uuid.uuid4().hex}"
    call = runtime.run(long_tool(marker), options(allowed_tools=["Bash"]))
    events = await until_tool_runs(call, marker)
    owned = owned_by(runtime.pid)

    runtime.child.send_signal(signal.SIGTERM)
    stopping = time.monotonic()
    events += [response.event async for response in call]
    assert await call.code() == grpc.StatusCode.OK
    assert await asyncio.wait_for(runtime.child.wait(), 30) == 0
    took = time.monotonic() - stopping
    result = events[-1].turn_result
    assert (result.status, result.error.reason) == (INTERRUPTED, "INTERRUPTED")
    assert result.usage.cost_usd_micros > 0
    assert result.usage.input_tokens > 0
    assert not owned_by(runtime.pid)
    assert not processes_with(marker)
    print(f"\nSIGTERM: {len(owned)} agent processes stopped, turn reported, exit in {took:.3f} s")
