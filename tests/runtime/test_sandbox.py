"""The agent sandbox on its own (real bubblewrap): what a process inside can and cannot reach.

The runtime's end-to-end isolation (two organisations' agents through Bash, file tools and MCP)
is in tests/security; this holds the sandbox's own promises."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest

from corral.services.runtime.sandbox import SandboxPolicy, command, prepare

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture
def policy() -> SandboxPolicy:
    found = SandboxPolicy()
    if not found.bwrap:
        if IN_CI:
            pytest.fail("bubblewrap is not installed; .ci/run installs it")
        pytest.skip("bubblewrap is not installed")
    return found


def _run(policy: SandboxPolicy, root: Path, session: str, script: str) -> tuple[int, str]:
    workspace, config = root / "workspaces" / session, root / "sessions" / session
    workspace.mkdir(parents=True, exist_ok=True)  # storage makes a session's workspace
    prepare(policy, workspace=workspace, config_dir=config)
    argv = command(policy, workspace=workspace, config_dir=config, cli=Path("/usr/bin/env"))
    done = subprocess.run(
        [*argv, "/bin/sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "HOME": str(config)},
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def test_an_agent_sees_its_own_workspace_and_nothing_of_others(
    policy: SandboxPolicy, tmp_path: Path
) -> None:
    root = tmp_path / "runtime"
    (root / "workspaces" / "other").mkdir(parents=True)
    (root / "workspaces" / "other" / "secret.txt").write_text("other org's data")
    (tmp_path / "platform-key.pem").write_text("PRIVATE KEY")
    code, out = _run(
        policy,
        root,
        "mine",
        "echo hello > made.txt && cat made.txt;"
        f" echo workspaces: $(ls {root}/workspaces);"
        f" cat {root}/workspaces/other/secret.txt {tmp_path}/platform-key.pem;"
        " touch /usr/evil /etc/evil; echo done",
    )
    assert code == 0, out
    assert "hello" in out and "done" in out
    assert "workspaces: mine\n" in out  # the other session's folder is not there at all
    assert "other org's data" not in out and "PRIVATE KEY" not in out
    assert (root / "workspaces" / "mine" / "made.txt").read_text() == "hello\n"
    assert not Path("/usr/evil").exists() and not Path("/etc/evil").exists()


def test_an_agent_runs_unprivileged_in_its_own_process_table(
    policy: SandboxPolicy, tmp_path: Path
) -> None:
    marker = f"corral-host-secret-{os.getpid()}"
    host = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", marker],
        env={"CORRAL_SECRET": marker},
    )
    try:
        code, out = _run(
            policy,
            tmp_path,
            "s1",
            "id -u; id -un; cat /proc/*/cmdline /proc/*/environ 2>/dev/null | tr '\\0' ' ';"
            " echo; ls /proc | grep -c '^[0-9]'",
        )
    finally:
        host.kill()
        host.wait()
    assert code == 0, out
    lines = out.splitlines()
    if os.geteuid() == 0:
        assert lines[0] == str(policy.uid)
        assert lines[1] == "agent"
    assert marker not in out
    assert int(lines[-1]) < 10  # bubblewrap, the shell and its children only


def _readable(stream: IO[bytes], seconds: float) -> bool:
    return bool(select.select([stream], [], [], seconds)[0])


def test_the_sandbox_dies_with_its_parent(policy: SandboxPolicy, tmp_path: Path) -> None:
    """The runtime's death takes its agents with it (--die-with-parent). The sandboxed
    process holds the pipe: end of file on it means every process in the sandbox is gone."""
    workspace, config = tmp_path / "w", tmp_path / "c"
    workspace.mkdir()
    prepare(policy, workspace=workspace, config_dir=config)
    argv = command(policy, workspace=workspace, config_dir=config, cli=Path("/usr/bin/env"))
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys; subprocess.Popen(sys.argv[1:]); sys.stdout.close(); input()",
            *argv,
            "/bin/sh",
            "-c",
            "echo ready; exec sleep 300",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert parent.stdout is not None
    assert _readable(parent.stdout, 30), "the sandboxed process never started"
    assert parent.stdout.readline() == b"ready\n"
    parent.kill()
    parent.wait()
    assert _readable(parent.stdout, 30), "the sandboxed process outlived its parent"
    assert parent.stdout.read() == b""


async def test_production_refuses_unsandboxed_agents_unless_the_operator_opts_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from corral.libs.config import Settings
    from corral.services.runtime.main import sandbox_policy
    from corral.services.runtime.sandbox import SandboxUnavailable

    def settings(**values: object) -> Settings:
        return Settings(data_dir=tmp_path, **values)  # type: ignore[arg-type]

    with pytest.raises(SandboxUnavailable):
        await sandbox_policy(settings(env="production", runtime_sandbox="off"))
    opted_out = settings(env="production", runtime_sandbox="off", runtime_allow_unsandboxed=True)
    assert await sandbox_policy(opted_out) is None
    assert await sandbox_policy(settings(runtime_sandbox="off")) is None  # development: warns

    # bubblewrap missing: production refuses, development warns and goes on.
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(SandboxUnavailable):
        await sandbox_policy(settings(env="production"))
    assert await sandbox_policy(settings()) is None


async def test_the_runtime_sandboxes_agents_when_bubblewrap_works(
    policy: SandboxPolicy, tmp_path: Path
) -> None:
    from corral.libs.config import Settings
    from corral.services.runtime.main import sandbox_policy

    found = await sandbox_policy(
        Settings(data_dir=tmp_path, env="production", runtime_agent_uid=20002)
    )
    assert found is not None and found.uid == 20002 and found.bwrap


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root runtime gives directories away")
def test_prepare_gives_the_agent_its_directories_and_follows_no_link(tmp_path: Path) -> None:
    """As root, prepare() makes the config directory (and all in it) and the workspace itself
    the agent user's; a link the agent planted is changed itself, never what it points at,
    and the workspace's files (the agent's, or storage's, which storage gives to the agent
    user) are not touched."""
    policy = SandboxPolicy(uid=10001, gid=10001)
    outside = tmp_path / "platform-key.pem"
    outside.write_text("PRIVATE KEY")
    workspace, config = tmp_path / "workspace", tmp_path / "config"
    (config / "projects").mkdir(parents=True)
    (config / "projects" / "t.jsonl").write_text("{}")
    (config / "key").symlink_to(outside)
    (config / "up").symlink_to(tmp_path)
    workspace.mkdir()
    (workspace / "kept.txt").write_text("root's")
    (workspace / "key").symlink_to(outside)

    prepare(policy, workspace=workspace, config_dir=config)

    def owner(path: Path) -> tuple[int, int]:
        found = path.lstat()
        return found.st_uid, found.st_gid

    agent = (10001, 10001)
    assert owner(config) == owner(config / "projects") == owner(config / "projects" / "t.jsonl")
    assert owner(config) == agent and owner(config / "key") == owner(config / "up") == agent
    assert owner(workspace) == agent and workspace.stat().st_mode & 0o777 == 0o700
    assert owner(outside) == owner(tmp_path) == owner(workspace / "kept.txt") == (0, 0)
    assert owner(workspace / "key") == (0, 0)
