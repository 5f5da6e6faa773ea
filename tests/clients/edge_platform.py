"""The running platform (tests/support/platform.py) with the real edge in front, as `make run`
has it: Envoy on a free port (what :8080 is under `make run`), the transcoder, jwt_authn against
identity's JWKS. Clients in tests/clients and the README's examples in tests/e2e go through it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.libs.envoy import Envoy, start_edge
from tests.support.platform import ADMIN, Platform, running_platform


@dataclass
class Edged:
    platform: Platform
    envoy: Envoy

    @property
    def target(self) -> str:
        """host:port of the edge (where README examples say 127.0.0.1:8080)."""
        return self.envoy.url.removeprefix("http://")

    @property
    def url(self) -> str:
        return self.envoy.url

    @property
    def admin(self) -> tuple[str, str]:
        return ADMIN


@contextlib.asynccontextmanager
async def platform_behind_edge(data_dir: Path, **overrides: Any) -> AsyncIterator[Edged]:
    async with running_platform(data_dir, edge_port=0, **overrides) as platform:
        envoy = await start_edge(platform.settings, list(platform.apps.values()))
        try:
            yield Edged(platform, envoy)
        finally:
            await envoy.stop()
