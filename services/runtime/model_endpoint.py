"""The model endpoint's reachability: checked every so often by an HTTP request to its base URL,
reported as a health service name of its own (:data:`SERVICE_NAME`) and a metric.

The runtime's own readiness never depends on it: a slow or unreachable model is a fact to see
and alert on, not a reason to take every runtime replica out of rotation (the turns would fail
the same way on any of them, and the ones that work would be refused too).
"""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable

log = logging.getLogger("corral.runtime.model")

SERVICE_NAME = "corral.runtime.v1.ModelEndpoint"
CHECK_SECONDS = 30.0
TIMEOUT_SECONDS = 5.0
DEFAULT_BASE_URL = "https://api.anthropic.com"

Listener = Callable[[bool], Awaitable[None]]


class ModelEndpoint:
    """``reachable`` is None until the first check, then whether the endpoint answered HTTP
    (any status below 500: a 401 or 404 still proves it is there) within the timeout."""

    def __init__(
        self,
        base_url: str,
        *,
        interval: float = CHECK_SECONDS,
        timeout: float = TIMEOUT_SECONDS,
        on_change: Listener | None = None,
    ) -> None:
        self.base_url = base_url or DEFAULT_BASE_URL
        self.interval = interval
        self.timeout = timeout
        self.reachable: bool | None = None
        self.on_change = on_change

    def _get(self) -> bool:
        request = urllib.request.Request(self.base_url, method="GET")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return int(response.status) < 500
        except urllib.error.HTTPError as exc:
            return exc.code < 500
        except (OSError, ValueError):
            return False

    async def check(self) -> bool:
        """One check now; tells the listener when the answer changed."""
        try:
            reachable = await asyncio.wait_for(asyncio.to_thread(self._get), self.timeout + 1)
        except TimeoutError:
            reachable = False
        if reachable != self.reachable:
            if self.reachable is not None or not reachable:
                level = logging.INFO if reachable else logging.WARNING
                log.log(
                    level,
                    "model endpoint %s",
                    "reachable" if reachable else "UNREACHABLE",
                    extra={"url": self.base_url},
                )
            self.reachable = reachable
            if self.on_change is not None:
                await self.on_change(reachable)
        return reachable

    async def run(self) -> None:
        """Check now and then every ``interval`` (the runtime's background job)."""
        while True:
            try:
                await self.check()
            except Exception:
                log.exception("model endpoint check failed")
            await asyncio.sleep(self.interval)
