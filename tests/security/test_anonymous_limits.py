"""The anonymous allowance is per client, through the real edge: one client hammering the
public sign-in endpoint is refused (429) while another client still gets through, and no header
a client sends changes whose allowance it spends.

Two clients on one machine: HTTP connections bound to different loopback addresses
(127.0.0.2, 127.0.0.3). Envoy appends the address it saw to x-forwarded-for; identity believes
that last entry because Envoy (on loopback) is a trusted proxy. A refusal is 429 with a
google.rpc.Status body whose ErrorInfo reason is RATE_LIMITED."""

from __future__ import annotations

import asyncio
import http.client
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from corral.libs.app import ServiceApp
from corral.libs.envoy import Envoy, start_edge
from corral.services import registry
from corral.services.identity.config import IdentitySettings

ANONYMOUS_PER_MINUTE = 3


@pytest.fixture(scope="module")
async def edge(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Envoy]:
    directory: Path = tmp_path_factory.mktemp("anonymous")
    settings = IdentitySettings(
        data_dir=directory,
        identity_port=0,
        identity_http_port=0,
        edge_port=0,
        rate_limit_anonymous_per_minute=ANONYMOUS_PER_MINUTE,
        log_level="WARNING",
    )
    app: ServiceApp = await registry.build("identity", settings)
    port = await app.start()
    http_port = app.jwks_http.port if getattr(app, "jwks_http", None) else 0  # type: ignore[attr-defined]
    settings = settings.model_copy(update={"identity_port": port, "identity_http_port": http_port})
    try:
        yield await start_edge(settings, [app])
    finally:
        await app.stop(0)


def _login(edge: Envoy, source: str, forwarded: str = "") -> int | str:
    """POST /v1/auth:login from ``source`` for an unknown email (a new one each time, so the
    per-account sign-in throttle stays out of it): 401 when admitted, the ErrorInfo reason
    when refused."""
    host, port = edge.url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10, source_address=(source, 0))
    headers = {"content-type": "application/json"}
    if forwarded:
        headers["x-forwarded-for"] = forwarded
    try:
        email = f"nobody-{uuid.uuid4().hex[:8]}@corral.test"
        body = json.dumps({"email": email, "password": "not-the-password"})
        connection.request("POST", "/v1/auth:login", body=body, headers=headers)
        response = connection.getresponse()
        answer = response.read()
        if response.status == 401:
            return 401
        details = json.loads(answer).get("details", [])
        return next((d["reason"] for d in details if "reason" in d), str(response.status))
    finally:
        connection.close()


async def _statuses(edge: Envoy, source: str, count: int, forwarded: str = "") -> list[int | str]:
    return [await asyncio.to_thread(_login, edge, source, forwarded) for _ in range(count)]


async def test_one_client_using_up_its_allowance_does_not_block_another(edge: Envoy) -> None:
    noisy = await _statuses(edge, "127.0.0.2", ANONYMOUS_PER_MINUTE + 2)
    assert noisy[:ANONYMOUS_PER_MINUTE] == [401] * ANONYMOUS_PER_MINUTE
    assert noisy[ANONYMOUS_PER_MINUTE:] == ["RATE_LIMITED", "RATE_LIMITED"]
    assert await _statuses(edge, "127.0.0.3", 1) == [401]  # its own allowance


async def test_a_forwarded_header_does_not_buy_a_fresh_allowance(edge: Envoy) -> None:
    """The noisy client claims other addresses: Envoy appends the real one last, and only that
    counts, so it stays refused."""
    spent = await _statuses(edge, "127.0.0.4", ANONYMOUS_PER_MINUTE)
    assert spent == [401] * ANONYMOUS_PER_MINUTE
    for claimed in ("203.0.113.1", "127.0.0.5", "198.51.100.9, 127.0.0.6"):
        assert await _statuses(edge, "127.0.0.4", 1, forwarded=claimed) == ["RATE_LIMITED"]
