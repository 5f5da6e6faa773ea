"""Source addresses that cannot be gamed: identity's per-source login throttle and its audit
log take the caller's address from the kit's ``client_address``: a forwarded address
(``x-forwarded-for``, its last entry) is believed only from a trusted proxy (the edge).

The identity server trusts 127.0.0.2 only. A caller on 127.0.0.1 reaches it directly, as an
attacker inside the network would; the "edge" is a TCP relay whose upstream connections come
from 127.0.0.2 (the whole of 127/8 is loopback), carrying the x-forwarded-for the edge set.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from corral.identity.v1 import identity_service_pb2 as pb
from corral.identity.v1 import identity_service_pb2_grpc as rpc
from corral.identity.v1 import role_pb2, user_pb2
from corral.services.identity.config import IdentitySettings
from corral.services.identity.main import Dependencies, IdentityApp, build_server
from tests.support.grpc_tools import error_reason as _reason

EDGE = "127.0.0.2"
ROOT = ("root@corral.test", "correct horse battery staple")
PASSWORD = "a perfectly fine password"
PER_SOURCE = 3  # failed sign-ins tolerated per source address in the window
Metadata = tuple[tuple[str, str], ...]


class EdgeRelay:
    """Plays the edge at the TCP level: accepts on 127.0.0.1, connects upstream from EDGE."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", self._target, local_addr=(EDGE, 0)
        )
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._tasks.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()


@dataclass
class Setup:
    direct: rpc.IdentityServiceStub  # from 127.0.0.1: not a trusted proxy
    edge: rpc.IdentityServiceStub  # through the trusted proxy
    root: Metadata

    async def fail_login(self, stub: rpc.IdentityServiceStub, metadata: Metadata) -> str:
        """A wrong password for an account nobody has (only the source budget counts);
        the refusal's reason."""
        email = f"nobody-{uuid.uuid4().hex[:8]}@x.test"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Login(
                pb.LoginRequest(email=email, password="guess guess"), metadata=metadata
            )
        return _reason(caught.value)


def forwarded(*addresses: str) -> Metadata:
    return (("x-forwarded-for", ", ".join(addresses)),)


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    settings = IdentitySettings(
        env="development",
        data_dir=tmp_path,
        identity_port=0,
        identity_http_port=0,
        trusted_proxies=[f"{EDGE}/32"],
        identity_login_max_failures_per_source=PER_SOURCE,
        rate_limit_anonymous_per_minute=10_000,
        rate_limit_burst=1_000,
        bootstrap_admin_email=ROOT[0],
        bootstrap_admin_password=ROOT[1],
        identity_argon2_time_cost=1,
        identity_argon2_memory_kib=256,
        identity_argon2_parallelism=1,
        health_check_interval_seconds=30.0,
    )
    app: IdentityApp = await build_server(Dependencies(settings), port=0)
    port = await app.start()
    relay = EdgeRelay(port)
    await relay.start()
    direct = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    edge = grpc.aio.insecure_channel(f"127.0.0.1:{relay.port}")
    try:
        stub = rpc.IdentityServiceStub(edge)
        # The operator signs in through the edge, from an address of their own.
        login = await stub.Login(
            pb.LoginRequest(email=ROOT[0], password=ROOT[1]), metadata=forwarded("192.0.2.200")
        )
        root = (("authorization", f"Bearer {login.token.access_token}"),)
        yield Setup(rpc.IdentityServiceStub(direct), stub, root)
    finally:
        await direct.close()
        await edge.close()
        await relay.stop()
        await app.stop(0)


async def test_a_direct_caller_cannot_spread_failures_over_claimed_addresses(setup: Setup) -> None:
    for i in range(PER_SOURCE):
        claimed = (
            ("x-forwarded-for", f"203.0.113.{i}"),
            ("x-envoy-external-address", f"198.51.100.{i}"),
        )
        assert await setup.fail_login(setup.direct, claimed) == "INVALID_CREDENTIALS"
    # Every claimed address was ignored: all the failures counted against 127.0.0.1.
    fresh_claim = (("x-forwarded-for", "203.0.113.99"), ("x-envoy-external-address", "10.9.9.9"))
    assert await setup.fail_login(setup.direct, fresh_claim) == "LOGIN_THROTTLED"


async def test_a_direct_caller_cannot_lock_out_another_address(setup: Setup) -> None:
    victim = "198.51.100.7"
    for _ in range(PER_SOURCE + 1):
        await setup.fail_login(
            setup.direct, (("x-forwarded-for", victim), ("x-envoy-external-address", victim))
        )
    email = f"victim-{uuid.uuid4().hex[:8]}@default.test"
    await setup.edge.CreateUser(
        pb.CreateUserRequest(
            parent="organizations/default",
            user=user_pb2.User(
                email=email, display_name="v", role=role_pb2.ROLE_USER, password=PASSWORD
            ),
        ),
        metadata=setup.root,
    )
    # The real client at that address, through the edge, signs in.
    reply = await setup.edge.Login(
        pb.LoginRequest(email=email, password=PASSWORD), metadata=forwarded(victim)
    )
    assert reply.token.access_token


async def test_through_the_edge_the_forwarded_address_is_throttled_and_audited(
    setup: Setup,
) -> None:
    attacker, other = "203.0.113.50", "203.0.113.51"
    for i in range(PER_SOURCE):
        # Whatever the client put first in x-forwarded-for, the edge's own last entry counts.
        assert (
            await setup.fail_login(setup.edge, forwarded(f"10.0.0.{i}", attacker))
            == "INVALID_CREDENTIALS"
        )
    assert await setup.fail_login(setup.edge, forwarded(attacker)) == "LOGIN_THROTTLED"
    assert await setup.fail_login(setup.edge, forwarded(other)) == "INVALID_CREDENTIALS"
    # Neither the edge itself nor a direct caller is throttled by the attacker's failures.
    assert await setup.fail_login(setup.direct, ()) == "INVALID_CREDENTIALS"

    # The audit log names the forwarded address, never the edge's or a client-supplied one.
    events = await setup.edge.ListAuditEvents(
        pb.ListAuditEventsRequest(parent="organizations/-", page_size=100), metadata=setup.root
    )
    logins = [e for e in events.audit_events if e.action == "identity.login"]
    sources = {e.source_ip for e in logins}
    assert attacker in sources and other in sources and "192.0.2.200" in sources
    assert EDGE not in sources
    assert not {f"10.0.0.{i}" for i in range(PER_SOURCE)} & sources
    assert "127.0.0.1" in sources  # the direct caller, by its connection's address
