"""Redis client from a URL (event streams, rate limits, caches), counting its round trips."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection

from corral.libs.metrics import meter

_round_trips = meter("corral.redis").create_counter(
    "corral.redis.round_trips",
    description="requests written to Redis (a pipeline is one), by service",
)
_counted: dict[tuple[type[Any], str], type[Any]] = {}


def _counting(cls: type[AbstractConnection], service: str) -> type[Any]:
    """A subclass of the pool's connection class that counts each packed write: one command,
    or one whole pipeline, is one round trip."""
    key = (cls, service)
    found = _counted.get(key)
    if found is None:
        attributes = {"service": service}

        async def send_packed_command(self: Any, command: Any, check_health: bool = True) -> None:
            _round_trips.add(1, attributes)
            await cls.send_packed_command(self, command, check_health)

        found = _counted[key] = type(
            f"Counted{cls.__name__}", (cls,), {"send_packed_command": send_packed_command}
        )
    return found


def create_redis(url: str, service: str = "") -> aioredis.Redis:
    client = aioredis.Redis.from_url(
        url,
        decode_responses=False,
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
        health_check_interval=30,
        retry_on_timeout=True,
    )
    if service:
        pool = client.connection_pool
        pool.connection_class = _counting(pool.connection_class, service)
    return client


async def ping(client: aioredis.Redis) -> None:
    await client.ping()
