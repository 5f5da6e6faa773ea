"""The agent process: how the Claude CLI is launched, with which environment, and how it dies.

The SDK starts the CLI with the runtime's whole environment plus ``options.env``. An agent must
see only what its session allows, so the SDK is pointed (``cli_path``) at a small launcher that
keeps the variables the runtime names in ``CORRAL_CLI_ENV`` (and those the SDK itself sets),
asks the kernel to kill it when the runtime dies (``PR_SET_PDEATHSIG``, kept across ``exec``),
starts a new session (``setsid``: the CLI leads its own process group, apart from the runtime's),
and then ``exec``s the real CLI, inside the agent's sandbox (``sandbox.py``: bubblewrap, as the
agent user, ``--die-with-parent``) unless sandboxing is off. What the runtime sees as the
agent's pid is then bubblewrap's; the CLI and everything it starts are its descendants.

Tools the CLI runs (Bash) live in sessions of their own and may outlive the CLI, so every
process an agent starts is found by its tag (``TAG_VARIABLE``, inherited through the
environment) as well as by descent, and whatever outlives its agent or its interrupted turn is
killed. What outlives the runtime itself is ``orphans.py``'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger("corral.runtime.process")

# Variables the runtime passes from its own environment to every agent.
PASSTHROUGH = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")
# Variables the SDK sets itself on the CLI's environment (it merges them over ours).
SDK_VARIABLES = (
    "CLAUDE_CODE_ENTRYPOINT",
    "CLAUDE_AGENT_SDK_VERSION",
    "CLAUDE_AGENT_SDK_CLIENT_APP",
    "CLAUDE_AGENT_SDK_DERIVED_CLIENT_APP",
    "CLAUDE_CODE_SDK_READS_SESSION_STATE",
    "CLAUDE_CODE_ENABLE_SDK_FILE_CHECKPOINTING",
    "PWD",
    "TRACEPARENT",
    "TRACESTATE",
)
KEEP_VARIABLE = "CORRAL_CLI_ENV"
CLI_VARIABLE = "CORRAL_CLI_PATH"
# The sandbox command (JSON list) the launcher runs the CLI under; absent: no sandbox.
SANDBOX_VARIABLE = "CORRAL_SANDBOX_COMMAND"
# Set to a fresh value for each agent process; everything it starts inherits it, so what it ran
# is found again even after it was re-parented (a tool that outlived a crashed CLI).
TAG_VARIABLE = "CORRAL_AGENT_TAG"
# The runtime's pid, for the launcher only: it dies at once if the runtime already has.
PARENT_VARIABLE = "CORRAL_AGENT_PARENT"

_LAUNCHER = '''\
"""Corral's Claude CLI launcher (written by the runtime; do not edit): keep only the
environment variables named in {keep} and the SDK's own, die with the runtime (the pid in
{parent}), start a new session, exec the CLI (inside the sandbox command in {sandbox}, if
there is one)."""
import ctypes
import json
import os
import signal
import sys

SDK_VARIABLES = {sdk!r}
keep = set(os.environ.get("{keep}", "").split(",")) | set(SDK_VARIABLES)
keep.discard("")
cli = os.environ["{cli}"]
sandbox = json.loads(os.environ.get("{sandbox}") or "[]")
parent = int(os.environ.get("{parent}") or 0)
env = {{name: value for name, value in os.environ.items() if name in keep}}
argv = [*sandbox, cli, *sys.argv[1:]]
if parent:
    # PR_SET_PDEATHSIG (1): SIGKILL when the runtime dies; it outlives exec.
    if ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:
        sys.exit("corral launcher: cannot set the parent-death signal")
    if os.getppid() != parent:  # the runtime died before the signal was set
        sys.exit("corral launcher: the runtime is gone")
os.setsid()
os.execve(argv[0], argv, env)
'''


def bundled_cli() -> Path:
    """The Claude Code CLI the SDK ships (the one it would run itself)."""
    import claude_agent_sdk  # here: the orphan guard imports this module, and starts fast

    return Path(claude_agent_sdk.__file__).resolve().parent / "_bundled" / "claude"


def cli_version(cli: Path) -> str:
    with contextlib.suppress(OSError):
        return cli.with_name("claude.version").read_text().strip()
    return ""


def install_launcher(directory: Path) -> Path:
    """Write the launcher (idempotent); returns its path, for ``ClaudeAgentOptions.cli_path``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "claude-launcher"
    text = f"#!{sys.executable} -IS\n" + _LAUNCHER.format(
        keep=KEEP_VARIABLE,
        cli=CLI_VARIABLE,
        sdk=SDK_VARIABLES,
        sandbox=SANDBOX_VARIABLE,
        parent=PARENT_VARIABLE,
    )
    if not path.exists() or path.read_text() != text:
        temporary = path.with_suffix(".tmp")
        temporary.write_text(text)
        temporary.chmod(0o755)
        temporary.replace(path)
    return path


