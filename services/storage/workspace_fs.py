"""Workspaces on the filesystem root storage shares with the runtime.

``<root>/workspaces/<id>/`` is a workspace: the directory the agent works in. The agent is
hostile and writes there directly, so every access here goes down the path one directory at a
time with ``openat``-style calls (``dir_fd``) and ``O_NOFOLLOW``: a symbolic link anywhere in a
path is never followed, wherever it points (reads answer FILE_NOT_FOUND, writes PATH_CONFLICT).
Files are opened ``O_NONBLOCK`` (a FIFO the agent planted cannot hang a read) and must be
regular files. Listings, measurements and clones skip links and special files.

Writes go to a fresh file in ``<root>/staging/`` (same filesystem, out of the agent's reach) and
are renamed (or, without overwrite, hard-linked) into place: a file appears whole or not at all.
Deleted workspaces are renamed into ``<root>/trash/`` at once and removed by the sweeper.

Ownership: the agent must be able to read and change every file storage puts in its workspace
(uploads, writes, clones). Where storage and the runtime run as one unprivileged user (``make
run``, Kubernetes: uid 10001), files are that user's anyway. Where storage runs as root (Docker
Compose), it gives what it makes in a workspace (the workspace, the directories of a path, each
file, a clone's copies) to the user agents run as (``CORRAL_RUNTIME_AGENT_UID``/``GID``, the
runtime's own setting) with ``fchown`` on the descriptor it made, before the file is renamed into
place: nothing is changed by path, so no link the agent plants can redirect it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import stat as stat_mode
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from corral.libs.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound
from corral.services.storage.paths import DELIMITER, path_problem

READ_CHUNK = 1024 * 1024
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class FileChanged(Aborted):
    default_reason = "FILE_CHANGED"


@dataclass(frozen=True)
class FileStat:
    path: str
    size: int
    mtime_ns: int
    inode: int

    @property
    def fingerprint(self) -> str:
        """What the digest cache keys on: the content is the same while this is."""
        return f"{self.size}:{self.mtime_ns}:{self.inode}"


@dataclass(frozen=True)
class Entry:
    """A listing's row: a file (``stat`` set) or, with a delimiter, a directory prefix."""

    key: str
    stat: FileStat | None = None


def file_not_found(path: str) -> NotFound:
    return NotFound(f"no file at {path!r}", reason="FILE_NOT_FOUND", metadata={"path": path})


def path_conflict(path: str, what: str) -> FailedPrecondition:
    return FailedPrecondition(f"{path!r}: {what}", reason="PATH_CONFLICT", metadata={"path": path})


def file_exists(path: str) -> AlreadyExists:
    return AlreadyExists(
        f"a file exists at {path!r}", reason="FILE_EXISTS", metadata={"path": path}
    )


def file_changed(path: str) -> FileChanged:
    return FileChanged(
        f"the file at {path!r} is not the one if_sha256 names; read it again",
        metadata={"path": path},
    )


def _is_link_error(exc: OSError) -> bool:
    return exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK)


def _give(fd: int, owner: tuple[int, int] | None) -> None:
    """Make what ``fd`` names ``owner``'s (uid, gid), if storage gives files away at all."""
    if owner is not None:
        os.fchown(fd, *owner)


