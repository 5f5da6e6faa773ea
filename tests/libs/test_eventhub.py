"""The event hub: one contract suite on memory and on Redis, then what only Redis has to do
(replicas sharing streams, one reader per topic per process, surviving a dropped connection)."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from corral.libs.eventhub import (
    EventHub,
    HubClosed,
    HubMessage,
    InMemoryHub,
    Lagged,
    RedisStreamHub,
    Subscription,
)
from corral.libs.redis import create_redis
from tests.conftest import require_redis

MakeHub = Callable[..., EventHub]


def _messages(first: int, last: int) -> list[HubMessage]:
    return [HubMessage(n, f"event {n}".encode()) for n in range(first, last + 1)]


async def _collect(sub: Subscription, until: int) -> list[int]:
    """Sequences received up to and including ``until``; fails on Lagged or silence."""
    received: list[int] = []
    while not received or received[-1] < until:
        message = await sub.get(5.0)
        assert message is not None, f"silence after {received[-5:]}"
        assert message.payload == f"event {message.sequence}".encode()
        received.append(message.sequence)
    return received


async def _collect_through_lag(sub: Subscription, until: int) -> tuple[int, list[int]]:
    """(how many times Lagged was raised, sequences received up to ``until``)."""
    lagged, received = 0, []
    while not received or received[-1] < until:
        try:
            message = await sub.get(5.0)
        except Lagged:
            lagged += 1
            continue
        assert message is not None, f"silence after {received[-5:]} ({lagged} lags)"
        received.append(message.sequence)
    return lagged, received


async def _delete_keys(client: aioredis.Redis, prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)


@pytest.fixture
def topic() -> str:
    return f"sessions/{uuid.uuid4().hex}"


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def make_hub(request: pytest.FixtureRequest) -> AsyncIterator[MakeHub]:
    """Builds hubs of one kind (``make_hub(buffer=...)``), all closed after the test."""
    hubs: list[EventHub] = []
    if request.param == "memory":

        def make(buffer: int = 1024) -> EventHub:
            hubs.append(InMemoryHub(buffer))
            return hubs[-1]

        yield make
        for hub in hubs:
            await hub.close()
        return

    client = create_redis(await require_redis())
    prefix = f"test:{uuid.uuid4().hex}:hub:"

    def make_redis(buffer: int = 1024) -> EventHub:
        hubs.append(RedisStreamHub(client, prefix=prefix, expire_seconds=60, buffer=buffer))
        return hubs[-1]

    yield make_redis
    for hub in hubs:
        await hub.close()
    await _delete_keys(client, prefix)
    await client.aclose()


async def test_messages_of_a_topic_arrive_in_publish_order(make_hub: MakeHub, topic: str) -> None:
    hub = make_hub()
    async with await hub.subscribe(topic) as sub:
        batches, first = [], 1
        for size in [1, 7, 2, 5, 3, 1, 6, 4] * 12:  # 348 messages in 96 publishes
            batches.append(_messages(first, first + size - 1))
            first += size
        for batch in batches:
            await hub.publish(topic, batch)
        assert await _collect(sub, first - 1) == list(range(1, first))
        assert await sub.get(0.05) is None


async def test_topics_are_independent(make_hub: MakeHub, topic: str) -> None:
    hub = make_hub()
    other = f"{topic}-other"
    async with await hub.subscribe(topic) as mine, await hub.subscribe(other) as theirs:
        for n in range(1, 21):
            await hub.publish(topic, _messages(n, n))
            await hub.publish(other, _messages(100 + n, 100 + n))
        assert await _collect(mine, 20) == list(range(1, 21))
        assert await _collect(theirs, 120) == list(range(101, 121))
        assert await mine.get(0.05) is None


async def test_a_subscriber_sees_only_what_is_published_after_it_subscribed(
    make_hub: MakeHub, topic: str
) -> None:
    hub = make_hub()
    await hub.publish(topic, _messages(1, 3))
    async with await hub.subscribe(topic) as sub:
        await hub.publish(topic, _messages(4, 5))
        assert await _collect(sub, 5) == [4, 5]
        assert await sub.get(0.05) is None


async def test_a_late_subscriber_misses_nothing_published_after_it_joined(
    make_hub: MakeHub, topic: str
) -> None:
    hub = make_hub()
    async with await hub.subscribe(topic) as early:
        await hub.publish(topic, _messages(1, 3))
        async with await hub.subscribe(topic) as late:
            await hub.publish(topic, _messages(4, 5))
            received = await _collect(late, 5)
        # It may also see some of what was published just before (a watcher skips those).
        assert received[-2:] == [4, 5]
        assert received == sorted(set(received))
        assert await _collect(early, 5) == [1, 2, 3, 4, 5]


async def test_each_of_100_subscribers_gets_every_message(make_hub: MakeHub, topic: str) -> None:
    hub = make_hub()
    subs = await asyncio.gather(*(hub.subscribe(topic) for _ in range(100)))
    collecting = [asyncio.create_task(_collect(sub, 300)) for sub in subs]
    for first in range(1, 301, 3):
        await hub.publish(topic, _messages(first, first + 2))
    results = await asyncio.gather(*collecting)
    assert all(result == list(range(1, 301)) for result in results)
    for sub in subs:
        await sub.close()


async def test_a_stalled_subscriber_lags_without_slowing_the_publisher_or_others(
    make_hub: MakeHub, topic: str
) -> None:
    """The stalled subscriber never reads while 1,000 messages go by, 15 times its buffer; if
    publishing waited for it, the publisher would never finish."""
    hub = make_hub(buffer=64)
    stalled = await hub.subscribe(topic)
    fast = await asyncio.gather(*(hub.subscribe(topic) for _ in range(10)))
    collecting = [asyncio.create_task(_collect(sub, 1000)) for sub in fast]
    started = time.monotonic()
    async with asyncio.timeout(5):
        for n in range(1, 1001):
            await hub.publish(topic, _messages(n, n))
            await asyncio.sleep(0)  # as a publisher awaiting its database would
    published_in = time.monotonic() - started
    assert all(result == list(range(1, 1001)) for result in await asyncio.gather(*collecting))

    with pytest.raises(Lagged):
        await stalled.get(5)
    # Then it carries on with the newest messages, in order, and with what comes next.
    await hub.publish(topic, _messages(1001, 1001))
    rest = await _collect(stalled, 1001)
    assert rest == list(range(rest[0], 1002))
    assert len(rest) <= 64 + 1
    assert published_in < 5
    await stalled.close()


async def test_get_returns_none_after_its_timeout_of_silence(make_hub: MakeHub, topic: str) -> None:
    hub = make_hub()
    async with await hub.subscribe(topic) as sub:
        await hub.publish(f"{topic}-other", _messages(1, 1))
        started = time.monotonic()
        assert await sub.get(0.2) is None
        assert 0.19 <= time.monotonic() - started < 1.0
        assert await sub.get(0) is None


async def test_a_closed_subscription_receives_nothing_more(make_hub: MakeHub, topic: str) -> None:
    hub = make_hub()
    gone = await hub.subscribe(topic)
    async with await hub.subscribe(topic) as staying:
        waiting = asyncio.create_task(gone.get(10))
        await asyncio.sleep(0.05)
        await gone.close()
        await gone.close()  # idempotent
        with pytest.raises(HubClosed):
            await asyncio.wait_for(waiting, 1)
        await hub.publish(topic, _messages(1, 2))
        assert await _collect(staying, 2) == [1, 2]
        with pytest.raises(HubClosed):
            await gone.get(0.05)


async def test_closing_the_hub_ends_every_subscription(make_hub: MakeHub, topic: str) -> None:
    hub = make_hub()
    subs = [await hub.subscribe(topic), await hub.subscribe(f"{topic}-other")]
    waiting = [asyncio.create_task(sub.get(10)) for sub in subs]
    await asyncio.sleep(0.05)
    await hub.close()
    for result in await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 1):
        assert isinstance(result, HubClosed)
    with pytest.raises(HubClosed):
        await hub.subscribe(topic)
    with pytest.raises(HubClosed):
        await hub.publish(topic, _messages(1, 1))
    await subs[0].close()  # still harmless


# --- Redis only -------------------------------------------------------------------------------


@pytest.fixture
async def redis_hubs(redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, list[RedisStreamHub]]]:
    """Two hubs on two clients sharing one prefix: two replicas. Also returns an admin client."""
    prefix = f"test:{uuid.uuid4().hex}:hub:"
    clients = [create_redis(redis_url) for _ in range(3)]
    hubs = [RedisStreamHub(client, prefix=prefix, expire_seconds=60) for client in clients[:2]]
    yield clients[2], hubs
    for hub in hubs:
        await hub.close()
    await _delete_keys(clients[2], prefix)
    for client in clients:
        await client.aclose()


async def _readers_of(admin: aioredis.Redis, topic: str) -> list[dict[str, Any]]:
    return [c for c in await admin.client_list() if topic in str(c.get("name", ""))]


@pytest.mark.redis
async def test_replicas_see_each_others_messages(
    redis_hubs: tuple[aioredis.Redis, list[RedisStreamHub]], topic: str
) -> None:
    _, (one, two) = redis_hubs
    async with await one.subscribe(topic) as on_one, await two.subscribe(topic) as on_two:
        await one.publish(topic, _messages(1, 3))
        await two.publish(topic, _messages(4, 6))
        assert await _collect(on_one, 6) == [1, 2, 3, 4, 5, 6]
        assert await _collect(on_two, 6) == [1, 2, 3, 4, 5, 6]


@pytest.mark.redis
async def test_one_reader_connection_per_topic_per_process(
    redis_hubs: tuple[aioredis.Redis, list[RedisStreamHub]], topic: str
) -> None:
    admin, (hub, other_replica) = redis_hubs
    subs = await asyncio.gather(*(hub.subscribe(topic) for _ in range(50)))
    assert len(await _readers_of(admin, topic)) == 1
    async with await other_replica.subscribe(topic):
        assert len(await _readers_of(admin, topic)) == 2  # one per process

    await hub.publish(topic, _messages(1, 2))
    assert all(r == [1, 2] for r in await asyncio.gather(*(_collect(s, 2) for s in subs)))

    for sub in subs[:-1]:
        await sub.close()
    assert len(await _readers_of(admin, topic)) == 1  # still needed by the last one
    await subs[-1].close()
    for _ in range(100):  # the server notices the close on its own time
        if not await _readers_of(admin, topic):
            break
        await asyncio.sleep(0.02)
    assert await _readers_of(admin, topic) == []


@pytest.mark.redis
async def test_the_reader_survives_a_dropped_connection_and_reports_lagged(
    redis_hubs: tuple[aioredis.Redis, list[RedisStreamHub]], topic: str
) -> None:
    admin, (hub, _) = redis_hubs
    async with await hub.subscribe(topic) as sub:
        await hub.publish(topic, _messages(1, 1))
        assert await _collect(sub, 1) == [1]
        [reader] = await _readers_of(admin, topic)
        assert await admin.execute_command("CLIENT", "KILL", "ID", reader["id"]) == 1
        await hub.publish(topic, _messages(2, 3))  # while the reader is down

        with pytest.raises(Lagged):
            await sub.get(5)
        # It resumes after the last entry it delivered, so nothing in the stream is lost.
        _, received = await _collect_through_lag(sub, 3)
        assert received == [2, 3]
        await hub.publish(topic, _messages(4, 4))
        _, received = await _collect_through_lag(sub, 4)
        assert received == [4]
        [again] = await _readers_of(admin, topic)
        assert again["id"] != reader["id"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_redis_means_lagged_subscriptions_and_failing_publishes(
    topic: str,
) -> None:
    client = create_redis(f"redis://127.0.0.1:{_closed_port()}/0")
    hub = RedisStreamHub(client)
    try:
        async with asyncio.timeout(5):
            sub = await hub.subscribe(topic)  # does not fail: the watcher still has its database
            with pytest.raises(Lagged):
                await sub.get(1)
            assert await sub.get(0.1) is None
            with pytest.raises(RedisError):
                await hub.publish(topic, _messages(1, 1))
    finally:
        await hub.close()
        await client.aclose()
