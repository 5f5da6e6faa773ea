"""The whole platform as `make run` starts it: five services, each healthy and reflectable."""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from corral.libs.app import ServiceApp
from corral.libs.config import SERVICE_NAMES, Settings
from corral.services import registry
from tests.support.grpc_tools import free_port, health_status, reflected_services

PROTO_SERVICE = {
    "identity": "corral.identity.v1.IdentityService",
    "session": "corral.session.v1.SessionService",
    "task": "corral.task.v1.TaskService",
    "runtime": "corral.runtime.v1.RuntimeService",
    "storage": "corral.storage.v1.StorageService",
}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[dict[str, ServiceApp]]:
    settings = Settings(
        data_dir=tmp_path,
        identity_http_port=0,
        **{f"{name}_port": 0 for name in SERVICE_NAMES},
    )
    apps = {name: await registry.build(name, settings) for name in SERVICE_NAMES}
    for app in apps.values():
        await app.start()
    yield apps
    await asyncio.gather(*(app.stop(0) for app in apps.values()))


async def test_every_service_is_serving_and_reflectable(stack: dict[str, ServiceApp]) -> None:
    for name, app in stack.items():
        assert await health_status(app.server.address) == "SERVING", name
        assert await health_status(app.server.address, PROTO_SERVICE[name]) == "SERVING", name
        listed = await reflected_services(app.server.address)
        assert PROTO_SERVICE[name] in listed
        assert "grpc.health.v1.Health" in listed


async def test_calls_without_a_token_are_refused_everywhere(stack: dict[str, ServiceApp]) -> None:
    """A method that is not public answers UNAUTHENTICATED before any handler runs."""
    for name, app in stack.items():
        pb2 = importlib.import_module(f"corral.{name}.v1.{name}_service_pb2")
        service = pb2.DESCRIPTOR.services_by_name[PROTO_SERVICE[name].rsplit(".", 1)[1]]
        method = next(m for m in service.methods if m.name.startswith("Get"))
        async with grpc.aio.insecure_channel(app.server.address) as channel:
            call = channel.unary_unary(
                f"/{service.full_name}/{method.name}",
                request_serializer=lambda raw: raw,
                response_deserializer=lambda raw: raw,
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(b"")
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, method.name)


def test_corral_dev_starts_all_five_and_stops_cleanly(tmp_path: Path) -> None:
    """What a user runs: `corral dev`, then `corral health`, then Ctrl-C."""
    env = {**os.environ, "CORRAL_DATA_DIR": str(tmp_path / "data"), "CORRAL_LOG_LEVEL": "WARNING"}
    env.update({f"CORRAL_{name.upper()}_PORT": str(free_port()) for name in SERVICE_NAMES})
    env["CORRAL_IDENTITY_HTTP_PORT"] = str(free_port())
    env["CORRAL_EDGE_PORT"] = str(free_port())
    env["CORRAL_CONSOLE_PORT"] = str(free_port())
    corral = [sys.executable, "-m", "corral.services.cli"]
    process = subprocess.Popen([*corral, "dev"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        banner = ""
        assert process.stderr is not None
        for line in process.stderr:
            banner += line
            if "stop:" in line:
                break
        assert "Corral is up" in banner, banner
        serving = {line.split()[0] for line in banner.splitlines() if "health: SERVING" in line}
        assert serving == set(SERVICE_NAMES), banner
        health = subprocess.run(
            [*corral, "health"], env=env, capture_output=True, text=True, timeout=30
        )
        assert health.returncode == 0, health.stdout + health.stderr
        assert health.stdout.count(": SERVING") == 5
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


def test_corral_migrate_brings_every_service_to_head(tmp_path: Path) -> None:
    env = {**os.environ, "CORRAL_DATA_DIR": str(tmp_path), "CORRAL_ENV": "production"}
    corral = [sys.executable, "-m", "corral.services.cli"]
    result = subprocess.run(
        [*corral, "migrate"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": at ") for line in result.stdout.splitlines())
    assert set(lines) == set(SERVICE_NAMES)
    assert all(revision != "None" for revision in lines.values())
    assert {p.name for p in tmp_path.glob("*.db")} == {f"{n}.db" for n in SERVICE_NAMES}
