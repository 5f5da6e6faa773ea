"""Backing stores of a test's own, to stop and start at will: a PostgreSQL cluster and a
``redis-server`` on free ports, never the machine's (the cluster is tests/support/topology.py's).

The outage tests (tests/libs, tests/session, tests/identity) use these and print how long a
service took to answer again once its store was back."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from tests.support.grpc_tools import free_port
from tests.support.topology import PostgresCluster, require_binary

RECOVERY_SECONDS = 60.0


class OwnRedis:
    """A redis-server of the test's, without persistence (a restart starts it empty); stopped
    and started by its own pid only."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.argv = [
            require_binary("redis-server", "apt-get install redis-server"),
            *("--port", str(self.port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", str(folder)),
        ]
        self.log = folder / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        setpriv = shutil.which("setpriv")  # it dies with the test run, whatever happens
        argv = [setpriv, "--pdeathsig", "KILL", "--", *self.argv] if setpriv else self.argv
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT
            )

    async def ready(self) -> None:
        deadline = time.monotonic() + RECOVERY_SECONDS
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if time.monotonic() > deadline or self.process is None:
                    raise
                await asyncio.sleep(0.02)
                continue
            writer.close()
            return

    async def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(self.process.wait, 30)
        self.process = None


@asynccontextmanager
async def own_postgres(folder: Path) -> AsyncIterator[PostgresCluster]:
    cluster = PostgresCluster(folder)
    try:
        await cluster.init()
        await cluster.start()
        yield cluster
    finally:
        if cluster.pid is not None:
            await cluster.stop("immediate")
        cluster.remove()


@asynccontextmanager
async def own_redis(folder: Path) -> AsyncIterator[OwnRedis]:
    server = OwnRedis(folder)
    server.start()
    try:
        await server.ready()
        yield server
    finally:
        await server.stop()
