"""Reports, archives and storage usage through the gRPC API."""

from __future__ import annotations

import asyncio
import hashlib
import io
import tarfile
import uuid
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2

from corral.libs.errors import FailedPrecondition
from corral.services.storage.blobs import BlobStore
from corral.services.storage.domain import Archive, now
from corral.services.storage.ports import BuiltArchive
from corral.services.storage.tables import reports
from corral.services.storage.workspace_fs import WorkspaceFiles
from corral.storage.v1 import archive_pb2, report_pb2
from corral.storage.v1 import storage_service_pb2 as pb
from tests.storage.stack import (
    ACME,
    ALICE,
    BAD_TIMESTAMPS,
    BOB,
    PLATFORM,
    Stack,
    running_stack,
    sha,
    violated_fields,
)
from tests.support.grpc_tools import error_reason
from tests.support.keys import SigningKey


async def file_report(stack: Stack, content: bytes = b"# Done", **kw: object) -> report_pb2.Report:
    fields: dict[str, object] = {"title": "Run 1", "format": report_pb2.REPORT_FORMAT_MARKDOWN}
    fields.update(kw)
    reply = await stack.stub.CreateReport(
        pb.CreateReportRequest(
            report=report_pb2.Report(content=content, **fields),  # type: ignore[arg-type]
            request_id=str(uuid.uuid4()),
        ),
        metadata=stack.auth(),
    )
    return reply.report


async def body(call: object) -> tuple[str, bytes]:
    replies = [r async for r in call]  # type: ignore[attr-defined]
    return replies[0].content_type, b"".join(r.data for r in replies)


async def test_a_report_keeps_its_bytes_type_and_origin(stack: Stack) -> None:
    report = await file_report(stack, b"# Findings\n", labels={"kind": "audit"})
    assert (report.owner, report.creator, report.organization) == (ALICE, ALICE, ACME)
    assert report.content_type == "text/markdown; charset=utf-8"
    assert (report.size_bytes, report.sha256) == (11, sha(b"# Findings\n"))
    assert report.content == b""  # the create answer leaves content out
    full = await stack.stub.GetReport(pb.GetReportRequest(name=report.name), metadata=stack.auth())
    assert full.report.content == b"# Findings\n"
    basic = await stack.stub.GetReport(
        pb.GetReportRequest(name=report.name, view=report_pb2.REPORT_VIEW_BASIC),
        metadata=stack.auth(),
    )
    assert basic.report.content == b""
    content_type, data = await body(
        stack.stub.DownloadReport(pb.DownloadReportRequest(name=report.name), metadata=stack.auth())
    )
    assert (content_type, data) == ("text/markdown; charset=utf-8", b"# Findings\n")
    assert stack.ledger.in_use(ALICE) == 11


async def test_a_service_files_for_a_task_run(stack: Stack) -> None:
    reply = await stack.stub.CreateReport(
        pb.CreateReportRequest(
            report=report_pb2.Report(
                title="nightly",
                format=report_pb2.REPORT_FORMAT_JSON,
                content=b'{"passed": 12}',
                owner=BOB,
                session="sessions/s9",
                task_run="tasks/t1/runs/2",
            )
        ),
        metadata=stack.as_service(),
    )
    report = reply.report
    assert (report.owner, report.organization, report.task_run) == (BOB, ACME, "tasks/t1/runs/2")
    assert report.creator == f"{PLATFORM}/serviceAccounts/session"
    runs = await stack.stub.ListReports(
        pb.ListReportsRequest(filter='task_run = "tasks/t1/runs/*"'),
        metadata=stack.auth("root", roles=("admin",)),
    )
    assert [r.name for r in runs.reports] == [report.name]
    mine = await stack.stub.ListReports(pb.ListReportsRequest(), metadata=stack.auth("alice"))
    assert list(mine.reports) == []  # bob's report: alice is a user, not its owner


