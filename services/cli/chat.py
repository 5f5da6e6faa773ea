"""``corral chat``: talk to an agent from the terminal, or from a script.

Interactive: creates (or attaches to) a session, streams its events live (text as it arrives,
tool calls and results, approval prompts answered with y/n), turns Ctrl-C into an interrupt of
the running turn (a second Ctrl-C while idle leaves), and resumes the stream after a dropped
connection from the last sequence it printed (``corral.client``).

One-shot (``-m MESSAGE``): sends one message, prints that turn, exits 0 if it succeeded and 1
if not. Permission requests are answered by ``--approve``/``--deny`` patterns, else from
standard input, else denied at once (``approvals.py``): nothing waits on an unread prompt.
``--json`` prints every event as one JSON line instead of text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
import signal
import sys
from typing import TextIO

from google.protobuf import json_format

from corral.client import ApiError, Client
from corral.libs.config import Settings
from corral.services.cli.approvals import Approver
from corral.services.cli.connect import saved_credentials
from corral.services.cli.output import Output
from corral.session.v1 import agent_options_pb2, event_pb2, permission_pb2

POLICY_HINTS = {
    reason: (
        "the organisation's agent policy does not allow this: an admin can allow it with"
        f" UpdateAgentPolicy ({field})"
    )
    for reason, field in (
        ("MCP_COMMAND_NOT_ALLOWED", "allowed_mcp_commands"),
        ("MCP_HOST_NOT_ALLOWED", "allowed_mcp_hosts"),
        ("MODEL_NOT_ALLOWED", "allowed_models"),
        ("PERMISSION_MODE_NOT_ALLOWED", "allowed_permission_modes"),
        ("ENV_NOT_ALLOWED", "allowed_env"),
    )
}
SUCCEEDED = event_pb2.TurnResult.STATUS_SUCCEEDED


class Chat:
    def __init__(
        self, client: Client, session: str, out: Output, approver: Approver | None = None
    ) -> None:
        self.client = client
        self.session = session
        self.out = out
        self.approver = approver or Approver()
        self.running = False
        self.idle = asyncio.Event()
        self.idle.set()
        self.pending: list[permission_pb2.PermissionRequest] = []
        self.last_result: event_pb2.TurnResult | None = None

    def render(self, event: event_pb2.SessionEvent) -> None:
        if self.out.json:
            self.out.record(event)
            return
        style, write = self.out.style, self.out.write
        kind = event.WhichOneof("payload")
        if kind == "text_delta":
            write(event.text_delta.text)
        elif kind == "thinking_delta":
            write(style(event.thinking_delta.thinking, "dim"))
        elif kind == "text_block":
            write("\n")
        elif kind == "tool_use":
            args = json.dumps(json_format.MessageToDict(event.tool_use.input))[:300]
            write(f"{style('⚙ ' + event.tool_use.name, 'cyan')} {style(args, 'dim')}\n")
        elif kind == "tool_result":
            text = f"  ↳ {event.tool_result.content[:500].rstrip()}"
            write(style(text, "red" if event.tool_result.is_error else "dim") + "\n")
        elif kind == "permission_decision":
            decision = event.permission_decision
            verdict = "allowed" if decision.decision == decision.DECISION_ALLOW else "denied"
            write(style(f"  ({verdict})", "dim") + "\n")
        elif kind == "turn_result":
            result = event.turn_result
            status = event_pb2.TurnResult.Status.Name(result.status).removeprefix("STATUS_").lower()
            cost = result.usage.cost_usd_micros / 1e6
            tokens = result.usage.input_tokens + result.usage.output_tokens
            write(style(f"[{status} · {tokens} tokens · ${cost:.4f}]", "dim") + "\n")
            if result.HasField("error") and result.error.message:
                write(style(result.error.message, "red") + "\n")
        elif kind == "error":
            write(style(f"error: {event.error.message}", "red") + "\n")

    async def handle(self, event: event_pb2.SessionEvent, *, one_shot: bool) -> None:
        """Render an event and keep the chat's state (running, pending approvals)."""
        self.render(event)
        kind = event.WhichOneof("payload")
        if kind == "turn_started":
            self.running = True
            self.idle.clear()
        elif kind == "turn_result":
            self.last_result = event.turn_result
            self.running = False
            self.idle.set()
        elif kind == "permission_decision":
            answered = event.permission_decision.permission_request_id
            self.pending = [p for p in self.pending if p.id != answered]
        elif kind == "permission_request":
            await self.permission(event.permission_request, one_shot=one_shot)

    async def permission(
        self, request: permission_pb2.PermissionRequest, *, one_shot: bool
    ) -> None:
        decision = self.approver.by_pattern(request.tool_name)
        if decision is None and one_shot:
            decision = await self.approver.decide(request, self.out)
        if decision is None:  # interactive: the next y/n typed answers it
            self.pending.append(request)
            args = json.dumps(json_format.MessageToDict(request.input))[:300]
            prompt = f"? allow {request.tool_name} {args}  [y/n] "
            if self.out.json:
                self.out.note(prompt.rstrip(), "yellow")
            else:
                self.out.write(self.out.style(prompt, "yellow"))
            return
        if decision.source == "nobody":
            self.out.note(decision.message, "yellow")
        await self.respond(request.id, decision.allow, decision.message)

    async def respond(self, request_id: str, allow: bool, message: str) -> None:
        try:
            await self.client.respond(self.session, request_id, allow, message)
        except ApiError as exc:  # e.g. it timed out meanwhile: the stream says what happened
            self.out.note(f"could not answer {request_id}: {exc.message} ({exc.reason})", "red")

    async def follow(self, after: int = 0) -> None:
        """Stream until cancelled; corral.client reconnects after the last sequence seen."""
        try:
            async for event in self.client.events(self.session, after=after):
                await self.handle(event, one_shot=False)
        except ApiError as exc:
            self.out.note(f"{exc.message} ({exc.reason})", "red")

    async def answer(self, line: str) -> bool:
        """Treat the line as an answer to the oldest open approval request, if there is one."""
        if not self.pending or line.strip().lower() not in ("y", "yes", "n", "no"):
            return False
        request = self.pending.pop(0)
        allow = line.strip().lower().startswith("y")
        await self.respond(request.id, allow, "" if allow else "the user said no")
        return True

    async def send(self, text: str) -> None:
        self.idle.clear()
        try:
            await self.client.send_message(self.session, text)
        except ApiError as exc:
            self.idle.set()
            self.out.note(f"{exc.code.name}: {exc.message} ({exc.reason})", "red")

    async def one_shot(self, text: str) -> int:
        """Send one message and follow that turn to its result: 0 if it succeeded."""
        turn = await self.client.send_message(self.session, text)
        async for event in self.client.turn_events(self.session, turn):
            await self.handle(event, one_shot=True)
        return 0 if self.last_result is not None and self.last_result.status == SUCCEEDED else 1

    async def interrupt(self) -> None:
        with contextlib.suppress(ApiError):
            await self.client.interrupt(self.session)


