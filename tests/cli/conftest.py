"""The `corral` command as people and scripts run it: a subprocess against the running platform
(tests/support/platform.py: identity, runtime and session on free ports, the real SDK and CLI
against the offline model), signed in as its bootstrap admin."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.platform import ADMIN, Platform, running_platform


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


def cli_env(platform: Platform, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "CORRAL_SESSION_TARGET": platform.settings.target_for("session"),
        "CORRAL_IDENTITY_TARGET": platform.settings.target_for("identity"),
        "CORRAL_DATA_DIR": str(platform.settings.data_dir),
        "CORRAL_EMAIL": ADMIN[0],
        "CORRAL_PASSWORD": ADMIN[1],
        **extra,
    }
    env.pop("NO_COLOR", None)
    return env


async def corral(
    platform: Platform,
    *args: str,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
    limit: float = 90,
) -> Ran:
    """Run `corral ARGS...`; ``stdin=None`` gives it no standard input at all (/dev/null)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "corral.services.cli",
        *args,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**cli_env(platform), **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), limit)
    except TimeoutError as exc:
        process.kill()
        out, err = await process.communicate()
        hung = f"corral {' '.join(args)} hung:\n{out.decode()}\n{err.decode()}"
        raise AssertionError(hung) from exc
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


@pytest.fixture(scope="module")
async def platform(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Platform]:
    data: Path = tmp_path_factory.mktemp("cli")
    async with running_platform(data) as running:
        yield running
