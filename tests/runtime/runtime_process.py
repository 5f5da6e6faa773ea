"""One agent runtime (the real SDK and CLI, the offline model) as a process of its own, for the
tests that kill it: ``python -m tests.runtime.runtime_process``. Settings come from the
environment (``CORRAL_*``), the JWKS to trust from ``TEST_JWKS``; it prints its address once
it serves, and stops gracefully on SIGTERM, like ``corral serve runtime``."""

from __future__ import annotations

import asyncio
import json
import os

from corral.libs.app import run_until_signalled
from corral.libs.auth import StaticJwksSource
from corral.libs.config import Settings
from corral.services.runtime.main import build


async def main() -> None:
    settings = Settings()
    jwks = StaticJwksSource(json.loads(os.environ["TEST_JWKS"]))
    app = await build(settings, port=0, jwks_source=jwks)

    async def started() -> None:
        print(app.server.address, flush=True)

    await run_until_signalled([app], settings.shutdown_grace_seconds, on_started=started)


if __name__ == "__main__":
    asyncio.run(main())
