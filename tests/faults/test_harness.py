"""The harness's own oracle: a process carrying the runtime's agent tag and a home under the
topology's runtime root is found (so a survivor of a killed runtime would be reported), one
without either is not, and it is gone once killed."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from corral.services.runtime.process import TAG_VARIABLE
from tests.support.topology import AgentProcess, agent_processes, kill_agent_processes


def _found(root: Path, within: float = 10) -> list[AgentProcess]:
    """Polled: a child shows its own environment only once it has exec'd."""
    deadline = time.monotonic() + within
    while not (found := agent_processes(root)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return found


def test_agent_processes_are_found_by_tag_and_runtime_root(tmp_path: Path) -> None:
    root = tmp_path / "runtime"
    home = root / "sessions" / "s1"
    home.mkdir(parents=True)
    tagged = {TAG_VARIABLE: "t1", "HOME": str(home), "PATH": "/usr/bin:/bin"}
    children = [
        subprocess.Popen(["sleep", "60"], env=env)
        for env in (tagged, {**tagged, "HOME": str(tmp_path)}, {"HOME": str(home)})
    ]
    try:
        found = _found(root)
        assert [p.pid for p in found] == [children[0].pid]
        assert found[0].alive and "sleep 60" in found[0].cmdline
        kill_agent_processes(found)
        assert children[0].wait(10) == -9
        assert not found[0].alive
        assert agent_processes(root) == []
    finally:
        for child in children:
            child.kill()
            child.wait()
