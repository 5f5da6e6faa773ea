"""The CLI's commands on the API: ``sessions``, ``events``, ``approvals``, ``chat``. Each signs
in (``connect.py``), calls ``corral.client`` and prints text or, with ``--json``, JSON (one
document, or one line per event for streams)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Coroutine
from typing import Any

from google.protobuf import json_format

from corral.client import ApiError, Client
from corral.libs.config import Settings
from corral.services.cli import chat
from corral.services.cli.approvals import Approver
from corral.services.cli.connect import SignInError, signed_in
from corral.services.cli.output import Output
from corral.session.v1 import session_pb2

Handler = Callable[[Client, argparse.Namespace, Output], Coroutine[Any, Any, int]]


def _state(session: session_pb2.Session) -> str:
    return session_pb2.Session.State.Name(session.state).removeprefix("STATE_").lower()


async def sessions_ls(client: Client, args: argparse.Namespace, out: Output) -> int:
    found = [s async for s in client.list_sessions(filter=args.filter, order_by=args.order_by)]
    if out.json:
        out.document({"sessions": found})
        return 0
    rows = [
        (s.name, _state(s), s.display_name, s.create_time.ToJsonString()[:19], str(s.turn_count))
        for s in found
    ]
    out.table(rows, ("name", "state", "display name", "created", "turns"))
    return 0


async def sessions_show(client: Client, args: argparse.Namespace, out: Output) -> int:
    session = await client.get_session(args.session)
    if out.json:
        out.document(session)
        return 0
    fields = json_format.MessageToDict(session)
    width = max(len(k) for k in fields)
    for key, value in fields.items():
        out.line(f"{out.style(key.ljust(width), 'bold')}  {value}")
    return 0


async def sessions_archive(client: Client, args: argparse.Namespace, out: Output) -> int:
    session = await client.archive_session(args.session)
    if out.json:
        out.document(session)
    else:
        out.line(f"{session.name} {_state(session)}")
    return 0


async def sessions_rm(client: Client, args: argparse.Namespace, out: Output) -> int:
    await client.delete_session(args.session, force=args.force)
    if out.json:
        out.document({"name": args.session, "deleted": True})
    else:
        out.line(f"{args.session} deleted")
    return 0


async def events_tail(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Events after ``--after``; with ``--follow`` live ones too, else up to the newest now."""
    last = 0 if args.follow else (await client.get_session(args.session)).last_sequence
    if not args.follow and last <= args.after:
        return 0
    view = chat.Chat(client, args.session, out)
    async for event in client.events(args.session, after=args.after):
        if out.json:
            out.record(event)
        elif not event.HasField("text_delta"):
            kind = event.WhichOneof("payload") or "event"
            out.line(f"{out.style(str(event.sequence).rjust(6), 'dim')}  {kind}")
            if kind in ("tool_use", "tool_result", "turn_result", "error"):
                view.render(event)
        else:
            number = out.style(str(event.sequence).rjust(6), "dim")
            out.line(f"{number}  text_delta  {event.text_delta.text!r}")
        if not args.follow and event.sequence >= last:
            return 0
    return 0


async def approvals_ls(client: Client, args: argparse.Namespace, out: Output) -> int:
    session = await client.get_session(args.session)
    waiting = list(session.pending_permission_requests)
    if out.json:
        out.document({"permissionRequests": waiting})
        return 0
    rows = [
        (r.id, r.tool_name, json_format.MessageToJson(r.input, indent=None)[:80]) for r in waiting
    ]
    out.table(rows, ("id", "tool", "input"))
    return 0


