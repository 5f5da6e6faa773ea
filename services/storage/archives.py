"""Archives: a workspace (or one directory of it) packed as tar.gz or zip into the blob store.

The archive is written by ``tarfile`` / ``zipfile`` in a worker thread into a pipe whose other
end is the async byte stream the blob store's streaming ``put`` consumes: the two meet in a
queue of a few 1 MiB blocks, so memory stays at those blocks, a file's read buffer and the
compressor's window whatever the workspace's size, and the store measures size and sha256 as
the bytes pass. When the thread writes faster than the store takes, it waits.

The workspace belongs to a hostile agent, so the walk never follows a symbolic link (inside or
out of the workspace): directories are opened one level at a time relative to their parent with
``O_NOFOLLOW | O_DIRECTORY``, files with ``O_NOFOLLOW | O_NONBLOCK`` and checked to be regular
files on the opened descriptor. Links, FIFOs, sockets and devices are left out, and so are names
no workspace path could address (control characters, backslashes, ... : ``paths.py``), which
also keeps extractors on other systems from reading them as paths. A file that shrinks while it
is packed fails the build (``FILE_CHANGED``) rather than pack a torn copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import io
import os
import stat as stat_mode
import tarfile
import threading
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from corral.libs.errors import Aborted, FailedPrecondition, NotFound
from corral.services.storage.blobs import BlobStore, BlobTooLarge
from corral.services.storage.domain import Archive, ArchiveFormat
from corral.services.storage.paths import path_problem
from corral.services.storage.ports import BuiltArchive

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

    from corral.services.storage.workspace_fs import WorkspaceFiles

BLOCK = 1024 * 1024
QUEUE_BLOCKS = 4
COMPRESS_LEVEL = 6
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class ArchiveTooLarge(FailedPrecondition):
    default_reason = "ARCHIVE_TOO_LARGE"


class SourceChanged(Aborted):
    default_reason = "FILE_CHANGED"


class WorkspaceArchiver:
    """The storage service's :class:`~corral.services.storage.ports.ArchivePacker`."""

    def __init__(self, *, max_bytes: int | None = None) -> None:
        self._max_bytes = max_bytes

    async def pack(self, archive: Archive, files: WorkspaceFiles, blobs: BlobStore) -> BuiltArchive:
        return await build_archive(
            files.directory(archive.workspace_id),
            archive.format,
            blobs,
            archive.blob_key,
            path_prefix=archive.path_prefix,
            max_bytes=self._max_bytes,
        )


async def build_archive(
    workspace: Path,
    format: ArchiveFormat,
    blobs: BlobStore,
    key: str,
    *,
    path_prefix: str = "",
    max_bytes: int | None = None,
) -> BuiltArchive:
    """Pack ``workspace`` (only ``path_prefix``, a directory of it, when set) into the blob
    ``key``; its size, sha256 and the number of files packed. Entries are named by their paths
    in the workspace. Raises (and keeps no blob): NotFound ``FILE_NOT_FOUND`` when the workspace
    or the directory is missing (or is a link), ``ARCHIVE_TOO_LARGE`` past ``max_bytes``,
    ``FILE_CHANGED`` when a file shrinks while it is read."""
    pipe = _Pipe(asyncio.get_running_loop())
    writer = _TarGz if format is ArchiveFormat.TAR_GZ else _Zip
    worker = asyncio.ensure_future(
        asyncio.to_thread(_write_archive, workspace, path_prefix, writer, pipe)
    )
    try:
        info = await blobs.put(key, pipe.blocks(), max_bytes=max_bytes)
    except BaseException as exc:
        pipe.stop()
        with contextlib.suppress(BaseException):
            await worker  # the thread stops at its next write
        if isinstance(exc, BlobTooLarge):
            raise ArchiveTooLarge(
                f"the archive would be larger than {max_bytes} bytes",
                metadata={"limit_bytes": str(max_bytes)},
            ) from exc
        raise
    file_count = await worker
    return BuiltArchive(size_bytes=info.size, sha256=info.sha256 or "", file_count=file_count)


# -- the pipe between the writing thread and the event loop ----------------------------------


class _Stopped(Exception):
    """The reader went away (the put failed or was cancelled): the writer gives up."""


_END = object()


