"""Per-caller request rate limits: GCRA on Redis (shared by replicas) or in memory (development).

GCRA (the generic cell rate algorithm) keeps one number per key, the *theoretical arrival time*
(TAT) of the next request if the caller had used its rate exactly. With an emission interval
``T = 60 s / rate`` and a burst of ``B``, a request at ``now`` is allowed when
``max(TAT, now) + T - B*T <= now``; allowing it moves the TAT on by ``T``. A caller idle long
enough may therefore send ``B`` requests at once, then one every ``T``; a refused request learns
exactly how long to wait. Refusals do not move the TAT, so hammering does not push recovery out.

The rule is written twice, in Python (:func:`gcra`) and in the Lua script, because the Redis
version must run inside Redis to be atomic. Both are checked by the same contract suite.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from corral.libs.auth.caller import Caller
from corral.libs.errors import QuotaViolation, ResourceExhausted
from corral.libs.grpc.interceptors import QUIET_PREFIXES, CallInfo

log = logging.getLogger("corral.ratelimit")

SECONDS_PER_MINUTE = 60.0


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    retry_after_seconds: float  # 0 when allowed
    remaining: int  # requests that could still be sent right now


class RateLimiter(Protocol):
    async def acquire(self, key: str, rate_per_minute: int, burst: int) -> RateDecision:
        """Take one request from ``key``'s allowance: ``rate_per_minute`` sustained, ``burst``
        at once. Raises :class:`RateLimiterUnavailable` when the limiter cannot decide."""
        ...


class RateLimiterUnavailable(Exception):
    """The limiter's store could not be reached in time; the caller decides what that means."""


def _check(rate_per_minute: int, burst: int) -> None:
    if rate_per_minute < 1 or burst < 1:
        raise ValueError(f"rate and burst must be positive, not {rate_per_minute}/min, {burst}")


def gcra(
    tat: float | None, now: float, interval: float, burst: int
) -> tuple[float | None, RateDecision]:
    """One GCRA step (any time unit): ``(new TAT or None when refused, decision)``."""
    start = now if tat is None or tat < now else tat
    new_tat = start + interval
    allow_at = new_tat - burst * interval
    if now < allow_at:
        return None, RateDecision(False, allow_at - now, 0)
    # The epsilon keeps float noise (0.2 / 0.1 = 1.999...) from costing a request.
    return new_tat, RateDecision(True, 0.0, math.floor((now - allow_at) / interval + 1e-9))


# KEYS[1] = the key; ARGV = rate per minute, burst. Times are microseconds from Redis' own clock,
# so replicas with skewed clocks agree (TIME before a write needs Redis >= 5, which replicates
# script effects). Returns {allowed, retry_after_us, remaining}.
GCRA_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local interval = 60000000 / rate
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now < allow_at then
  return {0, math.ceil(allow_at - now), 0}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
           'PX', math.ceil((new_tat - now) / 1000))
