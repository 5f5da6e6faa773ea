"""The blob-store port: where storage keeps the bytes that are not a workspace's files.

Reports, archives and the parts of resumable uploads live here. Two adapters implement it: the
local filesystem (``blob_local.py``, the embedded default) and S3-compatible object storage.
The port is shaped after what S3 can do, so an S3 adapter maps each method to one or a few
requests:

- ``put`` streams an object from an async byte iterator; the adapter computes size and sha256
  while the bytes pass (an S3 adapter uploads parts as they fill), and an object appears whole
  or not at all: a reader never sees half of it, a failed or oversized put leaves nothing.
- ``get`` returns an async iterator over a byte range. It is a coroutine that checks the key and
  the range *before* returning, so a caller can answer NOT_FOUND or a bad range before it has
  sent a single byte.
- Resumable uploads use multipart uploads: ``begin_multipart`` -> ``put_part`` (numbered from
  1; every part but the last at least ``min_part_size`` bytes, as S3 demands) ->
  ``complete_multipart`` (the parts, in order, become one object) or ``abort_multipart``.
  ``list_multipart`` finds abandoned ones for the sweeper.
- Objects are immutable once written: ``put`` to an existing key replaces it atomically.

Keys are the service's own (``reports/acme/r1``), never a user's path: ``check_key`` rejects
anything that is not a plain relative key. Adapters raise the categories of
:mod:`corral.libs.errors` (``BlobNotFound``, ``BlobTooLarge``, ...), never their client's
exceptions.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from corral.libs.errors import FailedPrecondition, InvalidArgument, NotFound

S3_MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PARTS = 10_000
MAX_KEY_BYTES = 1024
_SEGMENT = re.compile(r"[A-Za-z0-9._=+@,-]+")


class BlobNotFound(NotFound):
    default_reason = "BLOB_NOT_FOUND"


class MultipartNotFound(NotFound):
    """The multipart upload was completed, aborted or never begun."""

    default_reason = "MULTIPART_UPLOAD_NOT_FOUND"


class BlobTooLarge(FailedPrecondition):
    """A put or part carried more than the ``max_bytes`` the caller allowed; nothing was kept."""

    default_reason = "BLOB_TOO_LARGE"


class BlobRangeError(FailedPrecondition):
    """A read started past the end of the object."""

    default_reason = "RANGE_NOT_SATISFIABLE"


class InvalidParts(InvalidArgument):
    """``complete_multipart`` got parts out of order, unknown, or too small (all but the last)."""

    default_reason = "INVALID_MULTIPART_PARTS"


@dataclass(frozen=True)
class BlobInfo:
    """An object. ``sha256`` (hex) is always known after ``put``/``copy``/``complete``; ``stat`` and
    ``list`` report it when the store kept it (``None`` otherwise)."""

    key: str
    size: int
    sha256: str | None
    modified: datetime


@dataclass(frozen=True)
class PartInfo:
    """One uploaded part: what ``complete_multipart`` needs back (``etag`` is the store's token)."""

    number: int
    size: int
    etag: str


@dataclass(frozen=True)
class MultipartUpload:
    key: str
    upload_id: str
    initiated: datetime


def check_key(key: str) -> str:
    """A key is ``/``-separated segments of ``[A-Za-z0-9._=+@,-]``, none of them ``.`` or ``..``,
    at most 1024 bytes. Raises ValueError: keys come from the service, so a bad one is a bug."""
    if not key or len(key.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"blob key must be 1..{MAX_KEY_BYTES} bytes: {key!r}")
    for segment in key.split("/"):
        if segment in {".", ".."} or not _SEGMENT.fullmatch(segment):
            raise ValueError(f"blob key has an invalid segment {segment!r}: {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key, optionally ending in ``/``."""
    if prefix:
        check_key(prefix.removesuffix("/"))
    return prefix


@runtime_checkable
class BlobStore(Protocol):
    """The port. Every method is safe to call from many tasks and many replicas at once."""

    @property
    def min_part_size(self) -> int:
        """The least size of every part but the last (S3: 5 MiB)."""
        ...

    async def put(
        self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int | None = None
    ) -> BlobInfo:
        """Store ``chunks`` as ``key`` (replacing any object there), atomically. Raises
        ``BlobTooLarge`` (and keeps nothing) once more than ``max_bytes`` arrive. If ``chunks``
        raises, nothing is kept and the exception propagates."""
        ...

    async def get(
        self, key: str, *, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        """The bytes ``[offset, offset + length)`` (to the end when ``length`` is None), clipped
        at the end of the object. Raises ``BlobNotFound``, or ``BlobRangeError`` when ``offset``
        is past the end (``offset == size`` yields nothing), before returning the iterator."""
        ...

    async def stat(self, key: str) -> BlobInfo:
        """Raises ``BlobNotFound``."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove ``key``; False if there was none (deleting is idempotent)."""
        ...

    def list(self, prefix: str = "", *, start_after: str = "") -> AsyncIterator[BlobInfo]:
        """Every object whose key starts with ``prefix`` (a plain string prefix, not a
        directory), in key order, after ``start_after``. Unfinished multipart uploads are not
        objects."""
        ...

    async def copy(self, source: str, destination: str) -> BlobInfo:
        """Copy an object (server-side where the store can). Raises ``BlobNotFound``."""
        ...

    async def begin_multipart(self, key: str) -> str:
        """Start a multipart upload that will become ``key``; returns its upload id."""
        ...

    async def put_part(
        self,
        key: str,
        upload_id: str,
        number: int,
        chunks: AsyncIterable[bytes],
        *,
        max_bytes: int | None = None,
    ) -> PartInfo:
        """Upload part ``number`` (1..10000), replacing an earlier upload of the same number.
        Raises ``MultipartNotFound`` or ``BlobTooLarge``."""
        ...

    async def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[PartInfo]
    ) -> BlobInfo:
        """Join ``parts`` (ascending numbers, each as ``put_part`` returned it) into ``key``.
        Raises ``MultipartNotFound`` or ``InvalidParts``; the upload is gone afterwards."""
        ...

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """Discard the upload and its parts; aborting twice (or an unknown id) is not an error."""
        ...

    def list_multipart(self, prefix: str = "") -> AsyncIterator[MultipartUpload]:
        """Unfinished multipart uploads whose key starts with ``prefix``."""
        ...
