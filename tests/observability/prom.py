"""Debian's real `prometheus`, run by a test: its own config and storage under a temporary
folder, a 1 s scrape interval, listening on a loopback port of its own; queried over its HTTP
API. Under CI=true a missing binary fails the test, elsewhere it skips."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        message = f"{binary} is not installed (Debian: apt-get install prometheus)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


class Prometheus:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log

    def _get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)

    async def api(self, path: str, **params: str) -> Any:
        return await asyncio.to_thread(self._get, path, **params)

    async def value(self, query: str) -> float:
        """The instant query's value summed over its series (0 when there are none)."""
        reply = await self.api("/api/v1/query", query=query)
        assert reply["status"] == "success", reply
        return sum(float(item["value"][1]) for item in reply["data"]["result"])

    async def targets_up(self) -> list[dict[str, Any]]:
        reply = await self.api("/api/v1/targets")
        return [t for t in reply["data"]["activeTargets"] if t["health"] == "up"]


def _free_port() -> int:
    # Prometheus cannot report a port it picked itself; this one is free a moment ago.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def running_prometheus(folder: Path, targets: Sequence[str]) -> AsyncIterator[Prometheus]:
    binary = require("prometheus")
    config, log = _write_config(folder, targets)
    for attempt in range(3):
        port = _free_port()
        process = _spawn(binary, config, folder, port, log)
        prometheus = Prometheus(process, port, log)
        try:
            await _until_ready(prometheus)
            break
        except Exception:
            process.terminate()
            process.wait(10)
            if attempt == 2 or "address already in use" not in _tail(log):
                raise
    try:
        yield prometheus
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _until_ready(prometheus: Prometheus) -> None:
    async with asyncio.timeout(30):
        while True:
            if prometheus.process.poll() is not None:
                raise AssertionError("prometheus exited:\n" + _tail(prometheus.log))
            with contextlib.suppress(OSError):
                if await asyncio.to_thread(_ready, prometheus.port):
                    return
            await asyncio.sleep(0.1)  # polling an external process, bounded by the timeout


def _write_config(folder: Path, targets: Sequence[str]) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n"
        "scrape_configs:\n  - job_name: corral\n    static_configs:\n"
        f"      - targets: {json.dumps(list(targets))}\n"
    )
    return config, folder / "prometheus.log"


def _spawn(
    binary: str, config: Path, folder: Path, port: int, log: Path
) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        return subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def _ready(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as response:
        return bool(response.status == 200)


def family_names(exposition: str) -> set[str]:
    """The metric family names in a Prometheus text exposition (``# TYPE`` lines)."""
    return set(re.findall(r"^# TYPE (\S+) ", exposition, flags=re.M))
