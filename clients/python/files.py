"""File transfers with the storage service: ``upload_file`` and ``download_file``.

    from corral.client import Client, download_file, upload_file

    async with Client("127.0.0.1:8080") as corral:
        await corral.login(email, password)
        file = await upload_file(corral, "workspaces/w", "data/big.bin", "big.bin")
        await download_file(corral, file.name, "copy.bin")

- ``upload_file``: a file of at most ``single_call_limit`` bytes (1 MiB) in one ``WriteFile``
  call; a bigger one as a resumable chunked upload: ``CreateUpload`` with its size (the quota is
  held up front), ``AppendUploadChunk`` per chunk of at most 2 MiB at the offset the server has,
  ``CommitUpload`` with the SHA-256 of the bytes sent. A chunk that fails on the way (a dropped
  connection, ``UNAVAILABLE``, ``UPLOAD_BUSY``, ``RATE_LIMITED``) is resent from where the
  server says it is (``GetUpload``), with backoff; anything else, or a local file that changes
  meanwhile, aborts the upload (its quota hold is given back) and raises.
- ``download_file``: the ``DownloadFile`` stream into a file (written beside it and renamed
  into place once complete and checked) or any binary stream such as standard output. A stream
  broken mid-file is reopened at the bytes received, pinned to the same content (``if_sha256``),
  and the bytes are checked against the file's SHA-256 (``DataLoss``, ``CHECKSUM_MISMATCH``).

Both read and write one chunk at a time (disk I/O and hashing in a worker thread), so memory
stays at a few chunks whatever the size, and both report progress as ``(done, total)`` bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol

import grpc

from corral.client.calls import RetryPolicy
from corral.client.client import Client
from corral.client.errors import ApiError, DataLoss, FailedPrecondition, api_error
from corral.storage.v1 import file_pb2, upload_pb2
from corral.storage.v1 import storage_service_pb2 as pb

# WriteFile's limit, and the largest chunk AppendUploadChunk takes (storage_service.proto).
MAX_WRITE_BYTES = 4 * 1024 * 1024
MAX_CHUNK_BYTES = 2 * 1024 * 1024
SINGLE_CALL_LIMIT = 1024 * 1024

Progress = Callable[[int, int], None]
"""Told how many bytes have gone (or come) so far, of how many."""


class FileChangedError(OSError):
    """The local file changed while it was being uploaded (the upload was aborted)."""


class _Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


_Destination = str | os.PathLike[str] | BinaryIO


def _transient(error: ApiError) -> bool:
    """Whether the same call may well succeed a moment later."""
    if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return True
    return error.reason in ("UPLOAD_BUSY", "RATE_LIMITED")


class _Backoff:
    """Failures in a row, each followed by a pause (and a wait for the connection to be back),
    until the client's retry policy gives up."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._policy: RetryPolicy = client.retry
        self._failures = 0

    def reset(self) -> None:
        self._failures = 0

    async def wait(self, error: ApiError) -> None:
        """Pause before the next attempt, or raise ``error`` when that was the last one."""
        self._failures += 1
        if self._failures >= self._policy.attempts:
            raise error
        await asyncio.sleep(self._policy.delay(self._failures, error.retry_after))
        if error.code == grpc.StatusCode.UNAVAILABLE:
            # A dropped connection comes back by itself; wait for it rather than fail fast
            # while the channel is still in its reconnect backoff.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._client.timeout):
                    await self._client.channel("storage").channel_ready()


