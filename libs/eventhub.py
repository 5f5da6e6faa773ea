"""Live fan-out of ordered messages per topic: Redis Streams (shared by replicas) or in memory.

The hub carries what a source of truth (the session database) already holds, to everyone
watching right now. It is fast and ordered per topic, and it never makes a publisher wait for
a subscriber: each subscription has a bounded buffer, and one that overflows loses its buffered
messages and is told so by :class:`Lagged`, after which its owner re-reads the source of truth.
Because everything buffered is already in the source of truth, dropping all of it (rather than
only the oldest) frees the memory at once and costs the re-reading watcher nothing.

:class:`InMemoryHub` serves one process (development, tests). :class:`RedisStreamHub` appends to
one Redis stream per topic; in each process one reader task per watched topic tails the stream
on a connection of its own and fans out to that process's subscribers through an
:class:`InMemoryHub`, so a hundred watchers of a session on one replica cost one connection.

A subscription has one consumer: ``get`` is not meant to be awaited by two tasks at once.
Once a subscription or its hub is closed, ``get`` raises :class:`HubClosed` (it does not return
``None``, so a loop that treats ``None`` as "send a heartbeat" cannot spin on a dead hub).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Self

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection

from corral.libs.metrics import LATENCY_BUCKETS, meter

log = logging.getLogger("corral.eventhub")

_meter = meter("corral.eventhub")
# How long a published batch waited in a subscriber's buffer before its consumer took it.
_fanout_lag = _meter.create_histogram(
    "corral.eventhub.fanout.lag",
    unit="s",
    description="from a batch's delivery to a subscription until its consumer reads it",
    explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
)
# How far behind the Redis stream a reader is: from XADD (the entry id's time, Redis' clock)
# to the fan-out to this process's subscribers.
_stream_lag = _meter.create_histogram(
    "corral.eventhub.stream.lag",
    unit="s",
    description="from a Redis stream entry's append to its local fan-out",
    explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
)


@dataclass(frozen=True, slots=True)
class HubMessage:
    sequence: int
    payload: bytes


class Lagged(Exception):
    """This subscription fell behind and messages were dropped; re-read from the source of truth."""


class HubClosed(Exception):
    """The hub, or this subscription, is closed: nothing more will be delivered through it."""


class Subscription(Protocol):
    # The timeout is part of the call's meaning (None on silence, so a watcher can heartbeat),
    # not a cancellation knob that asyncio.timeout() could replace.
    async def get(self, timeout: float) -> HubMessage | None:  # noqa: ASYNC109
        """The next message in publish order, or ``None`` after ``timeout`` seconds without one.

        Raises :class:`Lagged` once after messages were dropped (then carries on with newer
        messages), and :class:`HubClosed` once the subscription or its hub is closed."""
        ...

    async def close(self) -> None:
        """Stop delivery to this subscription; idempotent."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc_info: object) -> None: ...


class EventHub(Protocol):
    async def publish(self, topic: str, messages: Sequence[HubMessage]) -> None:
        """Send ``messages``, in order, to every subscriber of ``topic``; never waits for them."""
        ...

    async def subscribe(self, topic: str) -> Subscription:
        """A subscription that receives everything published to ``topic`` after this returns
        (and possibly some messages published just before, which a watcher skips by sequence)."""
        ...

    async def close(self) -> None:
        """End every subscription (blocked ``get`` calls raise :class:`HubClosed`) and stop any
        background work. Publishing or subscribing afterwards raises :class:`HubClosed`."""
        ...


