"""`corral chat -m` for scripts: one turn, approvals answered without a person at a terminal
(--approve/--deny patterns, y/n lines on stdin), a request no one can answer denied at once
instead of waiting on a prompt nobody reads, and --json lines a script can parse."""

from __future__ import annotations

import json
from typing import Any

from tests.cli.conftest import Platform, corral
from tests.support.platform import directive


def bash_prompt(name: str) -> str:
    step = {"tool": "Bash", "input": {"command": f"echo approved > {name}"}}
    return directive({"text": "Writing.", "chunk": 4}, step, {"text": "Finished."})


def events(stdout: str) -> list[dict[str, Any]]:
    """Every stdout line of `--json` output is one JSON event."""
    return [json.loads(line) for line in stdout.splitlines()]


def decisions(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e["permissionDecision"] for e in lines if "permissionDecision" in e]


def session_of(stderr: str) -> str:
    return next(word for word in stderr.split() if word.startswith("sessions/"))


async def test_approve_pattern_answers_the_request(platform: Platform) -> None:
    ran = await corral(
        platform, "chat", "--json", "--ask", "Bash", "--approve", "Ba*", "-m", bash_prompt("a.txt")
    )
    assert ran.code == 0, ran
    lines = events(ran.out)
    assert [d["decision"] for d in decisions(lines)] == ["DECISION_ALLOW"]
    assert lines[-1]["turnResult"]["status"] == "STATUS_SUCCEEDED"
    workspace = platform.workspace(session_of(ran.err))
    assert (workspace / "a.txt").read_text().strip() == "approved"


async def test_deny_pattern_wins_and_the_tool_does_not_run(platform: Platform) -> None:
    ran = await corral(
        platform,
        "--json",
        "chat",
        "--ask",
        "Bash",
        "--approve",
        "*",
        "--deny",
        "Bash",
        "-m",
        bash_prompt("d.txt"),
    )
    assert ran.code == 0, ran  # the turn itself succeeds: the agent is told "no"
    (decision,) = decisions(events(ran.out))
    assert decision["decision"] == "DECISION_DENY"
    assert "--deny Bash" in decision["message"]
    assert not (platform.workspace(session_of(ran.err)) / "d.txt").exists()


async def test_answers_come_from_stdin(platform: Platform) -> None:
    yes = await corral(
        platform, "--json", "chat", "--ask", "Bash", "-m", bash_prompt("y.txt"), stdin=b"y\n"
    )
    no = await corral(
        platform, "--json", "chat", "--ask", "Bash", "-m", bash_prompt("n.txt"), stdin=b"no\n"
    )
    assert [d["decision"] for d in decisions(events(yes.out))] == ["DECISION_ALLOW"]
    assert [d["decision"] for d in decisions(events(no.out))] == ["DECISION_DENY"]
    assert (platform.workspace(session_of(yes.err)) / "y.txt").exists()
    assert not (platform.workspace(session_of(no.err)) / "n.txt").exists()
    assert "? allow Bash" in yes.err  # the question goes to stderr, not into the JSON


async def test_a_request_no_one_can_answer_is_denied_at_once(platform: Platform) -> None:
    """No pattern, and stdin is empty: denied by the CLI straight away, saying why (not by
    the runtime's 60 s permission timeout, which would say it timed out)."""
    ran = await corral(platform, "--json", "chat", "--ask", "Bash", "-m", bash_prompt("x.txt"))
    assert ran.code == 0, ran
    (decision,) = decisions(events(ran.out))
    assert decision["decision"] == "DECISION_DENY"
    assert "no one to ask" in decision["message"]
    assert decision.get("source") != "SOURCE_TIMEOUT"
    assert "no one to ask" in ran.err


async def test_a_failed_turn_exits_1(platform: Platform) -> None:
    failure = {"status": 400, "type": "invalid_request_error", "message": "scripted failure"}
    ran = await corral(platform, "chat", "-m", directive({"error": failure, "retry": False}))
    assert ran.code == 1, ran
    assert "[failed" in ran.out


async def test_json_output_feeds_a_script(platform: Platform) -> None:
    """What the README shows: `corral --json chat -m ... | python3 -c ...`."""
    import asyncio
    import sys

    from tests.cli.conftest import cli_env

    script = (
        "import json, sys\n"
        "events = [json.loads(line) for line in sys.stdin]\n"
        "text = ''.join(e['textDelta']['text'] for e in events if 'textDelta' in e)\n"
        "result = events[-1]['turnResult']\n"
        "print(result['status'], int(result['usage']['outputTokens']) > 0, text)\n"
    )
    prompt = directive({"text": "Hello from the pipe.", "chunk": 5})
    shell = (
        f"{sys.executable} -m corral.services.cli --json chat -m '{prompt}'"
        f' | {sys.executable} -c "$SCRIPT"'
    )
    process = await asyncio.create_subprocess_shell(
        shell,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env={**cli_env(platform), "SCRIPT": script},
    )
    out, err = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode == 0, err.decode()
    assert out.decode().strip() == "STATUS_SUCCEEDED True Hello from the pipe."
