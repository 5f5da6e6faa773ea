"""Redis client from a URL (event streams, rate limits, caches)."""

from __future__ import annotations

import redis.asyncio as aioredis


def create_redis(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        decode_responses=False,
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
        health_check_interval=30,
        retry_on_timeout=True,
    )


async def ping(client: aioredis.Redis) -> None:
    await client.ping()
