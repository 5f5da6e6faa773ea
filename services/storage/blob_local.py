"""The blob store on the local filesystem (the embedded default).

Layout under the root::

    objects/<key>~                       one file per object (the ``~``, which no key may hold,
                                         lets ``a/b`` and ``a/b/c`` both exist, as in S3)
    multipart/<upload id>/key            the key the upload will become
    multipart/<upload id>/part-<n>       its parts
    tmp/                                 files being written (same filesystem: rename is atomic)

Every write goes to a fresh file in ``tmp/`` and is renamed into place, so readers see an
object whole or not at all. Files are opened with ``O_NOFOLLOW`` and every directory on the way
is checked to be inside the root, so a symlink planted under the root cannot redirect a read or
a write. Blocking calls run in worker threads; memory stays at one chunk per stream.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import stat as stat_mode
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from corral.services.storage.blobs import (
    MAX_PARTS,
    S3_MIN_PART_SIZE,
    BlobInfo,
    BlobNotFound,
    BlobRangeError,
    BlobTooLarge,
    InvalidParts,
    MultipartNotFound,
    MultipartUpload,
    PartInfo,
    check_key,
    check_prefix,
)

READ_CHUNK = 1024 * 1024
_SUFFIX = "~"
_UPLOAD_ID_BYTES = 16


def _nofollow_open(path: Path, flags: int, mode: int = 0o600) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def _mtime(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


class LocalBlobStore:
    """A :class:`~corral.services.storage.blobs.BlobStore` in a directory."""

    def __init__(self, root: Path, *, min_part_size: int = S3_MIN_PART_SIZE) -> None:
        self._root = Path(root)
        self._objects = self._root / "objects"
        self._multipart = self._root / "multipart"
        self._tmp = self._root / "tmp"
        for directory in (self._objects, self._multipart, self._tmp):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._real_root = self._root.resolve(strict=True)
        # The same rule as S3 by default, so a service tested here cannot lean on small parts.
        self._min_part_size = min_part_size

    @property
    def min_part_size(self) -> int:
        return self._min_part_size

    # -- paths ---------------------------------------------------------------------------------

    def _inside(self, directory: Path) -> None:
        """Refuse a directory that resolves outside the root (a planted symlink)."""
        real = directory.resolve()
        if real != self._real_root and self._real_root not in real.parents:
            raise PermissionError(errno.ELOOP, "blob directory leaves the store", str(directory))

    def _object_path(self, key: str) -> Path:
        return self._objects / (check_key(key) + _SUFFIX)

    def _upload_dir(self, upload_id: str) -> Path:
        if len(upload_id) != 2 * _UPLOAD_ID_BYTES or not all(
            c in "0123456789abcdef" for c in upload_id
        ):
            raise MultipartNotFound(f"no multipart upload {upload_id!r}")
        return self._multipart / upload_id

    # -- writing -------------------------------------------------------------------------------

    async def _spool(
        self, chunks: AsyncIterable[bytes], max_bytes: int | None
    ) -> tuple[Path, int, str]:
        """Write ``chunks`` to a new temporary file; (path, size, sha256). Removes it on error."""
        path = self._tmp / secrets.token_hex(16)
        fd = await asyncio.to_thread(
            _nofollow_open, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
        )
        digest = hashlib.sha256()
        size = 0
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise BlobTooLarge(f"more than {max_bytes} bytes")
                await asyncio.to_thread(_write_all, fd, chunk, digest)
            await asyncio.to_thread(os.fsync, fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise
        os.close(fd)
        return path, size, digest.hexdigest()

    async def _place_spooled(self, path: Path, key: str) -> Path:
        """Put a spooled file in ``key``'s place; on failure the spooled file goes."""
        try:
            return await asyncio.to_thread(self._place, path, key)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # at once, also when cancelled
            raise

    def _place(self, source: Path, key: str) -> Path:
        """Rename ``source`` to the object's path, creating its directories (blocking)."""
        target = self._object_path(key)
        for _ in range(8):  # a concurrent delete may prune a parent we just created
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._inside(target.parent)
            try:
                os.replace(source, target)
                return target
            except FileNotFoundError:
                if not source.exists():
                    raise
        raise OSError(f"could not place blob {key!r}")

    async def put(
        self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int | None = None
    ) -> BlobInfo:
        check_key(key)
        path, size, sha256 = await self._spool(chunks, max_bytes)
        target = await self._place_spooled(path, key)
        modified = _mtime((await asyncio.to_thread(os.lstat, target)).st_mtime)
        return BlobInfo(key, size, sha256, modified)

    # -- reading -------------------------------------------------------------------------------

    def _open_object(self, key: str) -> tuple[int, os.stat_result]:
        path = self._object_path(key)
        try:
            self._inside(path.parent)
            fd = _nofollow_open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise BlobNotFound(f"no blob {key!r}") from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BlobNotFound(f"no blob {key!r}") from exc
            raise
        info = os.fstat(fd)
        if not stat_mode.S_ISREG(info.st_mode):
            os.close(fd)
            raise BlobNotFound(f"no blob {key!r}")
        return fd, info

    async def get(
        self, key: str, *, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        fd, info = await asyncio.to_thread(self._open_object, key)
        if offset > info.st_size:
            os.close(fd)
            raise BlobRangeError(f"offset {offset} is past the end ({info.st_size} bytes)")
        end = info.st_size if length is None else min(info.st_size, offset + length)
        return _read_range(fd, offset, end)

    async def stat(self, key: str) -> BlobInfo:
        fd, info = await asyncio.to_thread(self._open_object, key)
        os.close(fd)
        return BlobInfo(key, info.st_size, None, _mtime(info.st_mtime))

    async def delete(self, key: str) -> bool:
        path = self._object_path(key)

        def remove() -> bool:
            self._inside(path.parent)
            try:
                if stat_mode.S_ISDIR(os.lstat(path).st_mode):
                    return False
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                return False
            self._prune(path.parent, self._objects)
            return True

        return await asyncio.to_thread(remove)

    @staticmethod
    def _prune(directory: Path, stop: Path) -> None:
        while directory != stop:
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    async def list(self, prefix: str = "", *, start_after: str = "") -> AsyncIterator[BlobInfo]:
        check_prefix(prefix)
        entries = await asyncio.to_thread(self._scan, prefix)
        for key, info in entries:
            if key > start_after:
                yield BlobInfo(key, info.st_size, None, _mtime(info.st_mtime))

    def _scan(self, prefix: str) -> builtins.list[tuple[str, os.stat_result]]:
        """Keys under ``prefix``, sorted as S3 sorts them (whole keys, byte order)."""
        base = prefix.rpartition("/")[0]
        start = self._objects / base if base else self._objects
        found: list[tuple[str, os.stat_result]] = []
        stack = [start]
        while stack:
            directory = stack.pop()
            try:
                with os.scandir(directory) as it:
                    for entry in it:
                        name = entry.path[len(str(self._objects)) + 1 :]
                        if entry.is_dir(follow_symlinks=False):
                            if (name + "/").startswith(prefix) or prefix.startswith(name + "/"):
                                stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False) and name.endswith(_SUFFIX):
                            key = name.removesuffix(_SUFFIX)
                            if key.startswith(prefix):
                                found.append((key, entry.stat(follow_symlinks=False)))
            except (FileNotFoundError, NotADirectoryError):
                continue
        found.sort(key=lambda item: item[0].encode())
        return found

    async def copy(self, source: str, destination: str) -> BlobInfo:
        check_key(destination)
        fd, _ = await asyncio.to_thread(self._open_object, source)
        spool = self._tmp / secrets.token_hex(16)

        def duplicate() -> str:
            # Objects are never changed in place, so a copy may share the file's bytes.
            digest = hashlib.sha256()
            try:
                with open(spool, "xb") as out:
                    while block := os.read(fd, READ_CHUNK):
                        digest.update(block)
                        out.write(block)
                    out.flush()
                    os.fsync(out.fileno())
            finally:
                os.close(fd)
            return digest.hexdigest()

        try:
            sha256 = await asyncio.to_thread(duplicate)
            target = await asyncio.to_thread(self._place, spool, destination)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                spool.unlink()
            raise
        info = await asyncio.to_thread(os.lstat, target)
        return BlobInfo(destination, info.st_size, sha256, _mtime(info.st_mtime))

    # -- multipart -----------------------------------------------------------------------------

    async def begin_multipart(self, key: str) -> str:
        check_key(key)
        upload_id = secrets.token_hex(_UPLOAD_ID_BYTES)
        directory = self._multipart / upload_id

        def create() -> None:
            directory.mkdir(mode=0o700)
            (directory / "key").write_text(key)

        await asyncio.to_thread(create)
        return upload_id

    def _upload_key(self, key: str, upload_id: str) -> Path:
        directory = self._upload_dir(upload_id)
        try:
            stored = (directory / "key").read_text()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise MultipartNotFound(f"no multipart upload {upload_id!r}") from exc
        if stored != key:
            raise MultipartNotFound(f"multipart upload {upload_id!r} is not for {key!r}")
        return directory

    async def put_part(
        self,
        key: str,
        upload_id: str,
        number: int,
        chunks: AsyncIterable[bytes],
        *,
        max_bytes: int | None = None,
    ) -> PartInfo:
        if not 1 <= number <= MAX_PARTS:
            raise ValueError(f"part numbers are 1..{MAX_PARTS}")
        directory = await asyncio.to_thread(self._upload_key, key, upload_id)
        path, size, sha256 = await self._spool(chunks, max_bytes)
        try:
            await asyncio.to_thread(_rename_into, path, directory, f"part-{number:05d}")
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise
        return PartInfo(number, size, sha256)

    async def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[PartInfo]
    ) -> BlobInfo:
        directory = await asyncio.to_thread(self._upload_key, key, upload_id)
        if not parts:
            raise InvalidParts("a multipart upload needs at least one part")
        numbers = [part.number for part in parts]
        if numbers != sorted(set(numbers)):
            raise InvalidParts("parts must be in ascending order, each once")
        for part in parts[:-1]:
            if part.size < self._min_part_size:
                raise InvalidParts(
                    f"part {part.number} has {part.size} bytes; "
                    f"all but the last need {self._min_part_size}"
                )

        async def joined() -> AsyncIterator[bytes]:
            for part in parts:
                path = directory / f"part-{part.number:05d}"
                try:
                    fd = await asyncio.to_thread(_nofollow_open, path, os.O_RDONLY)
                except FileNotFoundError as exc:
                    raise InvalidParts(f"part {part.number} was not uploaded") from exc
                size = os.fstat(fd).st_size
                if size != part.size:
                    os.close(fd)
                    raise InvalidParts(f"part {part.number} does not match its upload")
                async for block in _read_range(fd, 0, size):
                    yield block

        path, size, sha256 = await self._spool(joined(), None)
        target = await self._place_spooled(path, key)
        await asyncio.to_thread(shutil.rmtree, directory, True)
        info = await asyncio.to_thread(os.lstat, target)
        return BlobInfo(key, size, sha256, _mtime(info.st_mtime))

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            directory = await asyncio.to_thread(self._upload_key, key, upload_id)
        except MultipartNotFound:
            return
        await asyncio.to_thread(shutil.rmtree, directory, True)

    async def list_multipart(self, prefix: str = "") -> AsyncIterator[MultipartUpload]:
        check_prefix(prefix)

        def scan() -> builtins.list[MultipartUpload]:
            found = []
            with os.scandir(self._multipart) as it:
                for entry in it:
                    try:
                        key_file = Path(entry.path) / "key"
                        key = key_file.read_text()
                        started = _mtime(key_file.stat().st_mtime)
                    except (FileNotFoundError, NotADirectoryError):
                        continue
                    if key.startswith(prefix):
                        found.append(MultipartUpload(key, entry.name, started))
            return sorted(found, key=lambda upload: (upload.key, upload.upload_id))

        for upload in await asyncio.to_thread(scan):
            yield upload


def _write_all(fd: int, data: bytes, digest: hashlib._Hash) -> None:
    digest.update(data)
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _rename_into(source: Path, directory: Path, name: str) -> None:
    if not directory.is_dir():
        raise MultipartNotFound("the multipart upload ended while a part was uploading")
    os.replace(source, directory / name)


def _read_range(fd: int, offset: int, end: int) -> AsyncIterator[bytes]:
    """Yield ``[offset, end)`` of ``fd`` and close it, however the consumer stops (a reader
    dropped before its first byte is closed when it is collected: the file object owns ``fd``)."""
    file = open(fd, "rb", buffering=0, closefd=True)  # noqa: SIM115 - closed by the generator

    async def blocks() -> AsyncIterator[bytes]:
        with file:
            position = offset
            while position < end:
                size = min(READ_CHUNK, end - position)
                block = await asyncio.to_thread(os.pread, file.fileno(), size, position)
                if not block:
                    return
                position += len(block)
                yield block

    return blocks()
