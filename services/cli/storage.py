"""The CLI's storage commands: ``workspaces ls``, ``files ls|put|get|rm``, ``reports
ls|show|get|create``. Text for people, ``--json`` for scripts; ``get`` writes the bytes to
standard output or ``-o FILE``.

A file is named as ``files ls`` prints it (``workspaces/W/files/F``) or as ``workspaces/W:PATH``.
``files put`` and ``files get`` go through ``corral.client``'s transfers (chunked, resumed after
a dropped connection, checked by SHA-256, never the whole file in memory), with a progress bar on
a terminal (progress.py). A local file that cannot be read or written exits 1, as a refusal does.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import functools
import os
import sys
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

import grpc

from corral.client import Client, FileChangedError, NotFound, download_file, upload_file
from corral.services.cli import progress
from corral.services.cli.api import Handler
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


def _local(handler: Handler) -> Handler:
    """A local file that cannot be read or written: a message (and an error document with
    --json) and exit status 1; a reader of standard output that went away: quietly 1."""

    @functools.wraps(handler)
    async def run(client: Client, args: argparse.Namespace, out: Output) -> int:
        try:
            return await handler(client, args, out)
        except BrokenPipeError:
            # Nothing more can reach the reader; keep the interpreter's last flush quiet too.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return 1
        except OSError as exc:
            changed = isinstance(exc, FileChangedError)
            reason = "FILE_CHANGED" if changed else errno.errorcode.get(exc.errno or 0, "OS_ERROR")
            if out.json:
                out.document({"error": {"code": "LOCAL", "reason": reason, "message": str(exc)}})
            out.note(f"corral: {exc}", "red")
            return 1

    return run


def _destination(spec: str, local: Path) -> tuple[str, str]:
    """``workspaces/W[:PATH]`` -> (workspace, path); no PATH, or one ending in ``/``: the local
    file's name there."""
    workspace, _, path = spec.partition(":")
    if not path or path.endswith("/"):
        path += local.name
    return workspace, path


async def _file_name(client: Client, spec: str) -> str:
    """The file's resource name: as given, or looked up for ``workspaces/W:PATH``."""
    workspace, colon, path = spec.partition(":")
    if not colon:
        return spec
    # Paths list in byte order, so the first with PATH as a prefix is PATH itself if it exists.
    reply = await client.storage.ListFiles(
        pb.ListFilesRequest(parent=workspace, prefix=path, page_size=1), timeout=client.timeout
    )
    if reply.files and reply.files[0].path == path:
        return reply.files[0].name
    raise NotFound(grpc.StatusCode.NOT_FOUND, f"no file {path} in {workspace}", "FILE_NOT_FOUND")


@_local
async def files_put(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Upload a local file (resumable, checked by SHA-256); prints its name as ``ls`` does."""
    workspace, path = _destination(args.destination, args.local)
    bar = progress.for_transfer(out, path, quiet=args.quiet)
    try:
        file = await upload_file(
            client,
            workspace,
            path,
            args.local,
            overwrite=args.overwrite,
            content_type=args.content_type,
            progress=bar,
        )
    finally:
        if bar is not None:
            bar.close()
    if out.json:
        out.document(file)
    else:
        out.line(file.name)
    return 0


@_local
async def files_get(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Stream a file to ``-o`` (a file, or a directory to put it in) or standard output."""
    target: Path | None = args.output
    if target is None and out.json:
        out.note("corral: files get --json needs -o FILE (stdout is for the bytes)", "red")
        return 2
    name = await _file_name(client, args.file)
    if target is not None and await asyncio.to_thread(target.is_dir):
        file = await client.storage.GetFile(pb.GetFileRequest(name=name), timeout=client.timeout)
        target = target / PurePosixPath(file.file.path).name
    bar = progress.for_transfer(out, str(target or args.file), quiet=args.quiet)
    try:
        if target is None:
            found = await download_file(client, name, sys.stdout.buffer, progress=bar)
            sys.stdout.buffer.flush()
        else:
            found = await download_file(client, name, target, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if out.json:
        out.document(found)
    return 0


async def files_rm(client: Client, args: argparse.Namespace, out: Output) -> int:
    name = await _file_name(client, args.file)
    await client.storage.DeleteFile(pb.DeleteFileRequest(name=name), timeout=client.timeout)
    if out.json:
        out.document({"name": name, "deleted": True})
    else:
        out.line(f"{name} deleted")
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
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar (shown on a terminal only)"
    )
    file_help = "workspaces/<id>/files/<file> (as files ls names it) or workspaces/<id>:<path>"
    put = verbs.add_parser("put", parents=[common, quiet], help="upload a file")
    put.add_argument("local", type=Path, metavar="LOCAL", help="the file to upload")
    put.add_argument(
        "destination",
        metavar="WORKSPACE[:PATH]",
        help="workspaces/<id>, optionally :path in it (default: the file's name; a path"
        " ending in / is a directory to put it in)",
    )
    put.add_argument("--overwrite", action="store_true", help="replace a file already there")
    put.add_argument("--content-type", default="", help="default: guessed from the path")
    put.set_defaults(handler=files_put)
    get = verbs.add_parser("get", parents=[common, quiet], help="download a file")
    get.add_argument("file", help=file_help)
    get.add_argument(
        "-o", "--output", type=Path, help="write here, or into this directory (default: stdout)"
    )
    get.set_defaults(handler=files_get)
    rm = verbs.add_parser("rm", parents=[common], help="delete a file")
    rm.add_argument("file", help=file_help)
    rm.set_defaults(handler=files_rm)

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