class _Walk:
    """The directories of one path, opened one by one without following links; directories it
    creates are ``owner``'s."""

    def __init__(self, workspace: Path, path: str, owner: tuple[int, int] | None = None) -> None:
        self.parts = path.split("/") if path else []
        self.path = path
        self._workspace = workspace
        self._owner = owner

    def parent(self, *, create: bool) -> int:
        """An fd of the path's directory. Missing directories: created (``create``), else
        FILE_NOT_FOUND; a file or a link in the way: PATH_CONFLICT when creating, else
        FILE_NOT_FOUND."""
        return self._open(self.parts[:-1], create)

    def directory(self) -> int:
        """An fd of the path itself as a directory (FILE_NOT_FOUND if it is none)."""
        return self._open(self.parts, False)

    def _open(self, segments: list[str], create: bool) -> int:
        try:
            fd = os.open(self._workspace, _DIR)
        except FileNotFoundError as exc:
            raise NotFound("the workspace's directory is missing", reason="FILE_NOT_FOUND") from exc
        for segment in segments:
            fd = self._down(fd, segment, create)  # closes fd, whatever happens
        return fd

    def _down(self, fd: int, segment: str, create: bool) -> int:
        try:
            try:
                child = os.open(segment, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                made = True
                try:
                    os.mkdir(segment, 0o755, dir_fd=fd)
                except FileExistsError:
                    made = False
                child = os.open(segment, _DIR, dir_fd=fd)
                if made:
                    _give(child, self._owner)
        except FileNotFoundError as exc:
            raise file_not_found(self.path) from exc
        except OSError as exc:
            if not _is_link_error(exc):
                raise
            if create:
                raise path_conflict(
                    self.path, "a directory of the path is a file or a link"
                ) from exc
            raise file_not_found(self.path) from exc
        finally:
            os.close(fd)
        return child

    @property
    def name(self) -> str:
        return self.parts[-1]


def _copy_sparsely(source: int, target: int) -> None:
    """Copy ``source`` into the empty ``target``: only its data (SEEK_DATA/SEEK_HOLE), the
    holes left as holes, the length kept; a plain copy where the filesystem cannot tell."""
    offset = 0
    try:
        while True:
            try:
                start = os.lseek(source, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data past offset: the rest is a hole
                    break
                raise
            offset = os.lseek(source, start, os.SEEK_HOLE)
            if _copy_range(source, target, start, offset) < offset:  # the file shrank meanwhile
                break
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        os.ftruncate(target, 0)  # no SEEK_DATA here: copy every byte
        _copy_range(source, target, 0, None)
    os.ftruncate(target, os.fstat(source).st_size)  # a hole at the end has no data to copy


def _copy_range(source: int, target: int, start: int, stop: int | None) -> int:
    """Copy bytes ``start``..``stop`` (None: to the end) at the same offsets; where it ended."""
    at = start
    while stop is None or at < stop:
        block = os.pread(source, READ_CHUNK if stop is None else min(READ_CHUNK, stop - at), at)
        if not block:
            break
        written = 0
        while written < len(block):
            written += os.pwrite(target, block[written:], at + written)
        at += len(block)
    return at


def _open_regular(parent: int, name: str, path: str) -> tuple[int, os.stat_result]:
    try:
        fd = os.open(name, _FILE, dir_fd=parent)
    except FileNotFoundError as exc:
        raise file_not_found(path) from exc
    except OSError as exc:
        if _is_link_error(exc) or exc.errno in (errno.ENXIO, errno.EACCES):
            raise file_not_found(path) from exc
        raise
    info = os.fstat(fd)
    if not stat_mode.S_ISREG(info.st_mode):
        os.close(fd)
        raise file_not_found(path)
    return fd, info


def _stat_of(path: str, info: os.stat_result) -> FileStat:
    return FileStat(path, info.st_size, info.st_mtime_ns, info.st_ino)


def _digest(fd: int) -> str:
    digest = hashlib.sha256()
    position = 0
    while block := os.pread(fd, READ_CHUNK, position):
        digest.update(block)
        position += len(block)
    return digest.hexdigest()


class OpenFile:
    """One opened copy of a file: its metadata and ranged reads of exactly these bytes."""

    def __init__(self, fd: int, stat: FileStat) -> None:
        self._file = open(fd, "rb", buffering=0, closefd=True)  # noqa: SIM115 - closed by close()
        self.stat = stat

    async def sha256(self) -> str:
        return await asyncio.to_thread(_digest, self._file.fileno())

    async def read(self, offset: int, end: int) -> AsyncIterator[bytes]:
        position = offset
        while position < end:
            size = min(READ_CHUNK, end - position)
            block = await asyncio.to_thread(os.pread, self._file.fileno(), size, position)
            if not block:
                return
            position += len(block)
            yield block

    def close(self) -> None:
        self._file.close()


class WorkspaceFiles:
    def __init__(self, root: Path, *, agent: tuple[int, int] | None = None) -> None:
        """``agent``: the (uid, gid) agents run as; when this process is root, what it makes in
        a workspace becomes theirs (see the module's docstring)."""
        self.root = Path(root)
        self.owner = agent if agent is not None and os.geteuid() == 0 else None
        self._workspaces = self.root / "workspaces"
        self._staging = self.root / "staging"
        self._trash = self.root / "trash"
        self._workspaces.mkdir(parents=True, exist_ok=True)
        for private in (self._staging, self._trash):
            private.mkdir(parents=True, exist_ok=True, mode=0o700)

    def directory(self, workspace_id: str) -> Path:
        """Where the runtime runs the workspace's agent."""
        return self._workspaces / workspace_id

    # -- workspaces ------------------------------------------------------------------------------

    async def create(self, workspace_id: str) -> bool:
        """Make the empty directory (the agent's); False if it exists already."""
        try:
            await asyncio.to_thread(self._make_directory, self.directory(workspace_id))
        except FileExistsError:
            return False
        return True

    def _make_directory(self, path: Path) -> None:
        os.mkdir(path, 0o755)
        if self.owner is not None:
            fd = os.open(path, _DIR)
            try:
                _give(fd, self.owner)
            finally:
                os.close(fd)

    async def clone(self, source_id: str, target_id: str) -> bool:
        """Copy the regular files and directories of ``source_id`` (links and special files
        stay behind) into a new ``target_id``, which appears whole; False if it exists."""
        return await asyncio.to_thread(self._clone, source_id, target_id)

    def _clone(self, source_id: str, target_id: str) -> bool:
        building = self._staging / f"clone-{secrets.token_hex(8)}"
        source = self.directory(source_id)
        top_mode = stat_mode.S_IMODE(os.stat(source, follow_symlinks=False).st_mode) & 0o777
        self._make_directory(building)
        modes: list[tuple[Path, int]] = []  # the directories' own modes, set once filled
        try:
            for directory, dirs, files, dir_fd in os.fwalk(source, follow_symlinks=False):
                relative = os.path.relpath(directory, source)
                target = building if relative == "." else building / relative
                for name in dirs:
                    info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    if stat_mode.S_ISDIR(info.st_mode):
                        self._make_directory(target / name)
                        modes.append((target / name, stat_mode.S_IMODE(info.st_mode) & 0o777))
                for name in files:
                    with contextlib.suppress(NotFound):
                        self._copy_file(dir_fd, name, target / name, self.owner)
            for path, mode in reversed(modes):  # deepest first: a read-only parent comes last
                os.chmod(path, mode, follow_symlinks=False)
            os.chmod(building, top_mode, follow_symlinks=False)
            os.rename(building, self.directory(target_id))
        except OSError as exc:
            shutil.rmtree(building, ignore_errors=True)
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                return False
            raise
        return True

    @staticmethod
    def _copy_file(dir_fd: int, name: str, target: Path, owner: tuple[int, int] | None) -> None:
        """A copy with the original's permission bits (an agent's script stays executable),
        ``owner``'s when given, and its holes (a sparse file stays sparse)."""
        fd, info = _open_regular(dir_fd, name, name)
        try:
            with open(target, "xb", buffering=0) as out:
                _give(out.fileno(), owner)
                os.fchmod(out.fileno(), stat_mode.S_IMODE(info.st_mode) & 0o777)
                _copy_sparsely(fd, out.fileno())
        finally:
            os.close(fd)

    async def discard(self, workspace_id: str) -> None:
        """Take the workspace away at once (into the trash, emptied by :meth:`empty_trash`)."""
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(
                os.rename,
                self.directory(workspace_id),
                self._trash / f"{workspace_id}-{secrets.token_hex(4)}",
            )

    async def empty_trash(self) -> int:
        def empty() -> int:
            count = 0
            for entry in os.scandir(self._trash):
                shutil.rmtree(entry.path, ignore_errors=True)  # never follows links (fd-based)
                count += 1
            return count

        return await asyncio.to_thread(empty)

    async def measure(self, workspace_id: str) -> tuple[int, int]:
        """(bytes, files) of the workspace's regular files, links not followed."""

        def measure() -> tuple[int, int]:
            total = count = 0
            top = self.directory(workspace_id)
            if not top.is_dir():
                return 0, 0
            for _, _, files, dir_fd in os.fwalk(top, follow_symlinks=False):
                for name in files:
                    with contextlib.suppress(FileNotFoundError):
                        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                        if stat_mode.S_ISREG(info.st_mode):
                            total += info.st_size
                            count += 1
            return total, count

        return await asyncio.to_thread(measure)

    # -- files -----------------------------------------------------------------------------------

    def _walk(self, workspace_id: str, path: str) -> _Walk:
        return _Walk(self.directory(workspace_id), path, self.owner)

    async def open(self, workspace_id: str, path: str) -> OpenFile:
        """The regular file at ``path`` (FILE_NOT_FOUND for anything else)."""

        def opened() -> OpenFile:
            walk = self._walk(workspace_id, path)
            parent = walk.parent(create=False)
            try:
                fd, info = _open_regular(parent, walk.name, path)
            finally:
                os.close(parent)
            return OpenFile(fd, _stat_of(path, info))

        return await asyncio.to_thread(opened)

    async def stat(self, workspace_id: str, path: str) -> FileStat | None:
        """The regular file at ``path``, or None (nothing, a directory, a link, ...)."""
        try:
            opened = await self.open(workspace_id, path)
        except NotFound:
            return None
        opened.close()
        return opened.stat

    async def write(
        self,
        workspace_id: str,
        path: str,
        chunks: AsyncIterable[bytes],
        *,
        overwrite: bool,
        max_bytes: int,
        if_sha256: str = "",
    ) -> tuple[FileStat, str]:
        """Stream ``chunks`` into ``path``, atomically; (its stat, its sha256). FILE_TOO_LARGE
        past ``max_bytes``; FILE_EXISTS without ``overwrite``; FILE_CHANGED when ``if_sha256``
        does not name the file being replaced."""
        staged = self._staging / secrets.token_hex(16)
        digest = hashlib.sha256()
        size = 0
        out = await asyncio.to_thread(open, staged, "xb")
        try:
            _give(out.fileno(), self.owner)  # in staging, out of the agent's reach
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise FailedPrecondition(
                        f"the file would be larger than {max_bytes} bytes",
                        reason="FILE_TOO_LARGE",
                        metadata={"limit_bytes": str(max_bytes)},
                    )
                digest.update(chunk)
                await asyncio.to_thread(out.write, chunk)
            await asyncio.to_thread(out.flush)
            await asyncio.to_thread(os.fsync, out.fileno())
            out.close()
            stat = await asyncio.to_thread(
                self._place, workspace_id, path, staged, overwrite, if_sha256
            )
        finally:
            out.close()
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
        return stat, digest.hexdigest()

    def _place(
        self, workspace_id: str, path: str, staged: Path, overwrite: bool, if_sha256: str
    ) -> FileStat:
        walk = self._walk(workspace_id, path)
        parent = walk.parent(create=True)
        try:
            self._check_target(parent, walk.name, path, overwrite, if_sha256)
            try:
                if overwrite:
                    os.rename(staged, walk.name, dst_dir_fd=parent)
                else:
                    os.link(staged, walk.name, dst_dir_fd=parent, follow_symlinks=False)
            except FileExistsError as exc:
                raise file_exists(path) from exc
            except IsADirectoryError as exc:
                raise path_conflict(path, "the path is a directory") from exc
            info = os.stat(walk.name, dir_fd=parent, follow_symlinks=False)
        finally:
            os.close(parent)
        return _stat_of(path, info)

    @staticmethod
    def _check_target(parent: int, name: str, path: str, overwrite: bool, if_sha256: str) -> None:
        try:
            existing = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            if if_sha256:
                raise file_changed(path) from None
            return
        if stat_mode.S_ISDIR(existing.st_mode):
            raise path_conflict(path, "the path is a directory")
        if not overwrite:
            raise file_exists(path)
        if if_sha256:
            fd, _ = _open_regular(parent, name, path)
            try:
                if _digest(fd) != if_sha256:
                    raise file_changed(path)
            finally:
                os.close(fd)

    async def delete(self, workspace_id: str, path: str, if_sha256: str = "") -> FileStat:
        def delete() -> FileStat:
            walk = self._walk(workspace_id, path)
            parent = walk.parent(create=False)
            try:
                fd, info = _open_regular(parent, walk.name, path)
                try:
                    if if_sha256 and _digest(fd) != if_sha256:
                        raise file_changed(path)
                finally:
                    os.close(fd)
                os.unlink(walk.name, dir_fd=parent)
            finally:
                os.close(parent)
            return _stat_of(path, info)

        return await asyncio.to_thread(delete)

    async def move(
        self, workspace_id: str, source: str, target: str, *, overwrite: bool
    ) -> FileStat:
        def move() -> FileStat:
            src = self._walk(workspace_id, source)
            dst = self._walk(workspace_id, target)
            src_parent = src.parent(create=False)
            try:
                fd, _ = _open_regular(src_parent, src.name, source)
                os.close(fd)
                dst_parent = dst.parent(create=True)
                try:
                    self._check_target(dst_parent, dst.name, target, overwrite, "")
                    try:
                        if overwrite:
                            os.rename(
                                src.name, dst.name, src_dir_fd=src_parent, dst_dir_fd=dst_parent
                            )
                        else:
                            os.link(
                                src.name,
                                dst.name,
                                src_dir_fd=src_parent,
                                dst_dir_fd=dst_parent,
                                follow_symlinks=False,
                            )
                            os.unlink(src.name, dir_fd=src_parent)
                    except FileExistsError as exc:
                        raise file_exists(target) from exc
                    except IsADirectoryError as exc:
                        raise path_conflict(target, "the path is a directory") from exc
                    info = os.stat(dst.name, dir_fd=dst_parent, follow_symlinks=False)
                finally:
                    os.close(dst_parent)
            finally:
                os.close(src_parent)
            return _stat_of(target, info)

        return await asyncio.to_thread(move)

    async def list(
        self,
        workspace_id: str,
        prefix: str,
        delimiter: str,
        *,
        start_after: str,
        limit: int,
    ) -> list[Entry]:
        """Up to ``limit`` entries after ``start_after``, in byte order of their keys."""

        def listing() -> list[Entry]:
            base, _, tail = prefix.rpartition("/")
            try:
                parent = self._walk(workspace_id, base).directory()
            except NotFound:
                return []
            found: list[Entry] = []
            try:
                entries = _tree(parent, f"{base}/" if base else "", tail, delimiter, start_after)
                for entry in entries:
                    found.append(entry)
                    if len(found) >= limit:
                        break
            finally:
                os.close(parent)
            return found

        return await asyncio.to_thread(listing)


def _children(dir_fd: int, base: str) -> list[tuple[bytes, str, bool, os.stat_result | None]]:
    """A directory's directories and regular files with addressable names, in key order:
    (sort key, key, is directory, stat)."""
    out: list[tuple[bytes, str, bool, os.stat_result | None]] = []
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            key = base + entry.name
            if path_problem(key) is not None:
                continue  # a name no path can address (the agent's doing): not listed
            try:
                if entry.is_dir(follow_symlinks=False):
                    out.append(((key + "/").encode(), key + "/", True, None))
                elif entry.is_file(follow_symlinks=False):
                    out.append((key.encode(), key, False, entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
    out.sort(key=lambda item: item[0])
    return out


def _tree(dir_fd: int, base: str, tail: str, delimiter: str, start_after: str) -> Iterator[Entry]:
    """Entries under ``dir_fd`` (whose keys start with ``base``), their first level filtered
    by ``tail``. A depth-first walk over children sorted with ``/`` after directory names
    yields whole keys in byte order; subtrees entirely before ``start_after`` are skipped."""
    for _, key, is_dir, info in _children(dir_fd, base):
        if not key.removeprefix(base).startswith(tail):
            continue
        if not is_dir:
            if key > start_after:
                assert info is not None
                yield Entry(key, _stat_of(key, info))
            continue
        if delimiter == DELIMITER:
            if key > start_after:
                yield Entry(key)
            continue
        if key <= start_after and not start_after.startswith(key):
            continue
        try:
            child = os.open(key.removeprefix(base).rstrip("/"), _DIR, dir_fd=dir_fd)
        except OSError:
            continue
        try:
            yield from _tree(child, key, "", "", start_after)
        finally:
            os.close(child)