def _report(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


# --- uploads ------------------------------------------------------------------------------------


async def upload_file(
    client: Client,
    workspace: str,
    path: str,
    local_path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    content_type: str = "",
    progress: Progress | None = None,
    chunk_size: int = MAX_CHUNK_BYTES,
    single_call_limit: int = SINGLE_CALL_LIMIT,
) -> file_pb2.File:
    """Put the local file at ``path`` in ``workspace`` (``workspaces/{id}``); returns the file.

    Errors are the storage service's (``NotFound`` for a workspace the caller cannot see,
    ``PermissionDenied`` for a reader, ``AlreadyExists`` without ``overwrite``,
    ``ResourceExhausted`` over quota, ...), ``FileChangedError`` when the local file changes
    meanwhile, and ``OSError`` when it cannot be read. A chunked upload that fails is aborted.
    """
    chunk_size = max(1, min(chunk_size, MAX_CHUNK_BYTES))
    single_call_limit = max(0, min(single_call_limit, MAX_WRITE_BYTES))
    with open(local_path, "rb") as source:  # noqa: ASYNC230 (one open; reads go to a thread)
        before = os.fstat(source.fileno())
        size = before.st_size
        if size > single_call_limit:
            return await _chunked(
                client,
                pb.CreateUploadRequest(
                    parent=workspace,
                    upload=upload_pb2.Upload(
                        path=path, size_bytes=size, content_type=content_type, overwrite=overwrite
                    ),
                    request_id=str(uuid.uuid4()),
                ),
                source,
                before,
                chunk_size,
                progress,
            )
        data = await asyncio.to_thread(source.read, single_call_limit + 1)
        if len(data) != size:
            raise FileChangedError(f"{os.fsdecode(local_path)} changed while it was read")
    _report(progress, 0, size)
    reply = await client.storage.WriteFile(
        pb.WriteFileRequest(
            parent=workspace,
            path=path,
            data=data,
            content_type=content_type,
            overwrite=overwrite,
        ),
        timeout=client.timeout,
    )
    _report(progress, size, size)
    return reply.file


async def _chunked(
    client: Client,
    request: pb.CreateUploadRequest,
    source: BinaryIO,
    before: os.stat_result,
    chunk_size: int,
    progress: Progress | None,
) -> file_pb2.File:
    size = before.st_size
    created = await client.storage.CreateUpload(request, timeout=client.timeout)
    upload = created.upload.name
    try:
        digest = hashlib.sha256()  # of the bytes [0, offset), which the server has
        offset, chunk = 0, b""
        backoff = _Backoff(client)
        _report(progress, 0, size)
        while offset < size:
            if not chunk:
                chunk = await asyncio.to_thread(_read_at, source, offset, chunk_size, size)
            try:
                reply = await client.storage.AppendUploadChunk(
                    pb.AppendUploadChunkRequest(name=upload, offset=offset, data=chunk),
                    timeout=client.timeout,
                )
                committed = reply.committed_bytes
            except ApiError as error:
                # The chunk may have been kept although its answer was lost (a resend is then
                # answered as done) or not at all: the server says where it is.
                if not (_transient(error) or error.reason == "OFFSET_MISMATCH"):
                    raise
                await backoff.wait(error)
                committed = await _committed(client, upload, size)
            if committed == offset + len(chunk):
                await asyncio.to_thread(digest.update, chunk)
                backoff.reset()
            elif committed != offset:  # somewhere else: hash what it has from the file
                digest = await asyncio.to_thread(_hash_prefix, source, committed)
            if committed != offset:
                offset, chunk = committed, b""
                _report(progress, offset, size)
        after = os.fstat(source.fileno())
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise FileChangedError(f"{source.name} changed while it was uploaded")
        return await _commit(client, upload, digest.hexdigest())
    except BaseException:
        # Give the quota hold back now rather than when the upload expires.
        with contextlib.suppress(ApiError, grpc.aio.AioRpcError):
            await client.storage.AbortUpload(
                pb.AbortUploadRequest(name=upload), timeout=client.timeout
            )
        raise


def _read_at(source: BinaryIO, offset: int, chunk_size: int, size: int) -> bytes:
    source.seek(offset)
    want = min(chunk_size, size - offset)
    data = source.read(want)
    if len(data) != want:
        raise FileChangedError(f"{source.name} shrank while it was uploaded")
    return data


def _hash_prefix(source: BinaryIO, end: int) -> hashlib._Hash:
    digest = hashlib.sha256()
    source.seek(0)
    position = 0
    while position < end:
        block = source.read(min(MAX_CHUNK_BYTES, end - position))
        if not block:
            raise FileChangedError(f"{source.name} shrank while it was uploaded")
        digest.update(block)
        position += len(block)
    return digest


async def _committed(client: Client, upload: str, size: int) -> int:
    """Where an active upload is (GetUpload); raises if it is no longer active."""
    reply = await client.storage.GetUpload(pb.GetUploadRequest(name=upload), timeout=client.timeout)
    found = reply.upload
    if found.state != upload_pb2.Upload.STATE_ACTIVE or not 0 <= found.committed_bytes <= size:
        state = upload_pb2.Upload.State.Name(found.state)
        raise FailedPrecondition(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"{upload} is {state} at {found.committed_bytes} bytes",
            found.failure_reason or "UPLOAD_NOT_ACTIVE",
        )
    return found.committed_bytes


async def _commit(client: Client, upload: str, sha256: str) -> file_pb2.File:
    """CommitUpload; a repeat after a lost answer returns the same file."""
    backoff = _Backoff(client)
    while True:
        try:
            reply = await client.storage.CommitUpload(
                pb.CommitUploadRequest(name=upload, sha256=sha256), timeout=client.timeout
            )
            return reply.file
        except ApiError as error:
            if not _transient(error):
                raise
            await backoff.wait(error)


# --- downloads ----------------------------------------------------------------------------------


async def download_file(
    client: Client,
    name: str,
    destination: _Destination,
    *,
    progress: Progress | None = None,
    verify: bool = True,
) -> file_pb2.File:
    """Write the file ``name`` (``workspaces/{w}/files/{f}``, from ``ListFiles``) to
    ``destination``: a path (written beside it, then renamed into place once complete and
    checked; nothing is left there on failure) or a binary stream (written as it comes).

    Raises the storage service's errors (``NotFound``, ...; ``Aborted`` ``FILE_CHANGED`` if the
    file changed between a broken stream and its resumption), and ``DataLoss``
    (``CHECKSUM_MISMATCH``) if the bytes received are not the file's.
    """
    if not isinstance(destination, str | os.PathLike):
        return await _download(client, name, destination, progress, verify)
    target = Path(destination)
    part = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.part")
    # os.open honours the umask as a plain open would (a temporary file would be 0600).
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as sink:
            found = await _download(client, name, sink, progress, verify)
        os.replace(part, target)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return found


async def _download(
    client: Client, name: str, sink: _Sink, progress: Progress | None, verify: bool
) -> file_pb2.File:
    digest = hashlib.sha256()
    found: file_pb2.File | None = None
    received = 0
    backoff = _Backoff(client)
    while True:
        call = client.storage.DownloadFile(
            pb.DownloadFileRequest(
                name=name, offset=received, if_sha256=found.sha256 if found else ""
            )
        )
        try:
            async for message in call:
                if found is None:
                    if not message.HasField("file"):
                        raise _lost(
                            "the stream did not start with the file's metadata", "OFFSET_MISMATCH"
                        )
                    found = message.file
                    _report(progress, received, found.size_bytes)
                if message.offset != received:
                    raise _lost(
                        f"a chunk at byte {message.offset}, not {received}", "OFFSET_MISMATCH"
                    )
                if message.data:
                    await asyncio.to_thread(_keep, sink, digest, message.data)
                    received += len(message.data)
                    backoff.reset()
                    _report(progress, received, found.size_bytes)
            break
        except grpc.aio.AioRpcError as exc:
            error = api_error(exc)
        finally:
            call.cancel()
        if error.reason == "TOKEN_EXPIRED" and await client.tokens.refresh(
            client.tokens.access_token
        ):
            continue
        if not _transient(error):
            raise error
        await backoff.wait(error)
    if found is None:
        raise _lost("the stream ended before the file's metadata", "OFFSET_MISMATCH")
    if received != found.size_bytes:
        raise _lost(f"{received} bytes arrived of {found.size_bytes}", "SIZE_MISMATCH")
    if verify and found.sha256 and digest.hexdigest() != found.sha256:
        actual = digest.hexdigest()
        raise _lost(
            f"the bytes received have sha256 {actual}, not {found.sha256}", "CHECKSUM_MISMATCH"
        )
    return found


def _keep(sink: _Sink, digest: hashlib._Hash, data: bytes) -> None:
    sink.write(data)
    digest.update(data)


def _lost(message: str, reason: str) -> DataLoss:
    """The client's own check failed: what arrived is not the file."""
    return DataLoss(grpc.StatusCode.DATA_LOSS, message, reason)
