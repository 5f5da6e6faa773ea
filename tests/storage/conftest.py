"""Fixtures for the storage tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.services.storage.blobs import BlobStore
from tests.storage.blob_stores import ADAPTERS, FACTORIES
from tests.storage.s3_server import s3_endpoint  # noqa: F401 - the S3 adapter's server
from tests.storage.stack import any_stack, stack  # noqa: F401 - the service on port 0


@pytest.fixture(params=ADAPTERS)
async def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    """A fresh, empty store of each adapter: the contract suite runs once per adapter."""
    async with FACTORIES[request.param](request, tmp_path) as store:
        yield store
