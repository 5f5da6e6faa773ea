"""The rest of the `corral` command: sessions (ls, show, archive, rm), events tail --after,
approvals (ls, answer), admin's subcommands in --help, shell completion, and colour only on a
terminal (never in a pipe, never with NO_COLOR)."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import sys
from pathlib import Path

from corral.services.identity.admin import parser as admin_parser
from corral.session.v1 import session_service_pb2 as spb
from tests.cli.conftest import Platform, cli_env, corral
from tests.support.platform import directive, until_turn_over

ESC = "\x1b["


async def new_session(platform: Platform, text: str = "hello") -> str:
    ran = await corral(platform, "chat", "-m", directive({"text": text, "chunk": 3}))
    assert ran.code == 0, ran
    return next(w for w in ran.err.split() if w.startswith("sessions/"))


async def test_sessions_ls_show_archive_rm(platform: Platform) -> None:
    name = await new_session(platform)
    listed = json.loads((await corral(platform, "sessions", "ls", "--json")).out)
    assert name in [s["name"] for s in listed["sessions"]]

    shown = await corral(platform, "sessions", "show", name, "--json")
    session = json.loads(shown.out)
    assert (session["name"], session["state"]) == (name, "STATE_IDLE")
    assert int(session["lastSequence"]) > 0

    text = await corral(platform, "sessions", "ls")
    assert name in text.out and "idle" in text.out.split(name)[1].splitlines()[0]

    archived = json.loads((await corral(platform, "--json", "sessions", "archive", name)).out)
    assert archived["state"] == "STATE_ARCHIVED"

    removed = await corral(platform, "sessions", "rm", name)
    assert removed.code == 0 and f"{name} deleted" in removed.out
    gone = await corral(platform, "sessions", "show", name, "--json")
    assert gone.code == 1
    assert json.loads(gone.out)["error"]["code"] == "NOT_FOUND"
    assert "NOT_FOUND" in gone.err


async def test_events_tail_after_a_sequence(platform: Platform) -> None:
    name = await new_session(platform, "tail me")
    ran = await corral(platform, "events", "tail", name, "--json")
    every = [json.loads(line) for line in ran.out.splitlines()]
    sequences = [int(e["sequence"]) for e in every]
    assert sequences == list(range(1, len(sequences) + 1))
    assert any("turnResult" in e for e in every)
    # Without --follow it stops at the newest event there was.
    shown = json.loads((await corral(platform, "sessions", "show", name, "--json")).out)
    assert sequences[-1] == int(shown["lastSequence"])

    later = await corral(platform, "events", "tail", name, "--after", "3", "--json")
    assert [int(json.loads(line)["sequence"]) for line in later.out.splitlines()] == sequences[3:]
    last_kind = next(
        k for k in every[-1] if k not in ("session", "sequence", "createTime", "turnId")
    )
    text = await corral(platform, "events", "tail", name, "--after", str(sequences[-2]))
    assert text.out.split()[0] == str(sequences[-1])
    assert last_kind.lower() == text.out.split()[1].replace("_", "").lower()


async def test_approvals_ls_and_answer(platform: Platform) -> None:
    """A turn waits on a permission request; `approvals ls` shows it, `approvals answer
    --approve` answers it once, and the turn goes on."""
    created = await corral(platform, "--json", "chat", "--ask", "Bash", "-m", "start")
    name = next(w for w in created.err.split() if w.startswith("sessions/"))
    await platform.sessions.SendMessage(
        spb.SendMessageRequest(
            session=name,
            text=directive({"tool": "Bash", "input": {"command": "echo ok > later.txt"}}),
        ),
        metadata=platform.auth,
    )
    async with asyncio.timeout(60):
        while True:
            waiting = json.loads((await corral(platform, "approvals", "ls", name, "--json")).out)
            if waiting["permissionRequests"]:
                break
            await asyncio.sleep(0.2)
    (request,) = waiting["permissionRequests"]
    assert request["toolName"] == "Bash"
    answered = await corral(platform, "approvals", "answer", name, "--approve", "Bash", "--json")
    assert json.loads(answered.out)["answered"] == [
        {"id": request["id"], "tool": "Bash", "allow": True}
    ]
    await until_turn_over(platform, name)
    assert (platform.workspace(name) / "later.txt").read_text().strip() == "ok"


async def test_admin_help_lists_every_subcommand(platform: Platform) -> None:
    ran = await corral(platform, "admin", "--help")
    assert ran.code == 0
    subcommands = next(a for a in admin_parser()._actions if a.dest == "command").choices
    assert subcommands
    for name in subcommands:
        assert name in ran.out, name
    top = await corral(platform, "--help")
    for command in ("sessions", "events", "approvals", "chat", "admin", "completion", "health"):
        assert command in top.out


async def test_admin_json(platform: Platform) -> None:
    ran = await corral(platform, "--json", "admin", "new-encryption-key")
    assert ran.code == 0, ran
    key = json.loads(ran.out)["encryption_key"]
    assert ":" in key


async def test_shell_completion(platform: Platform) -> None:
    script = await corral(platform, "completion", "bash")
    assert script.code == 0 and "complete" in script.out and "corral" in script.out
    # What bash does on <TAB> after `corral ses`, through argcomplete's protocol.
    words = os.path.join(str(platform.settings.data_dir), "completions")
    env = {
        "_ARGCOMPLETE": "1",
        "_ARGCOMPLETE_SHELL": "bash",
        "COMP_LINE": "corral sessions a",
        "COMP_POINT": str(len("corral sessions a")),
        "_ARGCOMPLETE_STDOUT_FILENAME": words,
        "_ARGCOMPLETE_IFS": "\n",
    }
    ran = await corral(platform, env=env)
    assert ran.code == 0, ran
    offered = await asyncio.to_thread(Path(words).read_text)
    assert offered.split() == ["archive"]


def _through_a_terminal(platform: Platform, args: list[str], **env: str) -> str:
    """Run corral with its stdout on a pseudo-terminal; returns what it wrote there."""
    import subprocess

    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "corral.services.cli", *args],
        stdout=follower,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env={**cli_env(platform), **env},
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the process is done writing
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=60)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


async def test_colour_only_on_a_terminal(platform: Platform) -> None:
    args = ["health", "identity"]
    assert ESC in await asyncio.to_thread(_through_a_terminal, platform, args)
    assert ESC not in await asyncio.to_thread(_through_a_terminal, platform, args, NO_COLOR="1")
    plain = await asyncio.to_thread(
        _through_a_terminal, platform, [*args[:1], "--no-color", *args[1:]]
    )
    assert ESC not in plain and "SERVING" in plain
    piped = await corral(platform, *args)
    assert "identity: SERVING" in piped.out and ESC not in piped.out
    chatted = await corral(
        platform, "chat", "-m", directive({"tool": "Bash", "input": {"command": "true"}})
    )
    assert "⚙ Bash" in chatted.out and ESC not in chatted.out + chatted.err
