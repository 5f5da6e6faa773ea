"""The CLI's storage commands: ``workspaces ls``, ``files ls|get``, ``reports
ls|show|get|create``. Text for people, ``--json`` for scripts; ``get`` writes the bytes to
standard output or ``-o FILE``."""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import Any

from corral.client import Client
from corral.services.cli.output import Output
from corral.storage.v1 import file_pb2, report_pb2, workspace_pb2
from corral.storage.v1 import storage_service_pb2 as pb

FORMATS = {
    "markdown": report_pb2.REPORT_FORMAT_MARKDOWN,
    "json": report_pb2.REPORT_FORMAT_JSON,
    "html": report_pb2.REPORT_FORMAT_HTML,
}


def _write(data: bytes, out: Path | None) -> None:
    if out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        out.write_bytes(data)


async def workspaces_ls(client: Client, args: argparse.Namespace, out: Output) -> int:
    found: list[workspace_pb2.Workspace] = []
    token = ""
    while True:
        reply = await client.storage.ListWorkspaces(
            pb.ListWorkspacesRequest(page_token=token, filter=args.filter), timeout=client.timeout
        )
        found.extend(reply.workspaces)
        token = reply.next_page_token
        if not token:
            break
    if out.json:
        out.document({"workspaces": found})
    else:
        out.table([(w.name, w.session, w.owner) for w in found], ("name", "session", "owner"))
    return 0


async def files_ls(client: Client, args: argparse.Namespace, out: Output) -> int:
    found: list[file_pb2.File] = []
    token = ""
    while True:
        reply = await client.storage.ListFiles(
            pb.ListFilesRequest(parent=args.workspace, page_token=token, prefix=args.prefix),
            timeout=client.timeout,
        )
        found.extend(reply.files)
        token = reply.next_page_token
        if not token:
            break
    if out.json:
        out.document({"files": found})
    else:
        out.table([(f.path, str(f.size_bytes), f.name) for f in found], ("path", "bytes", "name"))
    return 0


async def files_get(client: Client, args: argparse.Namespace, out: Output) -> int:
    """A file's bytes, streamed (the name from ``files ls``)."""
    data = bytearray()
    async for chunk in client.storage.DownloadFile(pb.DownloadFileRequest(name=args.file)):
        data.extend(chunk.data)
    _write(bytes(data), args.output)
    return 0


async def reports_ls(client: Client, args: argparse.Namespace, out: Output) -> int:
    found: list[report_pb2.Report] = []
    token = ""
    while True:
        reply = await client.storage.ListReports(
            pb.ListReportsRequest(page_token=token, filter=args.filter), timeout=client.timeout
        )
        found.extend(reply.reports)
        token = reply.next_page_token
        if not token:
            break
    if out.json:
        out.document({"reports": found})
    else:
        rows = [(r.name, r.title, report_pb2.ReportFormat.Name(r.format)) for r in found]
        out.table(rows, ("name", "title", "format"))
    return 0


async def reports_show(client: Client, args: argparse.Namespace, out: Output) -> int:
    report = await _report(client, args.report)
    if out.json:
        out.document(report)
    else:
        out.line(out.style(report.title, "bold"))
        out.line(report.content.decode(errors="replace"))
    return 0


async def reports_get(client: Client, args: argparse.Namespace, out: Output) -> int:
    _write((await _report(client, args.report)).content, args.output)
    return 0


async def _report(client: Client, name: str) -> report_pb2.Report:
    reply = await client.storage.GetReport(
        pb.GetReportRequest(name=name, view=report_pb2.REPORT_VIEW_FULL), timeout=client.timeout
    )
    return reply.report


async def reports_create(client: Client, args: argparse.Namespace, out: Output) -> int:
    content = sys.stdin.buffer.read() if str(args.file) == "-" else args.file.read_bytes()
    report = report_pb2.Report(title=args.title, format=FORMATS[args.format], content=content)
    reply = await client.storage.CreateReport(
        pb.CreateReportRequest(report=report, request_id=str(uuid.uuid4())), timeout=client.timeout
    )
    if out.json:
        out.document(reply.report)
    else:
        out.line(reply.report.name)
    return 0


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    workspaces = commands.add_parser("workspaces", help="the sessions' working directories")
    verbs = workspaces.add_subparsers(dest="verb", required=True, metavar="VERB")
    ls = verbs.add_parser("ls", parents=[common], help="list the workspaces you can read")
    ls.add_argument("--filter", default="")
    ls.set_defaults(handler=workspaces_ls)

    files = commands.add_parser("files", help="a workspace's files")
    verbs = files.add_subparsers(dest="verb", required=True, metavar="VERB")
    ls = verbs.add_parser("ls", parents=[common], help="list a workspace's files")
    ls.add_argument("workspace", help="workspaces/<id> (a session's id)")
    ls.add_argument("--prefix", default="", help="only paths that start with this")
    ls.set_defaults(handler=files_ls)
    get = verbs.add_parser("get", parents=[common], help="download a file")
    get.add_argument("file", help="workspaces/<id>/files/<file> (from files ls)")
    get.add_argument("-o", "--output", type=Path, help="write here (default: stdout)")
    get.set_defaults(handler=files_get)

    reports = commands.add_parser("reports", help="reports filed by people and tasks")
    verbs = reports.add_subparsers(dest="verb", required=True, metavar="VERB")
    ls = verbs.add_parser("ls", parents=[common], help="list the reports you can read")
    ls.add_argument("--filter", default="")
    ls.set_defaults(handler=reports_ls)
    for verb, helptext, handler in (
        ("show", "print a report", reports_show),
        ("get", "write a report's content to stdout or -o FILE", reports_get),
    ):
        parser = verbs.add_parser(verb, parents=[common], help=helptext)
        parser.add_argument("report", help="reports/<id>")
        parser.set_defaults(handler=handler)
        if verb == "get":
            parser.add_argument("-o", "--output", type=Path, help="write here (default: stdout)")
    create = verbs.add_parser("create", parents=[common], help="file a report from a file or -")
    create.add_argument("file", type=Path, help="its content (- for stdin)")
    create.add_argument("--title", required=True)
    create.add_argument("--format", choices=sorted(FORMATS), default="markdown")
    create.set_defaults(handler=reports_create)