def cli_environment(
    cli: Path,
    agent_env: Mapping[str, str],
    runtime_env: Mapping[str, str],
    sandbox: Sequence[str] = (),
) -> dict[str, str]:
    """The CLI's whole environment: a few of the runtime's own (``PASSTHROUGH``), the session's
    allowed variables, then the runtime's settings for the agent (which win). ``sandbox``: the
    command the launcher runs the CLI under (it reaches the launcher only, not the CLI)."""
    env = {name: os.environ[name] for name in PASSTHROUGH if name in os.environ}
    if sandbox:
        env["TMPDIR"] = "/tmp"  # the sandbox's own; the runtime's is not mounted there
    env.update(agent_env)
    env.update(runtime_env)
    env[KEEP_VARIABLE] = ",".join(sorted(env))
    env[CLI_VARIABLE] = str(cli)
    env[PARENT_VARIABLE] = str(os.getpid())
    if sandbox:
        env[SANDBOX_VARIABLE] = json.dumps(list(sandbox))
    return env


# --- process trees (Linux /proc) --------------------------------------------------------------

ProcessId = tuple[int, int]  # (pid, start time in clock ticks): a pid alone may be reused


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, or None (also for a zombie: it is dead)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None


def _pids() -> list[int]:
    """Every pid in /proc; none where /proc is absent."""
    try:
        return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []


def identify(pid: int) -> ProcessId | None:
    stat = _stat(pid)
    return None if stat is None else (pid, stat[1])


def descendants(root: int) -> list[ProcessId]:
    """Every live descendant of ``root`` (not ``root`` itself); empty where /proc is absent."""
    children: dict[int, list[int]] = {}
    started: dict[int, int] = {}
    for pid in _pids():
        stat = _stat(pid)
        if stat is not None:
            children.setdefault(stat[0], []).append(pid)
            started[pid] = stat[1]
    found: list[ProcessId] = []
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        if pid in started:
            found.append((pid, started[pid]))
        stack.extend(children.get(pid, []))
    return found


def tree_rss(roots: list[int]) -> int:
    """Resident memory (bytes) of the processes ``roots`` and all their descendants, each
    counted once; 0 where /proc is absent."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        stat = _stat(pid)
        if stat is not None:
            children.setdefault(stat[0], []).append(pid)
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid not in seen:
            seen.add(pid)
            stack.extend(children.get(pid, []))
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in seen:
        try:
            with open(f"/proc/{pid}/statm", encoding="ascii") as handle:
                total += int(handle.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
    return total


def carrying(variable: str) -> list[tuple[ProcessId, str]]:
    """Every live process whose environment sets ``variable``, with its value (processes of
    other users whose environment cannot be read are not seen)."""
    prefix = f"{variable}=".encode()
    found: list[tuple[ProcessId, str]] = []
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                variables = handle.read().split(b"\0")
        except OSError:
            continue
        for entry in variables:
            if entry.startswith(prefix) and (identity := identify(pid)) is not None:
                found.append((identity, entry[len(prefix) :].decode(errors="replace")))
                break
    return found


def tagged(tag: str) -> list[ProcessId]:
    """Every live process whose environment carries ``TAG_VARIABLE=tag``."""
    return [process for process, value in carrying(TAG_VARIABLE) if value == tag]


def alive(process: ProcessId) -> bool:
    stat = _stat(process[0])
    return stat is not None and stat[1] == process[1]


def kill_all(processes: list[ProcessId]) -> int:
    """SIGKILL each process still alive (and the group it leads, if it leads one); returns how
    many were killed. A pid whose process is not the one identified any more (it ended and the
    pid was reused) is left alone."""
    killed = sum(1 for process in processes if _kill(process))
    if killed:
        log.info("killed processes that outlived their agent", extra={"count": killed})
    return killed


def _kill(process: ProcessId) -> bool:
    """SIGKILL through a pidfd (Linux 5.3+): opened first, then the start time checked, so the
    signal reaches the process identified or none."""
    pid = process[0]
    try:
        handle: int | None = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except OSError:  # no pidfds here: the start time check alone
        handle = None
    try:
        if not alive(process):
            return False
        leader = os.getpgid(pid) == pid
        if handle is not None:
            signal.pidfd_send_signal(handle, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        if leader:  # what it started in its group (the group id stays taken while it is used)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        if handle is not None:
            os.close(handle)
