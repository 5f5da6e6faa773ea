"""Agents in sandboxes: every agent process (the Claude CLI, the tools it runs, its stdio MCP
servers) runs inside bubblewrap, as an unprivileged user.

What an agent sees:
- its session's workspace (read-write, its working directory) and its session's config
  directory (read-write: ``HOME`` and ``CLAUDE_CONFIG_DIR``, where its transcript lives);
- the system read-only (``/usr``, ``/etc``, the merged-usr links), the CLI binary read-only,
  and whatever extra read-only paths the operator lists (``CORRAL_RUNTIME_SANDBOX_READ_ONLY``,
  e.g. a virtualenv an MCP server runs from);
- a private ``/tmp``, ``/dev`` and ``/proc``: its own process table only (no other agent's or
  the platform's arguments or environment), its own hostname, no capabilities;
- nothing else: not other sessions, not the platform's data directory, keys, databases or
  repository.

It shares the host's network (it must reach the model endpoint and the MCP servers it is
allowed); restricting egress is the deployment's job (a Kubernetes NetworkPolicy on the runtime,
see the README). The process dies with the runtime (``--die-with-parent``).

When the runtime runs as root it first drops to ``CORRAL_RUNTIME_AGENT_UID`` (and GID), so even
an escape from the sandbox lands as an unprivileged user; bubblewrap then needs unprivileged
user namespaces, which the Linux kernels of current distributions allow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("corral.runtime.sandbox")

# The system, read-only; on merged-usr systems the top-level links are recreated as links.
SYSTEM_DIRECTORIES = ("/usr", "/etc")
TOP_LEVEL_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
PASSWD_FILE = ".corral-passwd"
GROUP_FILE = ".corral-group"


class SandboxUnavailable(RuntimeError):
    """Agents cannot be sandboxed here (no bubblewrap, or user namespaces are off)."""


@dataclass(frozen=True)
class SandboxPolicy:
    """How the runtime confines agents (from settings)."""

    enabled: bool = True
    uid: int = 10001
    gid: int = 10001
    read_only: Sequence[Path] = ()
    bwrap: str = field(default_factory=lambda: shutil.which("bwrap") or "")

    def require(self) -> None:
        if self.enabled and not self.bwrap:
            raise SandboxUnavailable(
                "bubblewrap (bwrap) is not installed: install it (Debian: apt-get install"
                " bubblewrap), or run agents unsandboxed with CORRAL_RUNTIME_SANDBOX=off"
                " (production also needs CORRAL_RUNTIME_ALLOW_UNSANDBOXED=true)"
            )


def command(
    policy: SandboxPolicy,
    *,
    workspace: Path,
    config_dir: Path,
    cli: Path,
    as_root: bool | None = None,
    hostname: str = "corral-agent",
) -> list[str]:
    """The command line that runs a program in the agent's sandbox: append the program and
    its arguments. As root, bubblewrap sets up the namespaces itself and ``setpriv`` drops to
    the agent user before the program starts; otherwise bubblewrap makes a user namespace."""
    root = os.geteuid() == 0 if as_root is None else as_root
    args = [policy.bwrap, "--die-with-parent", "--new-session", "--hostname", hostname]
    if root:
        args += ["--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"]
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    else:
        args += ["--unshare-all", "--share-net", "--cap-drop", "ALL"]
    for directory in SYSTEM_DIRECTORIES:
        args += ["--ro-bind", directory, directory]
    for link in TOP_LEVEL_LINKS:
        path = Path(link)
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), link]
        elif path.is_dir():
            args += ["--ro-bind", link, link]
    args += ["--proc", "/proc", "--dev", "/dev", "--perms", "01777", "--tmpfs", "/tmp"]
    args += ["--tmpfs", "/run"]
    made: set[Path] = set()
    mounts = [(cli.parent, "--ro-bind")]
    mounts += [(Path(p), "--ro-bind") for p in policy.read_only if Path(p).exists()]
    mounts += [(config_dir, "--bind"), (workspace, "--bind")]
    for path, how in mounts:
        if _under_system(path):
            continue  # already visible, read-only
        # Parents bubblewrap would otherwise make with the host's modes (e.g. /root is 0700,
        # which the agent user could not pass through).
        for parent in reversed(path.parents[:-1]):
            if parent not in made and not _under_system(parent):
                made.add(parent)
                args += ["--perms", "0755", "--dir", str(parent)]
        args += [how, str(path), str(path)]
        made.add(path)
    # Who the agent is: a passwd entry for its uid, so tools that look themselves up work.
    for name, target in ((PASSWD_FILE, "/etc/passwd"), (GROUP_FILE, "/etc/group")):
        if (config_dir / name).exists():
            args += ["--ro-bind", str(config_dir / name), target]
    args += ["--chdir", str(workspace), "--"]
    if root:
        args += [
            "setpriv",
            f"--reuid={policy.uid}",
            f"--regid={policy.gid}",
            "--clear-groups",
            "--no-new-privs",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ]
    return args


def _under_system(path: Path) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in SYSTEM_DIRECTORIES)


def prepare(policy: SandboxPolicy, *, workspace: Path, config_dir: Path) -> None:
    """Write the agent's passwd and group entries into its config directory (made here) and,
    when the runtime is root (it is the one that can), give the agent user its two
    directories: the config directory with everything in it, and the workspace, which storage
    made, itself (mode 0700). The files in a workspace are the agent's already: what it writes,
    and what storage writes there, which storage gives to the same user (it reads
    ``CORRAL_RUNTIME_AGENT_UID``/``GID`` too). Nothing is changed through a link: the walk opens
    each directory with ``O_NOFOLLOW`` and changes what it finds by descriptor, or by name
    relative to its directory's descriptor without following it."""
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / PASSWD_FILE).write_text(
        f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"agent:x:{policy.uid}:{policy.gid}:Corral agent:{config_dir}:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    (config_dir / GROUP_FILE).write_text(f"root:x:0:\nagent:x:{policy.gid}:\n")
    if os.geteuid() != 0:
        return
    for top, whole in ((config_dir, True), (workspace, False)):
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchown(fd, policy.uid, policy.gid)
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
        if whole:
            _give_tree(top, policy.uid, policy.gid)


def _give_tree(top: Path, uid: int, gid: int) -> None:
    """Everything under ``top`` becomes uid:gid; links are changed themselves, never followed
    (``fwalk`` does not descend into a directory that was swapped for a link)."""
    for _, directories, files, dir_fd in os.fwalk(top, follow_symlinks=False):
        for name in (*directories, *files):
            with contextlib.suppress(FileNotFoundError):
                os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