async def approvals_answer(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Answer the session's waiting requests once (``--approve``/``--deny``, else stdin)."""
    session = await client.get_session(args.session)
    approver = Approver(args.approve, args.deny)
    answered = []
    for request in session.pending_permission_requests:
        if args.request and request.id not in args.request:
            continue
        decision = await approver.decide(request, out)
        await client.respond(args.session, request.id, decision.allow, decision.message)
        answered.append({"id": request.id, "tool": request.tool_name, "allow": decision.allow})
        if not out.json:
            verdict = "allowed" if decision.allow else "denied"
            out.line(f"{request.id} {request.tool_name}: {verdict}")
    if out.json:
        out.document({"answered": answered})
    return 0


async def chat_command(client: Client, args: argparse.Namespace, out: Output) -> int:
    options = chat.agent_options(args.allow, args.ask, args.mcp)
    approver = Approver(args.approve, args.deny)
    return await chat.run(client, args.session, args.message, options, out, approver)


async def run(handler: Handler, args: argparse.Namespace, settings: Settings, out: Output) -> int:
    """Sign in, run one command, turn refusals into a message and exit status 1 (2: no
    sign-in configured)."""
    try:
        async with signed_in(settings, args.target) as client:
            return await handler(client, args, out)
    except SignInError as exc:
        out.note(str(exc), "red")
        return 2
    except ApiError as exc:
        if out.json:
            out.document(
                {"error": {"code": exc.code.name, "reason": exc.reason, "message": exc.message}}
            )
        out.note(f"{exc.code.name}: {exc.message} ({exc.reason})", "red")
        return 1


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add the API commands to the ``corral`` parser (``common``: --json, --target, ...)."""
    sessions = commands.add_parser("sessions", help="list, show, archive and delete sessions")
    verbs = sessions.add_subparsers(dest="verb", required=True, metavar="VERB")
    ls = verbs.add_parser("ls", parents=[common], help="list the sessions you can read")
    ls.add_argument("--filter", default="", help='e.g. state = "STATE_IDLE"')
    ls.add_argument("--order-by", default="", help='e.g. "create_time desc"')
    ls.set_defaults(handler=sessions_ls)
    for verb, helptext, handler in (
        ("show", "show one session", sessions_show),
        ("archive", "archive a session (read-only from then on)", sessions_archive),
        ("rm", "delete a session, its history and its workspace", sessions_rm),
    ):
        parser = verbs.add_parser(verb, parents=[common], help=helptext)
        parser.add_argument("session", help="sessions/<id>")
        parser.set_defaults(handler=handler)
        if verb == "rm":
            parser.add_argument("--force", action="store_true", help="even with a turn running")

    events = commands.add_parser("events", help="a session's events")
    verbs = events.add_subparsers(dest="verb", required=True, metavar="VERB")
    tail = verbs.add_parser("tail", parents=[common], help="print events after a sequence")
    tail.add_argument("session", help="sessions/<id>")
    tail.add_argument("--after", type=int, default=0, help="the last sequence already seen")
    tail.add_argument("-f", "--follow", action="store_true", help="keep printing live events")
    tail.set_defaults(handler=events_tail)

    approvals = commands.add_parser("approvals", help="an agent's waiting permission requests")
    verbs = approvals.add_subparsers(dest="verb", required=True, metavar="VERB")
    waiting = verbs.add_parser("ls", parents=[common], help="list a session's waiting requests")
    waiting.add_argument("session", help="sessions/<id>")
    waiting.set_defaults(handler=approvals_ls)
    answer = verbs.add_parser(
        "answer",
        parents=[common, _approval_options()],
        help="answer them once: --approve/--deny patterns, else y/n lines on stdin",
    )
    answer.add_argument("session", help="sessions/<id>")
    answer.add_argument("request", nargs="*", help="only these request ids (default: all)")
    answer.set_defaults(handler=approvals_answer)

    talk = commands.add_parser(
        "chat",
        parents=[common, _approval_options()],
        help="talk to an agent (interactive, or one message with -m)",
    )
    talk.add_argument(
        "--session", help="attach to this session (sessions/...) instead of a new one"
    )
    talk.add_argument(
        "-m", "--message", help="send one message, print that turn, exit (0: succeeded)"
    )
    talk.add_argument(
        "--allow", action="append", default=[], help="a tool the agent may use unasked"
    )
    talk.add_argument(
        "--ask", action="append", default=[], help="a tool pattern to approve each time"
    )
    talk.add_argument(
        "--mcp", action="append", default=[], help="a stdio MCP server: NAME='COMMAND'"
    )
    talk.set_defaults(handler=chat_command)


def _approval_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--approve",
        action="append",
        default=[],
        metavar="PATTERN",
        help="allow tools whose name matches this glob (e.g. Bash, 'mcp__calc__*')",
    )
    options.add_argument(
        "--deny",
        action="append",
        default=[],
        metavar="PATTERN",
        help="deny tools whose name matches this glob (wins over --approve)",
    )
    return options
