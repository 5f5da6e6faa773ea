"""Shared fixtures: real PostgreSQL and Redis when present, signing keys, servers on port 0.

PostgreSQL and Redis are found through CORRAL_TEST_POSTGRES_URL and CORRAL_TEST_REDIS_URL
(localhost defaults). Outside CI a missing server skips the tests that need it; under CI=true
it fails them, so a green CI run always exercised both.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from corral.libs import db
from tests.support.keys import SigningKey

# The offline model's turns cost nothing by default (its costs are invented); the suite charges
# Claude's list prices so budgets, quotas and cost metrics have something to measure. Tests of
# the default pass offline_model_pricing="free" themselves.
os.environ.setdefault("CORRAL_OFFLINE_MODEL_PRICING", "list")

POSTGRES_URL = os.environ.get(
    "CORRAL_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("CORRAL_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _unavailable(what: str, exc: BaseException) -> None:
    message = f"{what} is not reachable ({exc!r})"
    if IN_CI:
        pytest.fail(f"{message}; under CI=true this is a failure, not a skip", pytrace=False)
    pytest.skip(message)


async def _reachable(probe: Callable[[], Awaitable[object]]) -> BaseException | None:
    try:
        await asyncio.wait_for(probe(), 5)
    except Exception as exc:
        return exc
    return None


async def require_postgres() -> str:
    engine = db.create_engine(POSTGRES_URL)
    try:
        error = await _reachable(lambda: db.ping(engine))
    finally:
        await engine.dispose()
    if error is not None:
        _unavailable(f"PostgreSQL at {POSTGRES_URL}", error)
    return POSTGRES_URL


async def require_redis() -> str:
    from corral.libs.redis import create_redis

    client = create_redis(REDIS_URL)
    try:
        error = await _reachable(client.ping)
    finally:
        await client.aclose()
    if error is not None:
        _unavailable(f"Redis at {REDIS_URL}", error)
    return REDIS_URL


@pytest.fixture
async def postgres_url() -> str:
    return await require_postgres()


@pytest.fixture
async def redis_url() -> str:
    return await require_redis()


async def _drop_schema(url: str, schema: str) -> None:
    engine = db.create_engine(url)
    async with engine.begin() as connection:
        await connection.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    await engine.dispose()


@pytest.fixture
async def pg_schema(postgres_url: str) -> AsyncIterator[str]:
    """A fresh PostgreSQL schema name, dropped after the test."""
    schema = f"test_{uuid.uuid4().hex[:12]}"
    yield schema
    await _drop_schema(postgres_url, schema)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database_url(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[str, str]]:
    """(url, schema) for each backend: the same contract suite runs on SQLite and PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/test.db", "test"
        return
    url = await require_postgres()
    schema = f"test_{uuid.uuid4().hex[:12]}"
    yield url, schema
    await _drop_schema(url, schema)


@pytest.fixture(scope="session")
def signing_key() -> SigningKey:
    return SigningKey.generate()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With pytest-xdist (`make pytest` runs two workers): a file's tests stay on one worker
    (its module fixtures start once), and the fault scenarios share one worker and topology."""
    for item in items:
        path = item.nodeid.split("::")[0]
        group = "tests/faults" if path.startswith("tests/faults/") else path
        item.add_marker(pytest.mark.xdist_group(group))


STARTED = time.time()  # this run's start: the root conftest loads first, in every process


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault scenarios' times to recovery, once, from the process that reports: what this
    process measured, or (the xdist controller) what a worker wrote in this run."""
    from tests.faults.record import ARTIFACT, MEASURED

    measured = MEASURED
    if not measured and ARTIFACT.exists() and ARTIFACT.stat().st_mtime >= STARTED:
        measured = json.loads(ARTIFACT.read_text())
    if measured:
        terminalreporter.section("faults: time to recovery (seconds)")
        for scenario, measures in sorted(measured.items()):
            terminalreporter.write_line(f"{scenario}: {json.dumps(measures, sort_keys=True)}")
        terminalreporter.write_line(f"(written to {ARTIFACT})")
