"""Envoy's own stats reach Prometheus on a listener apart from the edge: the real Envoy serves
GET /stats/prometheus there and nothing else of its admin interface."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from corral.libs.config import Settings
from corral.libs.envoy import EDGE_SERVICES, Envoy, write_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), str(response.read().decode())
    except urllib.error.HTTPError as exc:
        return exc.code, ""


async def test_stats_listener_serves_prometheus_stats_only(tmp_path: Path) -> None:
    stats_port = free_port()
    settings = Settings(
        data_dir=tmp_path,
        edge_port=0,
        edge_admin_port=free_port(),
        edge_stats_port=stats_port,
        jwks_url="http://127.0.0.1:9/.well-known/jwks.json",
    )
    config = await asyncio.to_thread(
        write_config, settings, tmp_path, upstreams={n: ["127.0.0.1:9"] for n in EDGE_SERVICES}
    )
    envoy = Envoy(config, log_file=tmp_path / "envoy.log")
    await envoy.start()
    try:
        status, body = await asyncio.to_thread(get, stats_port, "/stats/prometheus")
        assert status == 200
        assert "envoy_cluster_upstream_cx_total" in body
        assert 'envoy_cluster_name="session"' in body
        for path, method in (("/clusters", "GET"), ("/quitquitquit", "POST"), ("/", "GET")):
            assert (await asyncio.to_thread(get, stats_port, path, method))[0] == 404, path
        # The public edge does not serve them either.
        status, body = await asyncio.to_thread(get, envoy.port, "/stats/prometheus")
        assert "envoy_cluster_upstream_cx_total" not in body
    finally:
        await envoy.stop()


def test_a_stats_listener_needs_a_fixed_admin_port(tmp_path: Path) -> None:
    from corral.libs.envoy import EdgeError, render

    settings = Settings(data_dir=tmp_path, edge_stats_port=9902, edge_admin_port=0)
    with pytest.raises(EdgeError, match="ADMIN_PORT"):
        render(settings, str(tmp_path / "corral.pb"))
