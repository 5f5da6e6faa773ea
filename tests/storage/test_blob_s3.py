"""The S3 adapter's own promises, beyond the contract every blob store keeps
(``test_blob_contract.py`` runs that on S3 too): what it asks of the store, what an operator's
S3 tools see, how it fails. Against moto's S3 server on loopback (``s3_server.py``)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from corral.libs.config import Settings
from corral.libs.errors import Unavailable
from corral.services.storage.blob_s3 import S3BlobStore, S3Config
from corral.services.storage.blobs import S3_MIN_PART_SIZE, BlobTooLarge
from tests.storage.s3_server import config_for, raw_client, s3_bucket, s3_store

MiB = 1024 * 1024
BLOCK = os.urandom(MiB)


async def repeated(blocks: int, tail: bytes = b"") -> AsyncIterator[bytes]:
    for _ in range(blocks):
        yield BLOCK
    if tail:
        yield tail


def sha_of(blocks: int, tail: bytes = b"") -> str:
    digest = hashlib.sha256()
    for _ in range(blocks):
        digest.update(BLOCK)
    digest.update(tail)
    return digest.hexdigest()


async def read_all(store: S3BlobStore, key: str) -> bytes:
    return b"".join([block async for block in await store.get(key)])


def record_operations(store: S3BlobStore) -> list[str]:
    """The S3 operations the store's client sends from now on, in order."""
    sent: list[str] = []

    def before_call(model: Any, **_: Any) -> None:
        sent.append(model.name)

    store._client.meta.events.register("before-call.s3", before_call)
    return sent


async def test_a_large_put_is_a_multipart_upload_that_keeps_its_sha256(s3_endpoint: str) -> None:
    async with s3_store(s3_endpoint, part_size=S3_MIN_PART_SIZE) as store:
        sent = record_operations(store)
        info = await store.put("archives/w/a1", repeated(12, b"end"))
        assert (info.size, info.sha256) == (12 * MiB + 3, sha_of(12, b"end"))
        assert sent.count("UploadPart") == 3  # 5 + 5 + 2 MiB: parts sent as they filled
        assert "PutObject" not in sent
        stat = await store.stat("archives/w/a1")
        assert (stat.size, stat.sha256) == (info.size, info.sha256)
        assert [u async for u in store.list_multipart()] == []
        assert hashlib.sha256(await read_all(store, "archives/w/a1")).hexdigest() == info.sha256


async def test_what_an_operators_s3_tools_see(s3_endpoint: str) -> None:
    async with s3_bucket(s3_endpoint) as config, S3BlobStore.connect(config) as store:
        small = await store.put("reports/acme/r1", repeated(0, b"# Report\n"))
        async with raw_client(config) as client:
            listed = await client.list_objects_v2(Bucket=config.bucket)
            assert [item["Key"] for item in listed["Contents"]] == ["reports/acme/r1"]
            head = await client.head_object(Bucket=config.bucket, Key="reports/acme/r1")
            assert head["Metadata"] == {"sha256": small.sha256}
            body = await client.get_object(Bucket=config.bucket, Key="reports/acme/r1")
            assert await body["Body"].read() == b"# Report\n"


@pytest.mark.parametrize("failure", ["client went away", "too large"])
async def test_a_failed_large_put_leaves_no_upload_and_no_object(
    s3_endpoint: str, failure: str
) -> None:
    async with s3_store(s3_endpoint, part_size=S3_MIN_PART_SIZE) as store:
        sent = record_operations(store)

        async def broken() -> AsyncIterator[bytes]:
            async for block in repeated(11):
                yield block
            raise ConnectionError(failure)

        if failure == "too large":
            with pytest.raises(BlobTooLarge):
                await store.put("big", repeated(11), max_bytes=10 * MiB + 1)
        else:
            with pytest.raises(ConnectionError):
                await store.put("big", broken())
        assert sent.count("UploadPart") == 2  # the parts were sent, then taken back
        assert sent[-1] == "AbortMultipartUpload"
        assert [u async for u in store.list_multipart()] == []
        assert [info async for info in store.list()] == []


async def test_a_cancelled_put_aborts_its_upload(s3_endpoint: str) -> None:
    async with s3_store(s3_endpoint, part_size=S3_MIN_PART_SIZE) as store:
        sent = record_operations(store)
        forever = asyncio.Event()

        async def stalled() -> AsyncIterator[bytes]:
            async for block in repeated(6):
                yield block
            await forever.wait()
            yield b"never"

        task = asyncio.create_task(store.put("stalled", stalled()))
        for _ in range(500):  # bounded wait for the first part to be stored
            if sent.count("UploadPart") and not task.done():
                uploads = [u async for u in store.list_multipart()]
                if uploads:
                    break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the first part was never uploaded")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [u async for u in store.list_multipart()] == []
        assert "AbortMultipartUpload" in sent


async def test_memory_stays_at_a_part_while_a_large_object_moves(s3_endpoint: str) -> None:
    """64 MiB in and out with 5 MiB parts: this process grows by far less than the object."""
    async with s3_store(s3_endpoint, part_size=S3_MIN_PART_SIZE) as store:
        await store.put("warm-up", repeated(6))  # allocate the first buffers before measuring
        await read_all(store, "warm-up")
        before = _rss()
        samples = [before]
        info = await store.put("large", _sampling(repeated(64), samples))
        digest = hashlib.sha256()
        async for block in await store.get("large"):
            digest.update(block)
            samples.append(_rss())
        assert digest.hexdigest() == info.sha256 == sha_of(64)
        growth = max(samples) - before
        assert growth < 32 * MiB, f"grew by {growth / MiB:.1f} MiB"


