"""An S3-compatible server on loopback for the S3 blob adapter's tests: moto's server mode.

moto (``moto[server]``) answers the S3 REST API as AWS does, with AWS's error codes and rules
(5 MiB parts, ``NoSuchUpload``, ``InvalidRange``, conditional copies), in a process of its own
on ``127.0.0.1`` and a free port. One server per test session; every test gets its own bucket,
emptied and removed afterwards. Under CI=true a server that cannot start fails the tests.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from corral.services.storage.blob_s3 import S3BlobStore, S3Config
from tests.conftest import _unavailable

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

START_SECONDS = 60.0
ACCESS_KEY = os.environ.get("CORRAL_TEST_S3_ACCESS_KEY", "corral-test")
SECRET_KEY = os.environ.get("CORRAL_TEST_S3_SECRET_KEY", "corral-test-secret")  # moto: any
_SESSION = get_session()  # one loader for every client the tests make (models load once)
_RUNNING = re.compile(rb"Running on (http://127\.0\.0\.1:\d+)")


def _start() -> tuple[subprocess.Popen[bytes], str]:
    """Start moto's server on a free port and wait (bounded) until it says where it listens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue[bytes] = queue.Queue()

    def pump() -> None:  # keeps the pipe drained for the server's whole life
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(b"")

    threading.Thread(target=pump, name="moto-output", daemon=True).start()
    deadline = time.monotonic() + START_SECONDS
    seen: list[bytes] = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if not line:
            break
        seen.append(line)
        if match := _RUNNING.search(line):
            return process, match.group(1).decode()
    _stop(process)
    raise RuntimeError(f"moto's S3 server did not start: {b''.join(seen)[-2000:]!r}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The URL of a session-wide S3 server (skipped without moto outside CI; failed in CI).
    CORRAL_TEST_S3_ENDPOINT points the tests at another S3-compatible server instead (MinIO,
    Ceph, ...; path-style, credentials from CORRAL_TEST_S3_ACCESS_KEY / _SECRET_KEY)."""
    if external := os.environ.get("CORRAL_TEST_S3_ENDPOINT"):
        yield external
        return
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        _unavailable("moto's S3 server (pip install 'moto[server]')", exc)
    try:
        process, endpoint = _start()
    except (OSError, RuntimeError) as exc:
        _unavailable("moto's S3 server", exc)
    try:
        yield endpoint
    finally:
        _stop(process)


def config_for(endpoint: str, bucket: str, **overrides: object) -> S3Config:
    fields: dict[str, object] = {
        "bucket": bucket,
        "endpoint_url": endpoint,
        "region": "us-east-1",
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
        "path_style": True,
        **overrides,
    }
    return S3Config(**fields)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def s3_bucket(endpoint: str, **overrides: object) -> AsyncIterator[S3Config]:
    """A new, empty bucket; emptied (objects and unfinished uploads) and removed afterwards."""
    config = config_for(endpoint, f"corral-{uuid.uuid4().hex[:16]}", **overrides)
    async with raw_client(config) as client:
        await client.create_bucket(Bucket=config.bucket)
        try:
            yield config
        finally:
            uploads = await client.list_multipart_uploads(Bucket=config.bucket)
            for upload in uploads.get("Uploads", []):
                await client.abort_multipart_upload(
                    Bucket=config.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
            async for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=config.bucket
            ):
                for item in page.get("Contents", []):
                    await client.delete_object(Bucket=config.bucket, Key=item["Key"])
            await client.delete_bucket(Bucket=config.bucket)


def raw_client(config: S3Config) -> contextlib.AbstractAsyncContextManager[S3Client]:
    """A plain client on the same server: what an operator's own S3 tools would see."""
    return _SESSION.create_client(
        "s3",
        region_name=config.region,
        endpoint_url=config.endpoint_url,
        aws_access_key_id=config.access_key_id,
        aws_secret_access_key=config.secret_access_key,
        config=AioConfig(s3={"addressing_style": "path"}),
    )


@contextlib.asynccontextmanager
async def s3_store(endpoint: str, **store_options: int) -> AsyncIterator[S3BlobStore]:
    """An S3 blob store on a fresh bucket: as the service connects one, or (with
    ``store_options``, the store's size limits) built on a client of its own."""
    async with s3_bucket(endpoint) as config:
        if not store_options:
            async with S3BlobStore.connect(config, session=_SESSION) as store:
                yield store
            return
        async with raw_client(config) as client:
            yield S3BlobStore(client, config.bucket, **store_options)
