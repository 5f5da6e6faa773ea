"""Fixtures of the end-to-end suite: the running platform (tests/support/platform.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.platform import Platform, directive, running_platform

__all__ = ["Platform", "directive"]


@pytest.fixture
async def platform(tmp_path: Path) -> AsyncIterator[Platform]:
    async with running_platform(tmp_path) as running:
        yield running
