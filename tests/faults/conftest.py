"""The fault scenarios share one production-like topology (tests/support/topology.py): its own
PostgreSQL and Redis, identity, two session replicas and a runtime with a pool of 8, each its
own process, Envoy in front (started with the package's first scenario, stopped after its last).
Every test starts from a topology that is whole again: whatever an earlier scenario left stopped
is started and waited for."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator

import pytest

from tests.faults.client import Client
from tests.support.topology import Topology, running_topology

POOL_SIZE = 8


@pytest.fixture(scope="package")
async def topology(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Topology]:
    folder = tmp_path_factory.mktemp("faults")
    async with running_topology(
        folder, session_replicas=2, runtime_replicas=1, pool_size=POOL_SIZE
    ) as running:
        yield running


FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed:
        item.stash[FAILED] = True
    return report


@pytest.fixture
async def client(topology: Topology, request: pytest.FixtureRequest) -> AsyncIterator[Client]:
    await topology.ensure_up()
    yield Client(topology)
    if request.node.stash.get(FAILED, False):
        print(f"the topology's logs (under {topology.logs}):\n{topology.tails()}")