return {1, 0, math.floor((now - allow_at) / interval + 1e-9)}
"""
GCRA_SHA = hashlib.sha1(GCRA_SCRIPT.encode()).hexdigest()


class RedisRateLimiter:
    """GCRA in one Lua script, so every replica sharing the Redis shares each key's allowance.

    The script runs by ``EVALSHA`` and falls back to ``EVAL`` (which caches it) when Redis does
    not know it yet (a restart, a failover, ``SCRIPT FLUSH``). Each key expires once its TAT has
    passed, when it holds nothing a fresh key would not. A call that takes longer than
    ``timeout`` or fails raises :class:`RateLimiterUnavailable`.
    """

    def __init__(
        self, client: aioredis.Redis, *, prefix: str = "corral:ratelimit:", timeout: float = 0.25
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._timeout = timeout

    async def acquire(self, key: str, rate_per_minute: int, burst: int) -> RateDecision:
        _check(rate_per_minute, burst)
        args = (self._prefix + key, rate_per_minute, burst)
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    reply = await self._client.evalsha(GCRA_SHA, 1, *args)
                except NoScriptError:
                    reply = await self._client.eval(GCRA_SCRIPT, 1, *args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise RateLimiterUnavailable(f"redis: {exc!r}") from exc
        allowed, retry_after_us, remaining = (int(value) for value in reply)
        return RateDecision(bool(allowed), retry_after_us / 1e6, remaining)


class InMemoryRateLimiter:
    """The same GCRA in this process: for development, or one replica alone.

    Memory stays bounded: a key whose TAT has passed is idle (it holds nothing a fresh key would
    not), and idle keys are swept at most every ``sweep_seconds``; beyond ``max_keys`` the least
    recently used key is dropped, which at worst forgives that caller's recent requests.
    """

    def __init__(
        self,
        *,
        max_keys: int = 100_000,
        sweep_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tat: OrderedDict[str, float] = OrderedDict()
        self._max_keys = max_keys
        self._sweep_seconds = sweep_seconds
        self._clock = clock
        self._swept = clock()

    def __len__(self) -> int:
        return len(self._tat)

    async def acquire(self, key: str, rate_per_minute: int, burst: int) -> RateDecision:
        _check(rate_per_minute, burst)
        now = self._clock()
        if now - self._swept >= self._sweep_seconds:
            self._swept = now
            for idle in [k for k, tat in self._tat.items() if tat <= now]:
                del self._tat[idle]
        new_tat, decision = gcra(
            self._tat.get(key), now, SECONDS_PER_MINUTE / rate_per_minute, burst
        )
        if new_tat is not None:
            self._tat[key] = new_tat
            self._tat.move_to_end(key)
            if len(self._tat) > self._max_keys:
                self._tat.popitem(last=False)
        return decision


class LimitProvider(Protocol):
    async def requests_per_minute(self, caller: Caller | None) -> int | None:
        """The caller's limit (``None`` for an anonymous call); ``None`` means unlimited."""
        ...


class StaticLimits:
    """One limit for every authenticated caller, one for anonymous (public-method) calls, and
    one for Corral's own services (``service`` role): a turn costs a service several calls
    (reserve, settle, release, audit) on behalf of many users, so it is not held to one
    user's allowance."""

    def __init__(
        self,
        default_per_minute: int | None,
        anonymous_per_minute: int | None,
        service_per_minute: int | None = None,
    ) -> None:
        for limit in (default_per_minute, anonymous_per_minute, service_per_minute):
            if limit is not None and limit < 1:
                raise ValueError(f"a limit is positive or None (unlimited), not {limit}")
        self.default_per_minute = default_per_minute
        self.anonymous_per_minute = anonymous_per_minute
        self.service_per_minute = service_per_minute

    async def requests_per_minute(self, caller: Caller | None) -> int | None:
        """The service allowance for a service, else the caller's own quota when their token
        carries one, else the default."""
        if caller is None:
            return self.anonymous_per_minute
        if caller.is_service:
            return self.service_per_minute
        return caller.requests_per_minute or self.default_per_minute


def peer_address(peer: str) -> str:
    """The address part of a gRPC peer (``ipv4:10.0.0.7:5000`` -> ``10.0.0.7``); anything else
    (unix sockets) as is."""
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer or "unknown"
    return rest.rpartition(":")[0].strip("[]")


Networks: TypeAlias = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]


def trusted_networks(cidrs: Sequence[str]) -> Networks:
    return [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]


def client_address(peer: str, metadata: Mapping[str, str], trusted: Networks) -> str:
    """Who is really calling. A forwarded address is believed only from a trusted proxy (the
    edge): then it is the last ``x-forwarded-for`` entry, the one Envoy appended itself
    (``use_remote_address``); entries before it are whatever the client sent. From anyone
    else, the connection's own address."""
    direct = peer_address(peer)
    forwarded = metadata.get("x-forwarded-for", "")
    if not forwarded or not _within(direct, trusted):
        return direct
    last = forwarded.rsplit(",", 1)[-1].strip()
    try:
        return str(ipaddress.ip_address(last))
    except ValueError:
        return direct


