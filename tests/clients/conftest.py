"""Fixtures of the client tests: the platform behind the real edge (edge_platform.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.clients.edge_platform import Edged, platform_behind_edge


@pytest.fixture(scope="module")
async def edged(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Edged]:
    async with platform_behind_edge(tmp_path_factory.mktemp("edged")) as running:
        yield running
