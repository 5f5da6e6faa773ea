"""``corral chat``: talk to an agent from the terminal.

Creates (or attaches to) a session, streams its events live (text as it arrives, tool calls and
results, approval prompts you answer with y/n), and turns Ctrl-C into an interrupt of the
running turn (a second Ctrl-C while idle leaves). Resumes the stream after a dropped connection
from the last sequence it printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import sys
import uuid
from typing import Any, TextIO

import grpc
from google.protobuf import json_format

from corral.identity.v1 import identity_service_pb2 as identity_pb
from corral.identity.v1 import identity_service_pb2_grpc as identity_rpc
from corral.libs.config import Settings
from corral.libs.grpc.errors import from_rpc_error
from corral.session.v1 import agent_options_pb2, event_pb2, permission_pb2, session_pb2
from corral.session.v1 import session_service_pb2 as pb
from corral.session.v1 import session_service_pb2_grpc as rpc

DIM, BOLD, CYAN, YELLOW, RED, RESET = (
    "\033[2m",
    "\033[1m",
    "\033[36m",
    "\033[33m",
    "\033[31m",
    "\033[0m",
)


async def login(settings: Settings, email: str, password: str) -> str:
    async with grpc.aio.insecure_channel(settings.target_for("identity")) as channel:
        reply = await identity_rpc.IdentityServiceStub(channel).Login(
            identity_pb.LoginRequest(email=email, password=password), timeout=10
        )
    return str(reply.token.access_token)


class Chat:
    def __init__(self, stub: Any, token: str, session: str, out: TextIO = sys.stdout) -> None:
        self.stub = stub  # the generated aio stub (its .pyi types it as the sync one)
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.session = session
        self.out = out
        self.cursor = 0
        self.running = False
        self.idle = asyncio.Event()
        self.idle.set()
        self.pending: list[permission_pb2.PermissionRequest] = []

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def render(self, event: event_pb2.SessionEvent) -> None:
        kind = event.WhichOneof("payload")
        if kind == "text_delta":
            self.write(event.text_delta.text)
        elif kind == "thinking_delta":
            self.write(f"{DIM}{event.thinking_delta.thinking}{RESET}")
        elif kind == "text_block":
            self.write("\n")
        elif kind == "tool_use":
            args = json.dumps(json_format.MessageToDict(event.tool_use.input))[:300]
            self.write(f"{CYAN}⚙ {event.tool_use.name}{RESET} {DIM}{args}{RESET}\n")
        elif kind == "tool_result":
            colour = RED if event.tool_result.is_error else DIM
            self.write(f"{colour}  ↳ {event.tool_result.content[:500].rstrip()}{RESET}\n")
        elif kind == "permission_request":
            request = event.permission_request
            self.pending.append(request)
            args = json.dumps(json_format.MessageToDict(request.input))[:300]
            self.write(f"{YELLOW}? allow {request.tool_name} {args}  [y/n]{RESET} ")
        elif kind == "permission_decision":
            decision = event.permission_decision
            verdict = "allowed" if decision.decision == decision.DECISION_ALLOW else "denied"
            self.pending = [p for p in self.pending if p.id != decision.permission_request_id]
            self.write(f"{DIM}  ({verdict}){RESET}\n")
        elif kind == "turn_started":
            self.running = True
            self.idle.clear()
        elif kind == "turn_result":
            result = event.turn_result
            status = event_pb2.TurnResult.Status.Name(result.status).removeprefix("STATUS_").lower()
            cost = result.usage.cost_usd_micros / 1e6
            tokens = result.usage.input_tokens + result.usage.output_tokens
            self.write(f"{DIM}[{status} · {tokens} tokens · ${cost:.4f}]{RESET}\n")
            if result.HasField("error") and result.error.message:
                self.write(f"{RED}{result.error.message}{RESET}\n")
            self.running = False
            self.idle.set()
        elif kind == "error":
            self.write(f"{RED}error: {event.error.message}{RESET}\n")

    async def follow(self) -> None:
        """Stream forever, reconnecting after the last sequence seen."""
        while True:
            try:
                call = self.stub.StreamSessionEvents(
                    pb.StreamSessionEventsRequest(session=self.session, after_sequence=self.cursor),
                    metadata=self.metadata,
                )
                async for response in call:
                    if not response.event.HasField("heartbeat"):
                        self.cursor = response.event.sequence
                        self.render(response.event)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (
                    grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                ):
                    self.write(f"{RED}{exc.details()}{RESET}\n")
                    return
                await asyncio.sleep(1.0)  # dropped: reconnect from the cursor

    async def answer(self, line: str) -> bool:
        """Treat the line as an answer to the oldest open approval request, if there is one."""
        if not self.pending or line.strip().lower() not in ("y", "yes", "n", "no"):
            return False
        request = self.pending.pop(0)
        allow = line.strip().lower().startswith("y")
        await self.stub.RespondToPermission(
            pb.RespondToPermissionRequest(
                session=self.session,
                permission_request_id=request.id,
                decision=permission_pb2.PermissionDecision.DECISION_ALLOW
                if allow
                else permission_pb2.PermissionDecision.DECISION_DENY,
                message="" if allow else "the user said no",
            ),
            metadata=self.metadata,
        )
        return True

    async def send(self, text: str) -> None:
        self.idle.clear()
        try:
            await self.stub.SendMessage(
                pb.SendMessageRequest(
                    session=self.session,
                    text=text,
                    request_id=str(uuid.uuid4()),
                    busy_strategy=pb.SendMessageRequest.BUSY_STRATEGY_ENQUEUE,
                ),
                metadata=self.metadata,
            )
        except grpc.aio.AioRpcError as exc:
            self.idle.set()
            self.write(f"{RED}{exc.code().name}: {exc.details()}{RESET}\n")

    async def interrupt(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self.stub.InterruptTurn(
                pb.InterruptTurnRequest(session=self.session), metadata=self.metadata
            )


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


async def run(
    settings: Settings,
    token: str,
    session: str | None,
    message: str | None,
    options: agent_options_pb2.AgentOptions | None = None,
) -> int:
    async with grpc.aio.insecure_channel(settings.target_for("session")) as channel:
        stub = rpc.SessionServiceStub(channel)
        metadata = (("authorization", f"Bearer {token}"),)
        if session is None:
            try:
                created = await stub.CreateSession(
                    pb.CreateSessionRequest(
                        session=session_pb2.Session(
                            display_name="corral chat", agent_options=options
                        ),
                        request_id=str(uuid.uuid4()),
                    ),
                    metadata=metadata,
                )
            except grpc.aio.AioRpcError as exc:
                print(f"cannot create the session: {exc.details()}", file=sys.stderr)
                hint = POLICY_HINTS.get(from_rpc_error(exc).reason)
                if hint:
                    print(hint, file=sys.stderr)
                return 1
            session = created.session.name
        chat = Chat(stub, token, session)
        chat.write(
            f"{BOLD}{session}{RESET}  (Ctrl-C interrupts a turn; Ctrl-D or idle Ctrl-C leaves)\n"
        )
        follower = asyncio.create_task(chat.follow())
        loop = asyncio.get_running_loop()
        leave = asyncio.Event()
        pending: set[asyncio.Future[None]] = set()

        def on_interrupt() -> None:
            if chat.running:
                chat.write(f"\n{YELLOW}interrupting…{RESET}\n")
                pending.add(asyncio.ensure_future(chat.interrupt()))
            else:
                leave.set()

        loop.add_signal_handler(signal.SIGINT, on_interrupt)
        try:
            if message is not None:  # one-shot: send, wait for the turn to end, leave
                await chat.send(message)
                await asyncio.sleep(0.2)
                await chat.idle.wait()
                return 0
            while not leave.is_set():
                reader = asyncio.ensure_future(asyncio.to_thread(sys.stdin.readline))
                stopper = asyncio.ensure_future(leave.wait())
                done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if reader not in done:
                    break
                line = reader.result()
                if not line:  # Ctrl-D
                    break
                if line.strip() and not await chat.answer(line):
                    await chat.send(line.rstrip("\n"))
            return 0
        finally:
            loop.remove_signal_handler(signal.SIGINT)
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)


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


async def main(
    session: str | None,
    message: str | None,
    options: agent_options_pb2.AgentOptions | None = None,
) -> int:
    settings = Settings()
    token = os.environ.get("CORRAL_TOKEN", "")
    if not token:
        email, password = saved_credentials(settings)
        if not email or not password:
            print("set CORRAL_TOKEN, or CORRAL_EMAIL and CORRAL_PASSWORD", file=sys.stderr)
            return 2
        token = await login(settings, email, password)
    return await run(settings, token, session, message, options)


def saved_credentials(settings: Settings) -> tuple[str, str]:
    """The bootstrap admin's sign-in: from the environment, else what `corral dev` saved."""
    email = os.environ.get("CORRAL_EMAIL") or os.environ.get("CORRAL_BOOTSTRAP_ADMIN_EMAIL", "")
    password = os.environ.get("CORRAL_PASSWORD") or os.environ.get(
        "CORRAL_BOOTSTRAP_ADMIN_PASSWORD", ""
    )
    saved = settings.data_dir / "admin-credentials"
    if (not email or not password) and saved.exists():
        email, password = saved.read_text().split("\n")[:2]
    return email, password


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
    token = await login(settings, email, password)
    async with grpc.aio.insecure_channel(settings.target_for("session")) as channel:
        stub = rpc.SessionServiceStub(channel)
        metadata = (("authorization", f"Bearer {token}"),)
        options = agent_options_pb2.AgentOptions(allowed_tools=["Bash"])
        created = await stub.CreateSession(
            pb.CreateSessionRequest(
                session=session_pb2.Session(display_name="Welcome to Corral", agent_options=options)
            ),
            metadata=metadata,
        )
        chat = Chat(stub, token, created.session.name, out)
        follower = asyncio.create_task(chat.follow())
        try:
            await chat.send(f"<<corral-model {json.dumps(DEMO_SCRIPT)}>> (the start-up demo)")
            await asyncio.sleep(0.1)
            await asyncio.wait_for(chat.idle.wait(), 60)
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
        return str(created.session.name)