def _within(address: str, networks: Networks) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_network(address: str) -> str:
    """The unit an anonymous allowance belongs to: an IPv4 address, or an IPv6 /64 (one
    client usually holds a whole /64)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class RateLimitHook:
    """Refuses calls beyond the caller's requests-per-minute with ``RESOURCE_EXHAUSTED``.

    Placed after authentication: an authenticated call is keyed by the caller's subject, an
    anonymous (public-method) call by its client address (``anon:<ip>``): behind the edge, the
    address Envoy saw, which is believed only from ``trusted_proxies`` (see
    :func:`client_address`), so one anonymous client cannot use up everyone's allowance and
    nobody can pose as another address by sending a header. ``scope`` (the
    service name) keeps each service's allowances apart, so one request relayed to another
    service with the caller's token is not counted twice against one allowance.

    When the limiter cannot decide (Redis down or slow), the call goes through and a warning is
    logged (at most once per ``warn_every`` seconds): availability over strictness. A limiter
    outage must not become an outage of every service; the worst case is callers briefly
    unlimited, which quotas and budgets downstream still bound.
    """

    def __init__(
        self,
        limiter: RateLimiter,
        limits: LimitProvider,
        exempt_prefixes: tuple[str, ...] = QUIET_PREFIXES,
        *,
        burst: int = 50,
        scope: str = "",
        warn_every: float = 10.0,
        trusted_proxies: Networks = (),
    ) -> None:
        self._limiter = limiter
        self._limits = limits
        self._exempt = exempt_prefixes
        self._burst = burst
        self._scope = f"{scope}:" if scope else ""
        self._warn_every = warn_every
        self._trusted = trusted_proxies
        self._warned_at = -math.inf
        self._unchecked = 0

    async def before(self, call: CallInfo) -> None:
        if call.method.startswith(self._exempt):
            return
        caller = call.caller
        buckets: list[tuple[str, int]] = []  # (subject, requests per minute)
        limit = await self._limits.requests_per_minute(caller)
        if limit is not None:
            buckets.append((caller.subject if caller else f"anon:{self._anonymous(call)}", limit))
        service = caller is not None and caller.is_service
        if caller is not None and caller.organization_requests_per_minute and not service:
            # the organisation's quota is one allowance shared by all of its (human and
            # programmatic) callers; Corral's own services act for every organisation
            buckets.append((caller.organization, caller.organization_requests_per_minute))
        for subject, per_minute in buckets:
            # never more than a minute's worth at once; a service may send a second's worth
            burst = min(max(self._burst, per_minute // 60) if service else self._burst, per_minute)
            try:
                decision = await self._limiter.acquire(self._scope + subject, per_minute, burst)
            except RateLimiterUnavailable as exc:
                self._fail_open(call, exc)
                return
            if not decision.allowed:
                raise ResourceExhausted(
                    f"too many requests: {per_minute} per minute allowed for {subject}; "
                    f"retry in {decision.retry_after_seconds:.1f} s",
                    reason="RATE_LIMITED",
                    violations=[
                        QuotaViolation(
                            subject,
                            "requests_per_minute",
                            f"{per_minute} requests per minute, bursts of up to {burst}",
                        )
                    ],
                    retry_after_seconds=decision.retry_after_seconds,
                    metadata={"requests_per_minute": str(per_minute), "burst": str(burst)},
                )

    def _anonymous(self, call: CallInfo) -> str:
        return client_network(client_address(call.peer, call.metadata, self._trusted))

    def _fail_open(self, call: CallInfo, exc: RateLimiterUnavailable) -> None:
        self._unchecked += 1
        now = time.monotonic()
        if now - self._warned_at < self._warn_every:
            return
        log.warning(
            "rate limiter unavailable; letting calls through unchecked",
            extra={
                "error": str(exc),
                "unchecked_calls": self._unchecked,
                "method": call.method,
                "request_id": call.request_id,
            },
        )
        self._warned_at = now
        self._unchecked = 0