class _Subscription:
    """A bounded buffer of one subscriber, filled by its hub without ever waiting."""

    __slots__ = (
        "_batches",
        "_buffer",
        "_capacity",
        "_closed",
        "_dropped",
        "_lag",
        "_release",
        "_wakeup",
        "topic",
    )

    def __init__(
        self, capacity: int, release: Callable[[_Subscription], Awaitable[None]], topic: str
    ) -> None:
        self.topic = topic
        self._buffer: deque[HubMessage] = deque()
        # [messages of the batch still buffered, when it arrived, whether its lag is recorded]
        self._batches: deque[list[Any]] = deque()
        self._capacity = capacity
        self._release = release
        self._wakeup = asyncio.Event()
        self._lag: str | None = None  # why messages were lost, until get() reports it
        self._dropped = 0
        self._closed = False

    def push(self, messages: Sequence[HubMessage]) -> None:
        if len(self._buffer) + len(messages) > self._capacity:
            self._dropped += len(self._buffer) + len(messages)
            self._buffer.clear()
            self._batches.clear()
            self.lagged(f"fell more than {self._capacity} messages behind; {self._dropped} dropped")
            return
        if messages:
            self._buffer.extend(messages)
            self._batches.append([len(messages), time.perf_counter(), False])
        self._wakeup.set()

    def lagged(self, reason: str) -> None:
        self._lag = reason
        self._wakeup.set()

    def end(self) -> None:
        self._closed = True
        self._buffer.clear()
        self._batches.clear()
        self._wakeup.set()

    @property
    def closed(self) -> bool:
        return self._closed

    async def get(self, timeout: float) -> HubMessage | None:  # noqa: ASYNC109
        deadline: float | None = None
        while True:
            if self._closed:
                raise HubClosed(f"the subscription to {self.topic!r} is closed")
            if self._lag is not None:
                reason, self._lag, self._dropped = self._lag, None, 0
                raise Lagged(reason)
            if self._buffer:
                batch = self._batches[0]
                if not batch[2]:
                    batch[2] = True
                    _fanout_lag.record(time.perf_counter() - batch[1])
                batch[0] -= 1
                if not batch[0]:
                    self._batches.popleft()
                return self._buffer.popleft()
            loop = asyncio.get_running_loop()
            if deadline is None:
                deadline = loop.time() + timeout
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return None

    async def close(self) -> None:
        if self._closed:
            return
        self.end()
        await self._release(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class InMemoryHub:
    """Fan-out within this process. Publishing copies references into each subscriber's buffer
    of ``buffer`` messages and wakes it; a topic nobody watches costs nothing."""

    def __init__(self, buffer: int = 1024) -> None:
        if buffer < 1:
            raise ValueError(f"buffer must be positive, not {buffer}")
        self._capacity = buffer
        self._topics: dict[str, set[_Subscription]] = {}
        self._closed = False

    async def publish(self, topic: str, messages: Sequence[HubMessage]) -> None:
        if self._closed:
            raise HubClosed("the event hub is closed")
        self.deliver(topic, messages)

    def deliver(self, topic: str, messages: Sequence[HubMessage]) -> None:
        """Publish without awaiting anything: every subscriber's buffer is filled before this
        returns."""
        subscribers = self._topics.get(topic)
        if subscribers and messages:
            for subscription in subscribers:
                subscription.push(messages)

    def signal_lagged(self, topic: str, reason: str) -> None:
        """Tell every subscriber of ``topic`` that messages may have been lost upstream."""
        for subscription in self._topics.get(topic, ()):
            subscription.lagged(reason)

    async def subscribe(self, topic: str) -> _Subscription:
        return self.attach(topic, self._release)

    def attach(
        self, topic: str, release: Callable[[_Subscription], Awaitable[None]]
    ) -> _Subscription:
        """Register a subscription now; ``release`` runs when it is closed."""
        if self._closed:
            raise HubClosed("the event hub is closed")
        subscription = _Subscription(self._capacity, release, topic)
        self._topics.setdefault(topic, set()).add(subscription)
        return subscription

    def detach(self, subscription: _Subscription) -> bool:
        """Forget ``subscription``; True when its topic has no subscribers left."""
        subscribers = self._topics.get(subscription.topic)
        if subscribers is None:
            return False
        subscribers.discard(subscription)
        if subscribers:
            return False
        del self._topics[subscription.topic]
        return True

    async def _release(self, subscription: _Subscription) -> None:
        self.detach(subscription)

    async def close(self) -> None:
        self._closed = True
        for subscribers in self._topics.values():
            for subscription in subscribers:
                subscription.end()
        self._topics.clear()


# Backoff of a reader whose Redis fails: from the first delay, doubling up to the cap, jittered.
_FIRST_RETRY_SECONDS = 0.05
_MAX_RETRY_SECONDS = 5.0
# A blocked XREAD gets this long beyond its BLOCK time to answer before the connection counts
# as dead.
_READ_GRACE_SECONDS = 5.0


class RedisStreamHub:
    """Fan-out across replicas through one Redis stream per topic (``<prefix><topic>``).

    ``publish`` is one pipelined round trip however many messages it carries:
    ``XADD key MAXLEN ~ maxlen * s <sequence> p <payload>`` for each, then ``EXPIRE key
    expire_seconds``, so a stream nobody writes to any more disappears. It raises the client's
    ``RedisError`` when Redis cannot take the messages; they are already in the source of truth,
    and watchers elsewhere recover them from it when they notice the gap in sequences.

    The first local subscription to a topic starts that topic's reader; the last one to close
    stops it. The reader borrows no connection from the client's pool: it opens one of its own,
    configured like the pool's, named ``hub-reader:<key>`` (see ``CLIENT LIST``), reads the
    stream's last id, then loops ``XREAD COUNT BLOCK`` from there. A subscriber joining a
    running reader registers before the reader's next fan-out, so it misses nothing published
    after it joined. When Redis fails, the reader tells its subscribers :class:`Lagged`, retries
    with backoff, resumes after the last entry it delivered, and tells them :class:`Lagged` again
    once it has recovered (messages whose publishing failed meanwhile exist only in the source
    of truth). ``subscribe`` therefore succeeds even while Redis is down; the subscription
    starts out lagged.

    Each read fetches at most a quarter of ``buffer`` entries, so a subscriber that keeps up
    never overflows on one batch. A reader more than ``maxlen`` entries behind would find the
    oldest of them trimmed; like a failed publish, that shows as a gap in sequences.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = "corral:hub:",
        maxlen: int = 10_000,
        expire_seconds: int = 86_400,
        block_ms: int = 5_000,
        buffer: int = 1024,
    ) -> None:
        if maxlen < 1 or expire_seconds < 1 or block_ms < 1:
            raise ValueError("maxlen, expire_seconds and block_ms must be positive")
        self._redis = redis
        self._prefix = prefix
        self._maxlen = maxlen
        self._expire_seconds = expire_seconds
        self._block_ms = block_ms
        self._batch = max(1, buffer // 4)
        self._local = InMemoryHub(buffer)
        self._readers: dict[str, _StreamReader] = {}
        self._closed = False

    async def publish(self, topic: str, messages: Sequence[HubMessage]) -> None:
        if self._closed:
            raise HubClosed("the event hub is closed")
        if not messages:
            return
        key = self._prefix + topic
        async with self._redis.pipeline(transaction=False) as pipe:
            for message in messages:
                pipe.xadd(
                    key,
                    {b"s": message.sequence, b"p": message.payload},
                    maxlen=self._maxlen,
                    approximate=True,
                )
            pipe.expire(key, self._expire_seconds)
            await pipe.execute()

    async def subscribe(self, topic: str) -> _Subscription:
        subscription = self._local.attach(topic, self._release)
        reader = self._readers.get(topic)
        if reader is None:
            reader = _StreamReader(
                self._redis.connection_pool.make_connection(),  # type: ignore[no-untyped-call]
                self._local,
                topic,
                self._prefix + topic,
                batch=self._batch,
                block_ms=self._block_ms,
            )
            self._readers[topic] = reader
        try:
            await reader.positioned.wait()
        except BaseException:
            await subscription.close()
            raise
        if subscription.closed:
            raise HubClosed("the event hub is closed")
        return subscription

    async def _release(self, subscription: _Subscription) -> None:
        if self._local.detach(subscription):
            reader = self._readers.pop(subscription.topic, None)
            if reader is not None:
                await reader.stop()

    async def close(self) -> None:
        self._closed = True
        await self._local.close()
        readers = list(self._readers.values())
        self._readers.clear()
        await asyncio.gather(*(reader.stop() for reader in readers))


def _client_name(key: str) -> str:
    # CLIENT SETNAME takes printable ASCII without spaces.
    return "hub-reader:" + "".join(c if "!" <= c <= "~" else "_" for c in key)


class _StreamReader:
    """Tails one stream on its own connection and fans each batch out before reading again."""

    def __init__(
        self,
        connection: AbstractConnection,
        fanout: InMemoryHub,
        topic: str,
        key: str,
        *,
        batch: int,
        block_ms: int,
    ) -> None:
        self._connection = connection
        self._fanout = fanout
        self._topic = topic
        self._key = key
        self._batch = batch
        self._block_ms = block_ms
        self._last_id: bytes | None = None  # of the last entry delivered; None: not yet known
        self.positioned = asyncio.Event()  # set once the first attempt to find the end is over
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"eventhub-reader:{key}")

    async def stop(self) -> None:
        self._stopping = True
        self.positioned.set()  # nobody may wait for a reader that will never start
        try:
            # One cancel is not always enough: on Python 3.11, asyncio.wait_for (which redis-py
            # writes commands with) loses a cancellation that lands as the write completes.
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait([self._task], timeout=0.05)
        finally:
            await self._connection.disconnect(nowait=True)

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                messages = await self._read()
            except Exception as exc:
                await self._connection.disconnect(nowait=True)
                failures += 1
                if failures == 1:
                    self._fanout.signal_lagged(self._topic, f"lost the Redis stream: {exc!r}")
                self.positioned.set()
                delay = min(_MAX_RETRY_SECONDS, _FIRST_RETRY_SECONDS * 2 ** (failures - 1))
                (log.warning if failures == 1 else log.debug)(
                    "event hub reader failed; retrying",
                    extra={"stream": self._key, "error": repr(exc), "failures": failures},
                )
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                continue
            if failures:
                log.info("event hub reader recovered", extra={"stream": self._key})
                self._fanout.signal_lagged(self._topic, "the Redis stream was unreachable")
                failures = 0
            self._fanout.deliver(self._topic, messages)

    async def _read(self) -> list[HubMessage]:
        """The next batch after ``_last_id``; the first call only finds the end of the stream."""
        if self._last_id is None:
            newest = await self._command("XREVRANGE", self._key, "+", "-", "COUNT", 1)
            self._last_id = newest[0][0] if newest else b"0-0"
            self.positioned.set()
            return []
        reply = await self._command(
            *("XREAD", "COUNT", self._batch, "BLOCK", self._block_ms),
            *("STREAMS", self._key, self._last_id),
            read_timeout=self._block_ms / 1000 + _READ_GRACE_SECONDS,
        )
        if not reply:  # BLOCK timed out
            return []
        # RESP2: [[key, entries]]; RESP3: {key: entries}
        [(_, entries)] = reply.items() if isinstance(reply, dict) else reply
        messages: list[HubMessage] = []
        for _, values in entries:
            fields = dict(zip(values[::2], values[1::2], strict=True))
            try:
                messages.append(HubMessage(int(fields[b"s"]), bytes(fields[b"p"])))
            except (KeyError, ValueError):
                log.error("skipping a malformed hub entry", extra={"stream": self._key})
        self._last_id = entries[-1][0]
        try:
            appended_ms = int(bytes(entries[0][0]).split(b"-", 1)[0])
            _stream_lag.record(max(0.0, time.time() - appended_ms / 1000))
        except ValueError:
            pass
        return messages

    async def _command(self, *args: Any, read_timeout: float | None = None) -> Any:
        connection = self._connection
        if not connection.is_connected:
            await connection.connect()  # type: ignore[no-untyped-call]
            await connection.send_command("CLIENT", "SETNAME", _client_name(self._key))
            await connection.read_response()
        await connection.send_command(*args, check_health=False)
        if read_timeout is None:
            return await connection.read_response(disable_decoding=True)
        # Not read_response(timeout=...): that returns None on expiry, as if BLOCK had.
        async with asyncio.timeout(read_timeout):
            return await connection.read_response(disable_decoding=True, timeout=math.inf)