async def test_copy_is_server_side(s3_endpoint: str) -> None:
    async with s3_store(s3_endpoint) as store:
        original = await store.put("src", repeated(2, b"!"))
        sent = record_operations(store)
        copied = await store.copy("src", "dst")
        assert sent == ["HeadObject", "CopyObject"]  # no byte passed through Corral
        assert (copied.size, copied.sha256) == (original.size, original.sha256)
        assert (await store.stat("dst")).sha256 == original.sha256


async def test_copy_past_the_single_copy_limit_goes_in_parts(s3_endpoint: str) -> None:
    async with s3_store(
        s3_endpoint, part_size=S3_MIN_PART_SIZE, max_copy_bytes=S3_MIN_PART_SIZE
    ) as store:
        original = await store.put("big", repeated(12, b"tail"))
        sent = record_operations(store)
        copied = await store.copy("big", "copy/big")
        assert sent.count("UploadPartCopy") == 3 and "GetObject" not in sent
        assert (copied.size, copied.sha256) == (original.size, original.sha256)
        assert (await store.stat("copy/big")).sha256 == original.sha256
        assert await read_all(store, "copy/big") == await read_all(store, "big")


async def test_an_object_another_tool_wrote_gets_its_sha256_on_copy(s3_endpoint: str) -> None:
    async with s3_bucket(s3_endpoint) as config, S3BlobStore.connect(config) as store:
        async with raw_client(config) as client:
            await client.put_object(Bucket=config.bucket, Key="foreign", Body=b"from elsewhere")
        assert (await store.stat("foreign")).sha256 is None
        copied = await store.copy("foreign", "mine")
        assert copied.sha256 == hashlib.sha256(b"from elsewhere").hexdigest()
        assert (await store.stat("mine")).sha256 == copied.sha256


async def test_completing_a_multipart_upload_learns_its_sha256(s3_endpoint: str) -> None:
    async with s3_store(s3_endpoint) as store:
        upload_id = await store.begin_multipart("uploads/u")
        first = await store.put_part("uploads/u", upload_id, 1, repeated(5))
        last = await store.put_part("uploads/u", upload_id, 2, repeated(1, b"x"))
        sent = record_operations(store)
        info = await store.complete_multipart("uploads/u", upload_id, [first, last])
        assert (info.size, info.sha256) == (6 * MiB + 1, sha_of(6, b"x"))
        # The parts' hashes cannot be joined: the object is read back once, then the sha256 kept.
        assert sent[-3:] == ["CompleteMultipartUpload", "GetObject", "CopyObject"]
        assert (await store.stat("uploads/u")).sha256 == info.sha256


async def test_a_wrong_key_cannot_abort_anothers_upload(s3_endpoint: str) -> None:
    async with s3_store(s3_endpoint) as store:
        upload_id = await store.begin_multipart("theirs")
        await store.abort_multipart("mine", upload_id)
        assert [(u.key, u.upload_id) async for u in store.list_multipart()] == [
            ("theirs", upload_id)
        ]
        await store.abort_multipart("theirs", upload_id)


async def test_an_unreachable_store_is_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the socket is closed
    async with get_session().create_client(
        "s3",
        region_name="us-east-1",
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id="x",
        aws_secret_access_key="y",
        config=AioConfig(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=2),
    ) as client:
        store = S3BlobStore(client, "bucket")
        calls: list[Callable[[], Any]] = [
            lambda: store.put("k", repeated(0, b"x")),
            lambda: store.get("k"),
            lambda: store.stat("k"),
            lambda: store.delete("k"),
            lambda: store.begin_multipart("k"),
        ]
        for call in calls:
            with pytest.raises(Unavailable) as raised:
                await call()
            assert raised.value.reason == "BLOB_STORE_UNAVAILABLE"
            assert raised.value.retry_after_seconds
        with pytest.raises(Unavailable):
            [info async for info in store.list()]


async def test_connect_refuses_a_bucket_that_is_not_there(s3_endpoint: str) -> None:
    with pytest.raises(RuntimeError, match="no-such-bucket"):
        async with S3BlobStore.connect(config_for(s3_endpoint, "no-such-bucket")):
            pass


def test_settings_make_the_config(tmp_path: Path) -> None:
    secret = tmp_path / "s3-secret"
    secret.write_text("from-a-file\n")
    settings = Settings(
        storage_blob="s3",
        storage_s3_endpoint_url="https://minio.internal:9000",
        storage_s3_bucket="corral",
        storage_s3_access_key_id="AKIA",
        storage_s3_secret_access_key_file=secret,
        storage_s3_path_style=True,
    )
    config = S3Config.from_settings(settings)
    assert (config.bucket, config.secret_access_key, config.path_style) == (
        "corral",
        "from-a-file",
        True,
    )
    assert "from-a-file" not in repr(config)
    with pytest.raises(ValueError, match="BUCKET"):
        S3Config.from_settings(Settings(storage_blob="s3"))
    with pytest.raises(ValueError, match="both"):
        S3Config(bucket="b", access_key_id="only-the-id")


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _sampling(chunks: AsyncIterator[bytes], samples: list[int]) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        samples.append(_rss())
        yield chunk
