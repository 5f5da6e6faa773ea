"""The blob store on S3-compatible object storage (AWS S3, MinIO, Ceph RGW, ...).

Each method of the port is one or a few S3 requests through ``aiobotocore``:

- ``put`` streams: bytes are gathered into parts of ``part_size`` and a multipart upload begins
  with the first full part, so memory holds one part, never the object. An object smaller than
  one part is a single ``PutObject``. A failed, cancelled or oversized put aborts its multipart
  upload: nothing becomes visible (S3 publishes an object only when it is complete).
- The sha256 (which S3 cannot compute for us: its multipart checksums are checksums of parts) is
  computed while the bytes pass and kept as the object's ``x-amz-meta-sha256``. A multipart
  object gets it by a server-side copy onto itself once it is complete, guarded by its ETag, so
  the metadata never describes other bytes. ``stat`` reports it; ``list`` (which S3 answers
  without metadata) does not.
- ``complete_multipart`` (the resumable uploads' parts, sent over many calls) reads the joined
  object back once to learn its sha256: SHA-256 states cannot be joined.
- ``get`` asks for the range with ``Range``; a missing key or a range past the end is known
  from the response's status before the caller gets the iterator.
- ``copy`` is ``CopyObject`` (``UploadPartCopy`` parts beyond S3's 5 GiB single-copy limit),
  guarded by the source's ETag.

Requests carry ``Content-MD5`` and no trailing CRC checksums (``when_required``): every
S3-compatible store verifies the former, not all of them speak the latter.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import math
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import BotoCoreError, ClientError

from corral.libs.errors import OUTAGE_RETRY_SECONDS, Aborted, Unavailable
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

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CopySourceTypeDef

    from corral.libs.config import Settings

DEFAULT_PART_SIZE = 8 * 1024 * 1024
MAX_COPY_BYTES = 5 * 1024**3  # S3's limit for one CopyObject
READ_CHUNK = 1024 * 1024
SHA256_META = "sha256"
_NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404"})
_NO_UPLOAD = frozenset({"NoSuchUpload"})
_BAD_PARTS = frozenset({"InvalidPart", "InvalidPartOrder", "EntityTooSmall"})
_CHANGED = frozenset({"PreconditionFailed", "412"})
_BUSY = frozenset({"SlowDown", "ServiceUnavailable", "RequestTimeout", "InternalError", "503"})


class BlobChanged(Aborted):
    """The object was replaced while a copy or a multipart completion was reading it."""

    default_reason = "BLOB_CHANGED"


@dataclass(frozen=True)
class S3Config:
    """Where the bucket is and how to reach it (``CORRAL_STORAGE_S3_*``)."""

    bucket: str
    endpoint_url: str = ""  # empty: AWS S3 in ``region``
    region: str = "us-east-1"
    access_key_id: str = ""  # empty (with the secret): botocore's chain (AWS_*, profile, role)
    secret_access_key: str = ""
    path_style: bool = False  # MinIO, Ceph and most self-hosted stores want path-style
    ca_file: Path | None = None  # a private CA for the endpoint's TLS certificate
    part_size: int = DEFAULT_PART_SIZE

    def __post_init__(self) -> None:
        if not self.bucket:
            raise ValueError("CORRAL_STORAGE_S3_BUCKET is required with CORRAL_STORAGE_BLOB=s3")
        if bool(self.access_key_id) != bool(self.secret_access_key):
            raise ValueError("set both the S3 access key id and its secret, or neither")
        if not S3_MIN_PART_SIZE <= self.part_size <= MAX_COPY_BYTES:
            raise ValueError(f"the S3 part size must be {S3_MIN_PART_SIZE}..{MAX_COPY_BYTES}")

    def __repr__(self) -> str:  # never print the secret
        return f"S3Config(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r})"

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Config:
        secret = settings.storage_s3_secret_access_key.get_secret_value()
        if not secret and settings.storage_s3_secret_access_key_file is not None:
            secret = settings.storage_s3_secret_access_key_file.read_text().strip()
        return cls(
            bucket=settings.storage_s3_bucket,
            endpoint_url=settings.storage_s3_endpoint_url,
            region=settings.storage_s3_region,
            access_key_id=settings.storage_s3_access_key_id,
            secret_access_key=secret,
            path_style=settings.storage_s3_path_style,
            ca_file=settings.storage_s3_ca_file,
            part_size=settings.storage_s3_part_size,
        )


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class _PastTheEnd(Exception):
    """S3's InvalidRange: the range starts at or past the end of the object."""