async def open_session(
    client: Client, session: str | None, options: agent_options_pb2.AgentOptions | None, out: Output
) -> str | None:
    if session is not None:
        return session
    try:
        created = await client.create_session("corral chat", agent_options=options)
    except ApiError as exc:
        out.note(f"cannot create the session: {exc.message}")
        hint = POLICY_HINTS.get(exc.reason)
        if hint:
            out.note(hint)
        return None
    return created.name


async def run(
    client: Client,
    session: str | None,
    message: str | None,
    options: agent_options_pb2.AgentOptions | None,
    out: Output,
    approver: Approver,
) -> int:
    name = await open_session(client, session, options, out)
    if name is None:
        return 1
    chat = Chat(client, name, out, approver)
    loop = asyncio.get_running_loop()
    leave = asyncio.Event()
    pending: set[asyncio.Future[None]] = set()

    def on_interrupt() -> None:
        if chat.running or message is not None:
            out.note("interrupting…", "yellow")
            pending.add(asyncio.ensure_future(chat.interrupt()))
        else:
            leave.set()

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        if message is not None:
            out.note(name, "bold")
            return await chat.one_shot(message)
        out.note(f"{name}  (Ctrl-C interrupts a turn; Ctrl-D or idle Ctrl-C leaves)", "bold")
        follower = asyncio.create_task(chat.follow())
        try:
            await interactive(chat, leave)
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
        return 0
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        await asyncio.gather(*pending, return_exceptions=True)


async def interactive(chat: Chat, leave: asyncio.Event) -> None:
    while not leave.is_set():
        reader = asyncio.ensure_future(asyncio.to_thread(sys.stdin.readline))
        stopper = asyncio.ensure_future(leave.wait())
        done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if reader not in done:
            return
        line = reader.result()
        if not line:  # Ctrl-D
            return
        if line.strip() and not await chat.answer(line):
            await chat.send(line.rstrip("\n"))


def agent_options(
    allow: list[str], ask: list[str], mcp: list[str]
) -> agent_options_pb2.AgentOptions:
    """Options for a new session from the command line: ``--allow Bash``, ``--ask 'mcp__*'``,
    ``--mcp 'calc=python calc_server.py'`` (a stdio MCP server: name=command line)."""
    options = agent_options_pb2.AgentOptions(allowed_tools=allow)
    for pattern in ask:
        options.permission_rules.add(
            tool_pattern=pattern, action=agent_options_pb2.PermissionRule.ACTION_ASK
        )
    for spec in mcp:
        name, _, command = spec.partition("=")
        words = shlex.split(command)
        if not name or not words:
            raise SystemExit(f"--mcp wants NAME='COMMAND ARGS...', not {spec!r}")
        options.mcp_servers.add(
            name=name, stdio=agent_options_pb2.McpStdioTransport(command=words[0], args=words[1:])
        )
    return options


DEMO_SCRIPT = [
    {
        "text": "Hello! I am an agent running in Corral, answered by the offline model. ",
        "chunk": 6,
        "delay": 0.02,
    },
    {
        "tool": "Bash",
        "input": {"command": "echo 'written by the Corral demo' > hello.txt && ls -l"},
    },
    {
        "text": "I ran a shell command in my working directory: hello.txt is there now.",
        "chunk": 6,
        "delay": 0.02,
    },
]


async def demo(settings: Settings, out: TextIO = sys.stderr) -> str:
    """What `corral dev` shows at start-up: one turn of a real agent (SDK + CLI + a Bash tool)
    against the offline model, streamed here as a client sees it. Returns the session's name."""
    email, password = saved_credentials(settings)
    targets = {name: settings.target_for(name) for name in ("identity", "session")}
    async with Client(targets) as client:
        await client.login(email, password)
        options = agent_options_pb2.AgentOptions(allowed_tools=["Bash"])
        session = await client.create_session("Welcome to Corral", agent_options=options)
        chat = Chat(client, session.name, Output(out=out, err=out))
        prompt = f"<<corral-model {json.dumps(DEMO_SCRIPT)}>> (the start-up demo)"
        async with asyncio.timeout(60):
            await chat.one_shot(prompt)
        return session.name
