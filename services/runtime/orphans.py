"""No agent process outlives its runtime.

Three layers, each enough for most cases and together for all:

- **The kernel.** The launcher sets a parent-death signal (``process.py``), so the CLI is killed
  when the runtime dies, however it dies; inside a sandbox, bubblewrap's ``--die-with-parent``
  and its own PID namespace take every process of the agent (its tools, a sandboxed stdio MCP
  server) with it.
- **The guard.** Unsandboxed, a tool the CLI ran in a session of its own, or a stdio MCP server
  the runtime started, is not the CLI's to take along. Every agent process carries its owner,
  the runtime instance that started it (``OWNER_VARIABLE``, inherited through the environment
  like the agent's tag). A small guard process per runtime (:class:`Guard`, this module run as
  a program) waits on a pipe only the runtime holds: when the runtime ends, even by SIGKILL,
  the pipe closes and the guard kills every process carrying its runtime's mark, then exits.
- **The next runtime.** A starting runtime reaps (:func:`reap`) every process that carries an
  owner of the same ``runtime_root`` whose runtime is gone: identified by pid *and* start time,
  so a reused pid is never taken for a live runtime, and each process is killed through a pidfd
  after its own start time is checked (``process.kill_all``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from corral.services.runtime import process

log = logging.getLogger("corral.runtime.orphans")

# "<root digest>:<runtime pid>:<its start time>:<instance>", in every agent's environment.
OWNER_VARIABLE = "CORRAL_AGENT_OWNER"
GUARD_ROUNDS = 20  # a process may start another while it is being killed: scan again
GUARD_STOP_SECONDS = 10.0


@dataclass(frozen=True)
class Owner:
    """A runtime instance: what its agents carry in ``OWNER_VARIABLE``."""

    root: str  # a digest of its runtime_root (the path itself stays out of agents' sight)
    pid: int
    start: int  # the runtime process's start time, in clock ticks since boot
    instance: str  # one per SDK started (a process may run several runtimes)

    @classmethod
    def of_this_process(cls, runtime_root: Path) -> Owner:
        me = process.identify(os.getpid())
        if me is None:
            raise RuntimeError("the runtime needs /proc to tell which processes are whose")
        return cls(_digest(runtime_root), me[0], me[1], uuid.uuid4().hex[:12])

    @property
    def marker(self) -> str:
        return f"{self.root}:{self.pid}:{self.start}:{self.instance}"

    @classmethod
    def parse(cls, marker: str) -> Owner | None:
        root, _, rest = marker.partition(":")
        pid, _, rest = rest.partition(":")
        start, _, instance = rest.partition(":")
        if not (root and pid.isdigit() and start.isdigit() and instance):
            return None
        return cls(root, int(pid), int(start), instance)

    def alive(self) -> bool:
        return process.alive((self.pid, self.start))


def _digest(runtime_root: Path) -> str:
    return hashlib.sha256(str(runtime_root.resolve()).encode()).hexdigest()[:16]


def owned_by(marker: str) -> list[process.ProcessId]:
    """The live processes carrying this owner's mark."""
    return [p for p, value in process.carrying(OWNER_VARIABLE) if value == marker]


def reap(current: Owner) -> int:
    """Kill every process a gone runtime of the same root left behind; returns how many. The
    processes of live runtimes (this one included) are left alone."""
    left: list[process.ProcessId] = []
    for found, marker in process.carrying(OWNER_VARIABLE):
        owner = Owner.parse(marker)
        if owner is not None and owner.root == current.root and not owner.alive():
            left.append(found)
    killed = process.kill_all(left)
    if killed:
        log.warning(
            "killed agent processes a previous runtime left running", extra={"count": killed}
        )
    return killed


class Guard:
    """The guard process of one runtime instance: it kills what the instance leaves running
    when the instance ends (:meth:`close`) or dies (its end of the pipe closes with it)."""

    def __init__(self, child: subprocess.Popen[bytes]) -> None:
        self._child = child

    @property
    def pid(self) -> int:
        return self._child.pid

    @classmethod
    def start(cls, owner: Owner) -> Guard:
        # Its own session: a signal to the runtime's process group (Ctrl-C) does not reach it.
        # Only the runtime holds the pipe's write end: no other child inherits it.
        child = subprocess.Popen(
            [sys.executable, "-I", "-m", __name__, owner.marker],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )
        return cls(child)

    async def close(self) -> None:
        """End the guard: it kills whatever still carries the mark, then exits."""
        if self._child.stdin is not None:
            self._child.stdin.close()
        try:
            await asyncio.to_thread(self._child.wait, GUARD_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            log.warning("the orphan guard did not exit; killing it")
            self._child.kill()
            await asyncio.to_thread(self._child.wait)


def guard(marker: str) -> int:
    """The guard's life: wait until stdin closes, then kill every process carrying ``marker``
    (again while new ones appear); returns how many were killed."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # it ends when its runtime has, not before
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(4096):
            pass
    killed = 0
    for _ in range(GUARD_ROUNDS):
        left = owned_by(marker)
        if not left:
            break
        killed += process.kill_all(left)
        time.sleep(0.05)
    return killed


if __name__ == "__main__":
    count = guard(sys.argv[1])
    if count:
        print(f"corral runtime guard: killed {count} agent processes", file=sys.stderr)