class _Pipe(io.RawIOBase):
    """A write-only file for the thread; an async iterator of blocks for the loop. At most
    ``QUEUE_BLOCKS`` blocks wait between them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._slots = threading.Semaphore(QUEUE_BLOCKS)
        self._pending = bytearray()
        self._stopped = False
        self._abandoned = False

    # thread side
    def writable(self) -> bool:
        return True

    def write(self, data: ReadableBuffer) -> int:
        view = memoryview(data)
        if self._abandoned:  # a failed writer's clean-up (when it is collected): dropped
            return view.nbytes
        if self._stopped:
            raise _Stopped
        self._pending += view
        if len(self._pending) >= BLOCK:
            self._send(bytes(self._pending))
            self._pending.clear()
        return view.nbytes

    def _send(self, item: object) -> None:
        self._slots.acquire()
        if self._stopped:
            raise _Stopped
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def finish(self) -> None:
        if self._pending:
            self._send(bytes(self._pending))
            self._pending.clear()
        self._loop.call_soon_threadsafe(self._queue.put_nowait, _END)

    def abandon(self, exc: BaseException) -> None:
        """The writer failed: the reader gets ``exc`` (unless it stopped first); whatever is
        written afterwards goes nowhere."""
        self._abandoned = True
        if not self._stopped:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, exc)

    # loop side
    async def blocks(self) -> AsyncIterator[bytes]:
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            self._slots.release()
            assert isinstance(item, bytes)
            yield item

    def stop(self) -> None:
        self._stopped = True
        for _ in range(QUEUE_BLOCKS + 1):
            self._slots.release()


def _write_archive(workspace: Path, path_prefix: str, writer: type[_Writer], pipe: _Pipe) -> int:
    """The thread: walk and pack, then close the pipe (with the error, if any)."""
    archive: _Writer | None = None
    try:
        count = 0
        top = _open_top(workspace, path_prefix)
        try:
            archive = writer(pipe)
            for entry in _walk(top, f"{path_prefix}/" if path_prefix else ""):
                if entry.is_dir:
                    archive.add_directory(entry.path, entry.stat)
                    continue
                fd = _open_file(entry.parent, entry.name)
                if fd is None:
                    continue  # gone, or swapped for something that is not a file
                try:
                    info = os.fstat(fd)
                    archive.add_file(entry.path, info, _Reader(fd, info.st_size, entry.path))
                finally:
                    os.close(fd)
                count += 1
            archive.close()
        finally:
            os.close(top)
        pipe.finish()
    except BaseException as exc:
        pipe.abandon(exc)
        if archive is not None:
            archive.discard()
        raise
    return count


# -- walking a workspace without following links ---------------------------------------------


@dataclass(frozen=True)
class _Entry:
    path: str
    is_dir: bool
    stat: os.stat_result
    parent: int  # the open directory holding it (valid while the entry is being handled)
    name: str


def _missing(what: str) -> NotFound:
    return NotFound(f"no directory at {what!r}", reason="FILE_NOT_FOUND", metadata={"path": what})


def _open_top(workspace: Path, path_prefix: str) -> int:
    try:
        fd = os.open(workspace, _DIR)
    except OSError as exc:
        raise _missing("") from exc
    for segment in path_prefix.split("/") if path_prefix else []:
        try:
            child = os.open(segment, _DIR, dir_fd=fd)
        except OSError as exc:
            raise _missing(path_prefix) from exc
        finally:
            os.close(fd)
        fd = child
    return fd


def _walk(top: int, base: str) -> Iterator[_Entry]:
    """Directories and regular files under ``top``, depth first, each directory's entries in
    name order. Directories are opened as they are entered, without following links (one
    swapped for a link after it was listed is skipped); the caller owns ``top``."""
    stack: list[tuple[int, str, Iterator[str]]] = [(top, base, iter(sorted(os.listdir(top))))]
    try:
        while stack:
            fd, prefix, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                if fd != top:
                    os.close(fd)
                continue
            path = prefix + name
            if path_problem(path) is not None:
                continue
            try:
                info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat_mode.S_ISREG(info.st_mode):
                yield _Entry(path, False, info, fd, name)
            elif stat_mode.S_ISDIR(info.st_mode):
                try:
                    child = os.open(name, _DIR, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                        continue
                    raise
                yield _Entry(path, True, info, fd, name)
                stack.append((child, path + "/", iter(sorted(os.listdir(child)))))
    finally:
        for fd, _, _ in stack:
            if fd != top:
                os.close(fd)


def _open_file(parent: int, name: str) -> int | None:
    try:
        fd = os.open(name, _FILE, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.EACCES):
            return None
        raise
    if not stat_mode.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


class _Reader(io.RawIOBase):
    """Exactly ``size`` bytes of an open file (what the archive's header promised)."""

    def __init__(self, fd: int, size: int, path: str) -> None:
        super().__init__()
        self._fd, self._left, self._position, self._path = fd, size, 0, path

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        want = self._left if size is None or size < 0 else min(size, self._left)
        if want <= 0:
            return b""
        block = os.pread(self._fd, min(want, BLOCK), self._position)
        if not block:
            raise SourceChanged(
                f"{self._path!r} shrank while it was packed", metadata={"path": self._path}
            )
        self._position += len(block)
        self._left -= len(block)
        return block


# -- the two formats ---------------------------------------------------------------------------


class _Writer:
    def __init__(self, out: BinaryIO | _Pipe) -> None:
        self._out = out

    def add_directory(self, path: str, info: os.stat_result) -> None:
        raise NotImplementedError

    def add_file(self, path: str, info: os.stat_result, reader: _Reader) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        """Close after a failure, into the abandoned pipe (so nothing is left for the garbage
        collector to finish, in whatever order it picks)."""
        with contextlib.suppress(Exception):
            self.close()


class _TarGz(_Writer):
    """POSIX (pax) tar, gzip-compressed as it streams: owners and special bits left out."""

    def __init__(self, out: BinaryIO | _Pipe) -> None:
        super().__init__(out)
        self._gzip = gzip.GzipFile(fileobj=out, mode="wb", compresslevel=COMPRESS_LEVEL, mtime=0)
        # Closed by close(); gzip apart from tar for a level other than stream mode's 9 (3.11).
        self._tar = tarfile.open(  # noqa: SIM115
            fileobj=self._gzip, mode="w|", format=tarfile.PAX_FORMAT
        )

    def _header(self, path: str, info: os.stat_result, kind: bytes) -> tarfile.TarInfo:
        header = tarfile.TarInfo(path)
        header.type = kind
        header.mode = info.st_mode & 0o777
        header.mtime = int(info.st_mtime)
        return header

    def add_directory(self, path: str, info: os.stat_result) -> None:
        self._tar.addfile(self._header(path, info, tarfile.DIRTYPE))

    def add_file(self, path: str, info: os.stat_result, reader: _Reader) -> None:
        header = self._header(path, info, tarfile.REGTYPE)
        header.size = info.st_size
        self._tar.addfile(header, reader)

    def close(self) -> None:
        self._tar.close()
        self._gzip.close()

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._tar.close()
        with contextlib.suppress(Exception):
            self._gzip.close()


class _Zip(_Writer):
    """ZIP with deflate, written forward only (data descriptors; zip64 where sizes need it)."""

    def __init__(self, out: BinaryIO | _Pipe) -> None:
        super().__init__(out)
        self._zip = zipfile.ZipFile(
            out,
            mode="w",
            compression=zipfile.ZIP_DEFLATED,
            compresslevel=COMPRESS_LEVEL,
        )

    @staticmethod
    def _info(path: str, info: os.stat_result, kind: int) -> zipfile.ZipInfo:
        moment = datetime.fromtimestamp(info.st_mtime, UTC).timetuple()[:6]
        entry = zipfile.ZipInfo(path, max(moment, _ZIP_EPOCH))
        entry.external_attr = (kind | (info.st_mode & 0o777)) << 16
        entry.compress_type = zipfile.ZIP_DEFLATED
        return entry

    def add_directory(self, path: str, info: os.stat_result) -> None:
        entry = self._info(path + "/", info, stat_mode.S_IFDIR)
        entry.external_attr |= 0x10  # MS-DOS directory flag
        entry.compress_type = zipfile.ZIP_STORED
        self._zip.writestr(entry, b"")

    def add_file(self, path: str, info: os.stat_result, reader: _Reader) -> None:
        entry = self._info(path, info, stat_mode.S_IFREG)
        entry.file_size = info.st_size  # decides zip64 up front
        with self._zip.open(entry, "w") as target:
            while block := reader.read(BLOCK):
                target.write(block)

    def close(self) -> None:
        self._zip.close()