def _unavailable() -> Unavailable:
    return Unavailable(
        "the blob store is unavailable; retry",
        reason="BLOB_STORE_UNAVAILABLE",
        retry_after_seconds=OUTAGE_RETRY_SECONDS,
    )


@contextlib.contextmanager
def _translated(
    what: str, known: Mapping[frozenset[str], Exception] | None = None
) -> Iterator[None]:
    """Turn the client's errors into the port's: ``known`` maps S3 error codes to what they mean
    here; an unreachable or overloaded store is UNAVAILABLE; anything else is a fault (INTERNAL,
    logged by the kit), such as a missing bucket or refused credentials."""
    try:
        yield
    except ClientError as exc:
        code = _code(exc)
        for codes, error in (known or {}).items():
            if code in codes:
                raise error from exc
        if code in _BUSY or _status(exc) >= 500:
            raise _unavailable() from exc
        raise RuntimeError(f"S3 refused {what}: {code or _status(exc)}") from exc
    except (BotoCoreError, aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
        raise _unavailable() from exc


def _date(response: Mapping[str, Any]) -> datetime:
    """When the store wrote what ``response`` answers (S3 sends no Last-Modified on writes)."""
    header = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if header:
        with contextlib.suppress(TypeError, ValueError):
            return parsedate_to_datetime(header).astimezone(UTC)
    return datetime.now(UTC)


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


class S3BlobStore:
    """A :class:`~corral.services.storage.blobs.BlobStore` in one bucket."""

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        *,
        part_size: int = DEFAULT_PART_SIZE,
        min_part_size: int = S3_MIN_PART_SIZE,
        max_copy_bytes: int = MAX_COPY_BYTES,
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._part_size = max(part_size, min_part_size)
        self._min_part_size = min_part_size
        self._max_copy_bytes = max_copy_bytes

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, config: S3Config, *, session: AioSession | None = None
    ) -> AsyncIterator[S3BlobStore]:
        """A store on ``config``'s bucket for as long as the context lasts. Fails at once when
        the bucket cannot be reached or is not there (a deployment's mistake, not a caller's).
        Clients made from one ``session`` share its loaded service models."""
        client_config = AioConfig(
            s3={"addressing_style": "path" if config.path_style else "auto"},
            signature_version="s3v4",
            retries={"mode": "standard", "max_attempts": 4},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            max_pool_connections=32,
        )
        async with (session or get_session()).create_client(
            "s3",
            region_name=config.region,
            endpoint_url=config.endpoint_url or None,
            verify=str(config.ca_file) if config.ca_file else None,
            config=client_config,
            aws_access_key_id=config.access_key_id or None,
            aws_secret_access_key=config.secret_access_key or None,
        ) as client:
            try:
                await client.head_bucket(Bucket=config.bucket)
            except (ClientError, BotoCoreError, aiohttp.ClientError) as exc:
                raise RuntimeError(
                    f"cannot use S3 bucket {config.bucket!r} at "
                    f"{config.endpoint_url or 'AWS'}: {exc}"
                ) from exc
            yield cls(client, config.bucket, part_size=config.part_size)

    @property
    def min_part_size(self) -> int:
        return self._min_part_size

    # -- writing -------------------------------------------------------------------------------

    async def put(
        self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int | None = None
    ) -> BlobInfo:
        check_key(key)
        digest = hashlib.sha256()
        size = 0
        buffer = bytearray()
        upload_id = ""
        parts: list[PartInfo] = []
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise BlobTooLarge(f"more than {max_bytes} bytes")
                digest.update(chunk)
                buffer += chunk
                while len(buffer) >= self._part_size:
                    if not upload_id:
                        upload_id = await self.begin_multipart(key)
                    part = bytes(buffer[: self._part_size])
                    del buffer[: self._part_size]
                    parts.append(await self._upload_bytes(key, upload_id, len(parts) + 1, part))
            sha256 = digest.hexdigest()
            if not upload_id:
                return await self._put_small(key, bytes(buffer), sha256)
            if buffer:
                tail = bytes(buffer)
                buffer.clear()
                parts.append(await self._upload_bytes(key, upload_id, len(parts) + 1, tail))
            etag, modified = await self._complete(key, upload_id, parts)
        except BaseException:
            if upload_id:
                await self._abort_quietly(key, upload_id)
            raise
        await self._remember_sha256(key, etag, size, sha256)
        return BlobInfo(key, size, sha256, modified)

    async def _put_small(self, key: str, data: bytes, sha256: str) -> BlobInfo:
        with _translated(f"PutObject {key}"):
            response = await self._client.put_object(
                Bucket=self._bucket,
                Key=key,
                Body=data,
                ContentMD5=_md5(data),
                Metadata={SHA256_META: sha256},
            )
        return BlobInfo(key, len(data), sha256, _date(response))

    async def _upload_bytes(self, key: str, upload_id: str, number: int, data: bytes) -> PartInfo:
        return await self._upload_part(key, upload_id, number, data, len(data), _md5(data))

    async def _upload_part(
        self, key: str, upload_id: str, number: int, body: bytes | IO[bytes], size: int, md5: str
    ) -> PartInfo:
        with _translated(
            f"UploadPart {key}", {_NO_UPLOAD: MultipartNotFound(f"no multipart upload for {key!r}")}
        ):
            response = await self._client.upload_part(
                Bucket=self._bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
                ContentLength=size,
                ContentMD5=md5,
            )
        return PartInfo(number, size, response["ETag"])

    async def _complete(
        self, key: str, upload_id: str, parts: Sequence[PartInfo]
    ) -> tuple[str, datetime]:
        with _translated(
            f"CompleteMultipartUpload {key}",
            {
                _NO_UPLOAD: MultipartNotFound(f"no multipart upload {upload_id!r} for {key!r}"),
                _BAD_PARTS: InvalidParts("the store refused the parts (unknown, changed or small)"),
            },
        ):
            response = await self._client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={
                    "Parts": [{"PartNumber": p.number, "ETag": p.etag} for p in parts]
                },
            )
        return response["ETag"], _date(response)

    async def _abort_quietly(self, key: str, upload_id: str) -> None:
        # Shielded: a cancelled put must still take its parts away.
        with contextlib.suppress(Exception):
            await asyncio.shield(self.abort_multipart(key, upload_id))

    async def _remember_sha256(self, key: str, etag: str, size: int, sha256: str) -> None:
        """Keep ``sha256`` on the multipart object just written: a server-side copy onto
        itself, only while it is still the object with ``etag``. Best effort: without it
        ``stat`` reports no sha256 and a ``copy`` reads the object once."""
        with contextlib.suppress(BlobChanged, BlobNotFound, Unavailable):
            await self._server_copy(key, etag, size, key, sha256)

    # -- reading -------------------------------------------------------------------------------

    async def _head(self, key: str) -> tuple[BlobInfo, str]:
        check_key(key)
        with _translated(f"HeadObject {key}", {_NOT_FOUND: BlobNotFound(f"no blob {key!r}")}):
            head = await self._client.head_object(Bucket=self._bucket, Key=key)
        sha256 = head.get("Metadata", {}).get(SHA256_META) or None
        info = BlobInfo(key, head["ContentLength"], sha256, head["LastModified"])
        return info, head["ETag"]

    async def get(
        self, key: str, *, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        check_key(key)
        if length == 0:
            info, _ = await self._head(key)
            if offset > info.size:
                raise BlobRangeError(f"offset {offset} is past the end ({info.size} bytes)")
            return _empty()
        request: dict[str, Any] = {"Bucket": self._bucket, "Key": key}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            request["Range"] = f"bytes={offset}-{end}"
        try:
            with _translated(
                f"GetObject {key}",
                {
                    _NOT_FOUND: BlobNotFound(f"no blob {key!r}"),
                    frozenset({"InvalidRange", "416"}): _PastTheEnd(),
                },
            ):
                response = await self._client.get_object(**request)
        except _PastTheEnd:
            # Past the end, or exactly at it (which S3 refuses and the port allows).
            info, _ = await self._head(key)
            if offset > info.size:
                raise BlobRangeError(
                    f"offset {offset} is past the end ({info.size} bytes)"
                ) from None
            return _empty()
        return _stream(response["Body"])

    async def stat(self, key: str) -> BlobInfo:
        info, _ = await self._head(key)
        return info

    async def delete(self, key: str) -> bool:
        try:
            await self._head(key)
        except BlobNotFound:
            return False
        with _translated(f"DeleteObject {key}"):
            await self._client.delete_object(Bucket=self._bucket, Key=key)
        return True

    async def list(self, prefix: str = "", *, start_after: str = "") -> AsyncIterator[BlobInfo]:
        check_prefix(prefix)
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self._bucket, Prefix=prefix, StartAfter=start_after)
        with _translated(f"ListObjectsV2 {prefix}"):
            async for page in pages:
                for item in page.get("Contents", []):
                    yield BlobInfo(item["Key"], item["Size"], None, item["LastModified"])

    async def copy(self, source: str, destination: str) -> BlobInfo:
        check_key(destination)
        info, etag = await self._head(source)
        sha256 = info.sha256 or await self._sha256_of(source, etag)
        modified = await self._server_copy(source, etag, info.size, destination, sha256)
        return BlobInfo(destination, info.size, sha256, modified)

    async def _server_copy(
        self, source: str, etag: str, size: int, destination: str, sha256: str
    ) -> datetime:
        """Copy ``source`` (while it is the object with ``etag``) to ``destination`` with
        ``sha256`` as its metadata, inside the store: one ``CopyObject`` up to S3's 5 GiB
        limit, ``UploadPartCopy`` parts beyond. ``destination`` may be ``source``."""
        refused = {
            _CHANGED: BlobChanged(f"{source!r} changed while it was copied"),
            **_source_gone(source),
        }
        copy_source: CopySourceTypeDef = {"Bucket": self._bucket, "Key": source}
        if size <= self._max_copy_bytes:
            with _translated(f"CopyObject {source}", refused):
                response = await self._client.copy_object(
                    Bucket=self._bucket,
                    Key=destination,
                    CopySource=copy_source,
                    CopySourceIfMatch=etag,
                    Metadata={SHA256_META: sha256},
                    MetadataDirective="REPLACE",
                )
            copied = response.get("CopyObjectResult", {}).get("LastModified")
            return copied or _date(response)
        with _translated(f"CreateMultipartUpload {destination}"):
            created = await self._client.create_multipart_upload(
                Bucket=self._bucket, Key=destination, Metadata={SHA256_META: sha256}
            )
        upload_id = created["UploadId"]
        part_size = max(self._part_size, math.ceil(size / MAX_PARTS))
        parts: list[PartInfo] = []
        try:
            for number, start in enumerate(range(0, size, part_size), start=1):
                end = min(size, start + part_size) - 1
                with _translated(f"UploadPartCopy {source}", refused):
                    copied_part = await self._client.upload_part_copy(
                        Bucket=self._bucket,
                        Key=destination,
                        UploadId=upload_id,
                        PartNumber=number,
                        CopySource=copy_source,
                        CopySourceIfMatch=etag,
                        CopySourceRange=f"bytes={start}-{end}",
                    )
                etag_of_part = copied_part["CopyPartResult"]["ETag"]
                parts.append(PartInfo(number, end + 1 - start, etag_of_part))
            _, modified = await self._complete(destination, upload_id, parts)
        except BaseException:
            await self._abort_quietly(destination, upload_id)
            raise
        return modified

    async def _sha256_of(self, key: str, etag: str) -> str:
        """Read the object (still the one with ``etag``) once to learn its sha256."""
        with _translated(
            f"GetObject {key}",
            {
                **_source_gone(key),
                _CHANGED: BlobChanged(f"{key!r} changed while it was read"),
            },
        ):
            response = await self._client.get_object(Bucket=self._bucket, Key=key, IfMatch=etag)
        digest = hashlib.sha256()
        async for block in _stream(response["Body"]):
            digest.update(block)
        return digest.hexdigest()

    # -- multipart -----------------------------------------------------------------------------

    async def begin_multipart(self, key: str) -> str:
        check_key(key)
        with _translated(f"CreateMultipartUpload {key}"):
            created = await self._client.create_multipart_upload(Bucket=self._bucket, Key=key)
        return created["UploadId"]

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
        await self._require_upload(key, upload_id)
        # One part's bytes in memory, more on disk: S3 needs a part's length before its body.
        with tempfile.SpooledTemporaryFile(max_size=self._part_size) as spool:
            md5 = hashlib.md5(usedforsecurity=False)
            size = 0
            async for chunk in chunks:
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise BlobTooLarge(f"more than {max_bytes} bytes")
                md5.update(chunk)
                await asyncio.to_thread(spool.write, chunk)
            await asyncio.to_thread(spool.seek, 0)
            return await self._upload_part(
                key, upload_id, number, spool, size, base64.b64encode(md5.digest()).decode()
            )

    async def complete_multipart(
        self, key: str, upload_id: str, parts: Sequence[PartInfo]
    ) -> BlobInfo:
        check_key(key)
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
        await self._require_upload(key, upload_id)
        etag, modified = await self._complete(key, upload_id, parts)
        sha256 = await self._sha256_of(key, etag)
        size = sum(part.size for part in parts)
        await self._remember_sha256(key, etag, size, sha256)
        return BlobInfo(key, size, sha256, modified)

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            await self._require_upload(key, upload_id)
        except MultipartNotFound:
            return
        with (
            contextlib.suppress(MultipartNotFound),
            _translated(f"AbortMultipartUpload {key}", {_NO_UPLOAD: MultipartNotFound(upload_id)}),
        ):
            await self._client.abort_multipart_upload(
                Bucket=self._bucket, Key=key, UploadId=upload_id
            )

    async def _require_upload(self, key: str, upload_id: str) -> None:
        """Raise ``MultipartNotFound`` unless ``upload_id`` is an unfinished upload of ``key``.
        S3 checks this itself, but not every compatible store does (moto neither ties an
        upload id to its key nor answers NoSuchUpload to a part sent after completion), and a
        wrong key must never reach, let alone abort, another key's upload."""
        check_key(key)
        async for upload in self.list_multipart(key):
            if upload.key == key and upload.upload_id == upload_id:
                return
        raise MultipartNotFound(f"no multipart upload {upload_id!r} for {key!r}")

    async def list_multipart(self, prefix: str = "") -> AsyncIterator[MultipartUpload]:
        check_prefix(prefix)
        paginator = self._client.get_paginator("list_multipart_uploads")
        with _translated(f"ListMultipartUploads {prefix}"):
            async for page in paginator.paginate(Bucket=self._bucket, Prefix=prefix):
                for upload in page.get("Uploads", []):
                    yield MultipartUpload(upload["Key"], upload["UploadId"], upload["Initiated"])


def _source_gone(key: str) -> dict[frozenset[str], Exception]:
    return {_NOT_FOUND: BlobNotFound(f"no blob {key!r}")}


async def _empty() -> AsyncIterator[bytes]:
    return
    yield  # pragma: no cover - makes this an async generator


async def _stream(body: Any) -> AsyncIterator[bytes]:
    """The response body in blocks, closed however the reader stops (a body never started is
    released when it is collected)."""
    try:
        with _translated("reading an object"):
            while block := await body.read(READ_CHUNK):
                yield block
    finally:
        body.close()
