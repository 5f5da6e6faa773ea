"""The blob-store adapters the contract suite runs against, by name.

Each factory builds a fresh, empty store for one test; add an adapter by adding a factory
(and, if it needs a server, a fixture that starts it) and its name to ``ADAPTERS``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from corral.services.storage.blob_local import LocalBlobStore
from corral.services.storage.blobs import BlobStore
from tests.storage.s3_server import s3_store


@asynccontextmanager
async def local_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    yield LocalBlobStore(tmp_path / "blobs")


@asynccontextmanager
async def s3_bucket_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[BlobStore]:
    async with s3_store(request.getfixturevalue("s3_endpoint")) as store:
        yield store


FACTORIES = {"local": local_store, "s3": s3_bucket_store}
ADAPTERS = list(FACTORIES)
