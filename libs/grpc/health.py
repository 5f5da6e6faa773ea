"""Readiness: ``grpc.health.v1`` status per service, following the health of its dependencies."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

log = logging.getLogger("corral.health")


@dataclass(frozen=True)
class DependencyCheck:
    """A named probe (``SELECT 1``, ``PING``, ...) that raises when the dependency is down."""

    name: str
    probe: Callable[[], Awaitable[object]]
    timeout: float = 2.0

    async def healthy(self) -> bool:
        try:
            await asyncio.wait_for(self.probe(), self.timeout)
        except Exception as exc:
            log.warning("dependency unhealthy", extra={"dependency": self.name, "error": repr(exc)})
            return False
        return True


class Readiness:
    """Keeps every registered service's health status in step with its dependency checks."""

    def __init__(
        self,
        servicer: HealthServicer,
        service_names: Sequence[str],
        checks: Sequence[DependencyCheck],
        interval: float,
    ) -> None:
        self._servicer = servicer
        self._names = ["", *service_names]
        self._checks = list(checks)
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.serving: bool | None = None

    async def refresh(self) -> bool:
        results = await asyncio.gather(*(check.healthy() for check in self._checks))
        serving = all(results)
        if serving != self.serving:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in self._names:
                await self._servicer.set(name, status)
            if self.serving is not None:
                log.warning("readiness changed", extra={"serving": serving})
            self.serving = serving
        return serving

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.refresh()

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="readiness")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