async def test_report_content_rules(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as bad_json:
        await file_report(stack, b"{not json", format=report_pb2.REPORT_FORMAT_JSON)
    assert error_reason(bad_json.value) == "CONTENT_INVALID"
    with pytest.raises(grpc.aio.AioRpcError) as no_type:
        await file_report(stack, b"\x00\x01", format=report_pb2.REPORT_FORMAT_UNSPECIFIED)
    assert no_type.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    other = await file_report(
        stack, b"\x89PNG", format=report_pb2.REPORT_FORMAT_UNSPECIFIED, content_type="image/png"
    )
    assert other.content_type == "image/png"
    with pytest.raises(grpc.aio.AioRpcError) as huge:
        await file_report(stack, b"x" * (4 * 1024 * 1024 + 1))
    assert error_reason(huge.value) == "CONTENT_INVALID"
    with pytest.raises(grpc.aio.AioRpcError) as not_mine:
        await file_report(stack, owner=BOB)
    assert not_mine.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as origin:
        await file_report(stack, session="sessions/s1")
    assert origin.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_reports_are_listed_with_filters_and_pages(stack: Stack) -> None:
    made = [await file_report(stack, title=f"t{n}", labels={"n": str(n % 2)}) for n in range(5)]
    html = await file_report(stack, b"<p>x</p>", title="page", format=report_pb2.REPORT_FORMAT_HTML)
    odd = await stack.stub.ListReports(
        pb.ListReportsRequest(filter='labels.n = "1"', order_by="title"), metadata=stack.auth()
    )
    assert [r.title for r in odd.reports] == ["t1", "t3"]
    htmls = await stack.stub.ListReports(
        pb.ListReportsRequest(filter="format = HTML"), metadata=stack.auth()
    )
    assert [r.name for r in htmls.reports] == [html.name]
    seen, token = [], ""
    while True:
        page = await stack.stub.ListReports(
            pb.ListReportsRequest(page_size=2, page_token=token), metadata=stack.auth()
        )
        seen += [r.name for r in page.reports]
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted([r.name for r in made] + [html.name])
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stack.stub.ListReports(
            pb.ListReportsRequest(filter="size = 3"), metadata=stack.auth()
        )
    assert error_reason(bad.value) == "INVALID_FILTER"


async def test_delete_and_expiry_give_the_bytes_back(stack: Stack) -> None:
    kept = await file_report(stack, b"kept")
    doomed = await file_report(stack, b"doomed")
    await stack.stub.DeleteReport(pb.DeleteReportRequest(name=doomed.name), metadata=stack.auth())
    expiring = report_pb2.Report(
        title="old", format=report_pb2.REPORT_FORMAT_MARKDOWN, content=b"o"
    )
    expiring.expire_time.FromDatetime(now() + timedelta(minutes=1))
    await stack.stub.CreateReport(pb.CreateReportRequest(report=expiring), metadata=stack.auth())
    async with stack.engine.begin() as connection:  # a minute on
        await connection.execute(
            reports.update()
            .where(reports.c.expire_time.is_not(None))
            .values(expire_time=now() - timedelta(seconds=1))
        )
    done = await stack.service.sweeper.sweep()
    assert done is not None and done.reports_deleted == 1
    await stack.settle()
    listed = await stack.stub.ListReports(pb.ListReportsRequest(), metadata=stack.auth())
    assert [r.name for r in listed.reports] == [kept.name]
    assert stack.ledger.in_use(ALICE) == 4
    assert [b.key async for b in stack.blobs.list("reports/")] == [
        f"reports/acme/{kept.name.removeprefix('reports/')}"
    ]


@pytest.mark.parametrize("stamp", BAD_TIMESTAMPS, ids=str)
async def test_an_impossible_expire_time_is_invalid_argument(
    stack: Stack, stamp: timestamp_pb2.Timestamp
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await file_report(stack, b"x", expire_time=stamp)
    assert violated_fields(refused.value) == ["report.expire_time"]


async def test_an_expire_time_in_the_past_is_refused(stack: Stack) -> None:
    for past in (timestamp_pb2.Timestamp(seconds=1), timestamp_pb2.Timestamp()):
        past_report = report_pb2.Report(
            title="old", format=report_pb2.REPORT_FORMAT_MARKDOWN, content=b"o", expire_time=past
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stack.stub.CreateReport(
                pb.CreateReportRequest(report=past_report), metadata=stack.auth()
            )
        assert violated_fields(refused.value) == ["report.expire_time"]
    later = timestamp_pb2.Timestamp()
    later.FromDatetime(now() + timedelta(days=1))
    kept = await file_report(stack, b"kept", expire_time=later)
    assert kept.expire_time == later
    listed = await stack.stub.ListReports(pb.ListReportsRequest(), metadata=stack.auth())
    assert [r.name for r in listed.reports] == [kept.name] and stack.ledger.in_use(ALICE) == 4


async def test_json_nested_past_the_decoders_depth_is_content_invalid(stack: Stack) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    for content in (deep, b'{"a":' * 50_000 + b"1" + b"}" * 50_000):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await file_report(stack, content, format=report_pb2.REPORT_FORMAT_JSON)
        assert violated_fields(refused.value) == ["report.content"]
        assert error_reason(refused.value) == "CONTENT_INVALID"
    assert stack.ledger.in_use(ALICE) == 0
    shallow = await file_report(
        stack, b"[" * 100 + b"]" * 100, format=report_pb2.REPORT_FORMAT_JSON
    )
    assert shallow.size_bytes == 200


async def test_a_report_past_the_quota_is_refused(stack: Stack) -> None:
    stack.ledger.limits[ACME] = 3
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await file_report(stack, b"four")
    assert error_reason(refused.value) == "STORAGE_QUOTA_EXCEEDED"
    await stack.settle()
    assert stack.ledger.live() == [] and [b async for b in stack.blobs.list()] == []


# -- archives: the packer is helper F's; here a minimal one at the port --------------------------


class TarPacker:
    """Packs with tarfile into memory: enough to exercise the resource, not the real packer."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.started = asyncio.Event()

    async def pack(self, archive: Archive, files: WorkspaceFiles, blobs: BlobStore) -> BuiltArchive:
        if self.fail:
            raise FailedPrecondition("too big", reason="ARCHIVE_TOO_LARGE")
        top = files.directory(archive.workspace_id)
        buffer = io.BytesIO()

        def pack() -> int:
            count = 0
            with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
                for path in sorted(Path(top).rglob("*")):
                    if path.is_file() and not path.is_symlink():
                        tar.add(path, arcname=str(path.relative_to(top)))
                        count += 1
            return count

        count = await asyncio.to_thread(pack)

        async def chunks():  # type: ignore[no-untyped-def]
            yield buffer.getvalue()

        stored = await blobs.put(archive.blob_key, chunks())
        return BuiltArchive(stored.size, stored.sha256 or "", count)


async def until_built(stack: Stack, name: str) -> archive_pb2.Archive:
    for _ in range(200):
        await stack.settle()
        got = await stack.stub.GetArchive(pb.GetArchiveRequest(name=name), metadata=stack.auth())
        if got.archive.state != archive_pb2.Archive.STATE_BUILDING:
            return got.archive
    raise AssertionError("the archive never finished")


async def test_archives_are_resources_with_state_size_and_sha(
    tmp_path: Path, signing_key: SigningKey
) -> None:
    async with running_stack("sqlite", tmp_path, signing_key, packer=TarPacker()) as stack:
        ws = await stack.workspace()
        (stack.workspace_dir(ws.name) / "a.txt").write_bytes(b"alpha")
        made = await stack.stub.CreateArchive(
            pb.CreateArchiveRequest(parent=ws.name, archive=archive_pb2.Archive()),
            metadata=stack.auth(),
        )
        assert made.archive.state == archive_pb2.Archive.STATE_BUILDING
        ready = await until_built(stack, made.archive.name)
        assert ready.state == archive_pb2.Archive.STATE_READY and ready.file_count == 1
        content_type, data = await body(
            stack.stub.DownloadArchive(
                pb.DownloadArchiveRequest(name=ready.name), metadata=stack.auth()
            )
        )
        assert content_type == "application/gzip"
        assert hashlib.sha256(data).hexdigest() == ready.sha256 and len(data) == ready.size_bytes
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            assert tar.extractfile("a.txt").read() == b"alpha"  # type: ignore[union-attr]
        listed = await stack.stub.ListArchives(
            pb.ListArchivesRequest(parent=ws.name), metadata=stack.auth()
        )
        assert [a.name for a in listed.archives] == [ready.name]
        usage = await stack.stub.GetStorageUsage(
            pb.GetStorageUsageRequest(name=f"{ACME}/storageUsage"), metadata=stack.auth()
        )
        assert usage.storage_usage.total.archive_bytes == ready.size_bytes
        await stack.stub.DeleteArchive(
            pb.DeleteArchiveRequest(name=ready.name), metadata=stack.auth()
        )
        await stack.settle()
        assert stack.ledger.in_use(ALICE) == 0  # the agent's file is not measured yet
        assert [b async for b in stack.blobs.list("archives/")] == []
        await stack.service.sweeper.sweep()
        assert stack.ledger.in_use(ALICE) == 5  # measured and recorded


async def test_a_failed_build_keeps_nothing(tmp_path: Path, signing_key: SigningKey) -> None:
    async with running_stack("sqlite", tmp_path, signing_key, packer=TarPacker(fail=True)) as stack:
        ws = await stack.workspace()
        made = await stack.stub.CreateArchive(
            pb.CreateArchiveRequest(parent=ws.name, archive=archive_pb2.Archive()),
            metadata=stack.auth(),
        )
        failed = await until_built(stack, made.archive.name)
        assert (failed.state, failed.failure_reason) == (
            archive_pb2.Archive.STATE_FAILED,
            "ARCHIVE_TOO_LARGE",
        )
        with pytest.raises(grpc.aio.AioRpcError) as not_ready:
            await body(
                stack.stub.DownloadArchive(
                    pb.DownloadArchiveRequest(name=failed.name), metadata=stack.auth()
                )
            )
        assert error_reason(not_ready.value) == "ARCHIVE_NOT_READY"


async def test_without_a_packer_archives_are_unimplemented(stack: Stack) -> None:
    ws = await stack.workspace()
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stack.stub.CreateArchive(
            pb.CreateArchiveRequest(parent=ws.name, archive=archive_pb2.Archive()),
            metadata=stack.auth(),
        )
    assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("stamp", [*BAD_TIMESTAMPS, timestamp_pb2.Timestamp(seconds=1)], ids=str)
async def test_an_archive_expire_time_out_of_range_is_invalid_argument(
    stack: Stack, stamp: timestamp_pb2.Timestamp
) -> None:
    ws = await stack.workspace()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stack.stub.CreateArchive(
            pb.CreateArchiveRequest(parent=ws.name, archive=archive_pb2.Archive(expire_time=stamp)),
            metadata=stack.auth(),
        )
    assert violated_fields(refused.value) == ["archive.expire_time"]


# -- usage -----------------------------------------------------------------------------------------


async def test_storage_usage_per_owner(stack: Stack) -> None:
    mine = await stack.workspace(owner=ALICE)
    (stack.workspace_dir(mine.name) / "f").write_bytes(b"x" * 100)
    await stack.workspace(owner=BOB)
    await file_report(stack, b"12345")
    await stack.service.sweeper.sweep()  # measures what the agent wrote
    upload = await stack.stub.CreateUpload(
        pb.CreateUploadRequest(parent=mine.name, upload={"path": "up"}),  # type: ignore[arg-type]
        metadata=stack.auth(),
    )
    await stack.stub.AppendUploadChunk(
        pb.AppendUploadChunkRequest(name=upload.upload.name, offset=0, data=b"abc"),
        metadata=stack.auth(),
    )
    name = f"{ACME}/storageUsage"
    admin = await stack.stub.GetStorageUsage(
        pb.GetStorageUsageRequest(name=name), metadata=stack.auth("root", roles=("admin",))
    )
    usage = admin.storage_usage
    assert usage.name == name
    assert (usage.total.total_bytes, usage.total.workspace_count) == (108, 2)
    lines = {line.owner: line.usage for line in usage.owners}
    assert set(lines) == {ALICE, BOB}
    assert (lines[ALICE].workspace_bytes, lines[ALICE].report_bytes) == (100, 5)
    assert lines[ALICE].pending_upload_bytes == 3
    user = await stack.stub.GetStorageUsage(
        pb.GetStorageUsageRequest(name=name), metadata=stack.auth()
    )
    assert [line.owner for line in user.storage_usage.owners] == [ALICE]
    assert user.storage_usage.total.total_bytes == 108
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await stack.stub.GetStorageUsage(
            pb.GetStorageUsageRequest(name="organizations/globex/storageUsage"),
            metadata=stack.auth(),
        )
    assert other.value.code() == grpc.StatusCode.NOT_FOUND
