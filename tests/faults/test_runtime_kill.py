"""a. The runtime is killed (-9) in the middle of a turn, while the agent runs a tool, with its
agents sandboxed and not: the turn ends FAILED, no process of it is left running (an agent's: the
CLI, its sandbox, the tool, found by the runtime's tag in their environment; or any descendant of
the runtime), and the restarted runtime serves the session's next turn."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from tests.faults.client import (
    FAILED,
    QUICK,
    SUCCEEDED,
    Client,
    Watcher,
    noted,
    until,
)
from tests.faults.record import record
from tests.support.platform import directive
from tests.support.topology import (
    AgentProcess,
    agent_processes,
    descendants,
    kill_agent_processes,
)

pytestmark = pytest.mark.timeout(300)

DIE_WITHIN = 10.0  # seconds for the agents of a dead runtime to be gone


async def _survivors(processes: list[AgentProcess], within: float) -> list[AgentProcess]:
    """Those of ``processes`` still alive after up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        alive = [p for p in processes if p.alive]
        if not alive or time.monotonic() > deadline:
            return alive
        await asyncio.sleep(0.1)


# Agents in bubblewrap (the default), and unsandboxed (CORRAL_RUNTIME_SANDBOX=off, which an
# operator may allow): without the sandbox's own die-with-parent, the runtime must see to it.
SANDBOXES = {
    "sandboxed": {},
    "unsandboxed": {"CORRAL_RUNTIME_SANDBOX": "off", "CORRAL_RUNTIME_ALLOW_UNSANDBOXED": "true"},
}


@pytest.fixture(params=list(SANDBOXES))
async def sandbox(request: pytest.FixtureRequest, client: Client) -> AsyncIterator[str]:
    """The runtime, (re)started with the sandbox setting of the case; as it was afterwards."""
    runtime = client.topology.runtimes[0]
    settings: dict[str, str] = SANDBOXES[request.param]
    if not settings:
        yield request.param
        return
    before = dict(runtime.env)
    runtime.env.update(settings)
    await client.topology.restart(runtime)
    try:
        yield request.param
    finally:
        runtime.env = before
        await client.topology.restart(runtime)


async def test_runtime_killed_mid_turn(client: Client, sandbox: str) -> None:
    topology = client.topology
    runtime = topology.runtimes[0]
    (user,) = await client.new_users(1, "runtime-kill")
    session = await client.new_session(user, allowed_tools=["Bash"])
    # The agent runs a long tool: the CLI and a child of its own are running when it dies.
    marker = f"corral-faults-{uuid.uuid4().hex}"
    command = f"python3 -c 'import time; time.sleep(300)' {marker}"
    turn = await client.send(
        user,
        session,
        directive({"text": "working on it"}, {"tool": "Bash", "input": {"command": command}}),
    )
    watcher = Watcher(client, user, session, [topology.edge]).start()
    problems: list[str] = []
    measured: dict[str, object] = {}
    leftovers: list[AgentProcess] = []
    try:
        await watcher.streaming(turn, within=90)

        async def tool_running() -> list[AgentProcess] | None:
            found = agent_processes(topology.runtime_root)
            return found if any(marker in p.cmdline for p in found) else None

        agents = await until(tool_running, within=60, what="the agent's tool running", every=0.1)
        measured["agent_processes_mid_turn"] = len(agents)
        # And whatever else the runtime started: none of it may outlive it either.
        started = descendants(runtime.pid)
        measured["runtime_descendants"] = len(started)
        killed = time.monotonic()
        await runtime.kill()

        result = await noted(problems, watcher.result_of(turn, within=60))
        if result is not None:
            measured["turn_ended_s"] = time.monotonic() - killed
            if result.status != FAILED:
                problems.append(f"the turn ended {result.status}, not FAILED: {result}")

        # Every process of the dead runtime's agents, including those it started since.
        leftovers = await _survivors(
            list({*agents, *started, *agent_processes(topology.runtime_root)}), DIE_WITHIN
        )
        measured["agent_processes_left"] = len(leftovers)
        if leftovers:
            problems.append(
                f"{len(leftovers)} of its processes still running {DIE_WITHIN:g} s after the"
                " runtime was killed: "
                + "; ".join(f"pid {p.pid}: {p.cmdline[:100]}" for p in leftovers)
            )

        await topology.restart(runtime)
        measured["runtime_ready_s"] = time.monotonic() - killed
        if leftovers:  # a starting runtime should reap what its predecessor left
            leftovers = await _survivors(leftovers, DIE_WITHIN)
            measured["agent_processes_left_after_restart"] = len(leftovers)
            if leftovers:
                problems.append(
                    f"{len(leftovers)} of them still running {DIE_WITHIN:g} s after the"
                    " runtime restarted (not reaped)"
                )

        await topology.edge_sees_healthy()
        after = await client.send(user, session, QUICK)
        next_result = await noted(problems, watcher.result_of(after, within=90))
        if next_result is not None:
            measured["next_turn_served_s"] = time.monotonic() - killed
            if next_result.status != SUCCEEDED:
                problems.append(f"the next turn after the restart ended {next_result}")
        record(f"a_runtime_kill_{sandbox}", **measured, problems=len(problems))
    finally:
        await watcher.stop()
        kill_agent_processes(leftovers)  # clean up after recording what was left
    assert not problems, problems
