"""A service's own access token, for calls it makes as itself (usage ledger, audit log).

Obtained by exchanging the service account's API key with identity and reused until shortly
before it expires. Callers pass the exchange as a function, so this stays transport-free.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

Exchange = Callable[[], Awaitable[tuple[str, float]]]  # -> (access token, expiry epoch seconds)


class CachedToken:
    def __init__(
        self,
        exchange: Exchange,
        *,
        margin_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._exchange = exchange
        self._margin = margin_seconds
        self._clock = clock
        self._token = ""
        self._expires = 0.0
        self._lock = asyncio.Lock()

    async def get(self) -> str:
        if self._token and self._clock() < self._expires - self._margin:
            return self._token
        async with self._lock:
            if not self._token or self._clock() >= self._expires - self._margin:
                self._token, self._expires = await self._exchange()
        return self._token
