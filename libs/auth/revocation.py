"""Revocation everywhere in seconds: a feed identity writes and every service's verifier reads.

An access token lives 15 minutes; without this, a disabled user or a revoked API key keeps
working on every service but identity until its tokens expire. Identity publishes a
:class:`Revocation` ("tokens of this subject / organization / sign-in / API key / signing key
issued at or before T are void") to a :class:`RevocationStore`; each service's
:class:`RevocationList` re-reads the store at most every ``refresh_seconds`` (1 s by default) and
refuses such tokens with ``UNAUTHENTICATED`` / ``TOKEN_REVOKED``.

- The store is one Redis hash shared by every replica (``RedisRevocations``), or a
  process-local one (``LOCAL``) when no Redis is configured: development runs every service in
  one process, so they share it.
- Entries are kept for the longest token lifetime and then pruned: a token older than that has
  expired anyway.
- If the store cannot be read, the last snapshot stays in force (and the failure is logged):
  the feed narrows the window of a revoked token; it never locks everyone out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from corral.libs.errors import Unauthenticated

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from corral.libs.auth.caller import Caller

log = logging.getLogger("corral.auth.revocation")

# Longer than any access token lives (identity issues them for 15 minutes), plus leeway.
RETENTION_SECONDS = 20 * 60
KINDS = ("subject", "organization", "session", "api_key", "signing_key")
REDIS_KEY = "corral:revocations"
_SEPARATOR = "\x1f"


@dataclass(frozen=True)
class Revocation:
    """Tokens whose ``kind`` claim equals ``id`` and that were issued at or before
    ``not_before`` (epoch seconds) are void."""

    kind: str
    id: str
    not_before: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown revocation kind {self.kind!r}")


class RevocationStore(Protocol):
    async def publish(self, revocation: Revocation) -> None: ...

    async def snapshot(self) -> Mapping[tuple[str, str], float]: ...


class InMemoryRevocations:
    """One process's feed (development, tests)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._entries: dict[tuple[str, str], float] = {}
        self._clock = clock

    async def publish(self, revocation: Revocation) -> None:
        key = (revocation.kind, revocation.id)
        self._entries[key] = max(self._entries.get(key, 0.0), revocation.not_before)

    async def snapshot(self) -> Mapping[tuple[str, str], float]:
        horizon = self._clock() - RETENTION_SECONDS
        for key in [k for k, at in self._entries.items() if at < horizon]:
            del self._entries[key]
        return dict(self._entries)


LOCAL = InMemoryRevocations()  # shared by every service of a process without Redis


class RedisRevocations:
    """The feed in one Redis hash, ``kind<US>id -> not_before``, shared by every replica."""

    def __init__(
        self, redis: aioredis.Redis, *, key: str = REDIS_KEY, clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = redis
        self._key = key
        self._clock = clock

    async def publish(self, revocation: Revocation) -> None:
        field = f"{revocation.kind}{_SEPARATOR}{revocation.id}"
        # Keep the latest time: an earlier revocation arriving late must not shorten a later one.
        await self._redis.eval(
            "local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') "
            "if tonumber(ARGV[2]) > old then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end",
            1,
            self._key,
            field,
            repr(revocation.not_before),
        )

    async def snapshot(self) -> Mapping[tuple[str, str], float]:
        raw = await self._redis.hgetall(self._key)
        horizon = self._clock() - RETENTION_SECONDS
        entries: dict[tuple[str, str], float] = {}
        stale: list[bytes | str] = []
        for field, value in raw.items():
            name = field.decode() if isinstance(field, bytes) else field
            kind, _, ident = name.partition(_SEPARATOR)
            at = float(value)
            if at < horizon:
                stale.append(field)
            else:
                entries[(kind, ident)] = at
        if stale:
            await self._redis.hdel(self._key, *stale)
        return entries


class RevocationList:
    """A service's view of the feed: refreshed at most every ``refresh_seconds``, checked on
    every call (a few dictionary look-ups)."""

    def __init__(
        self,
        store: RevocationStore,
        *,
        refresh_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._refresh_seconds = refresh_seconds
        self._clock = clock
        self._entries: Mapping[tuple[str, str], float] = {}
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def refresh(self, *, force: bool = False) -> None:
        if self._lock.locked():
            return  # another call is reading; this one goes on with the current snapshot
        async with self._lock:
            if not force and self._clock() - self._read_at < self._refresh_seconds:
                return
            try:
                self._entries = await self._store.snapshot()
            except Exception:
                log.warning("the revocation feed cannot be read; the last snapshot stays in force")
            self._read_at = self._clock()

    async def check(self, caller: Caller) -> None:
        """Raise TOKEN_REVOKED when a revocation covers the caller's token."""
        if self._clock() - self._read_at >= self._refresh_seconds:
            await self.refresh()
        if not self._entries:
            return
        for kind, ident in (
            ("subject", caller.subject),
            ("organization", caller.organization),
            ("session", caller.session_id),
            ("api_key", caller.api_key_id),
            ("signing_key", caller.key_id),
        ):
            if not ident:
                continue
            at = self._entries.get((kind, ident))
            if at is not None and caller.issued_at <= at:
                raise Unauthenticated(
                    "the token was revoked; sign in again", reason="TOKEN_REVOKED"
                )
