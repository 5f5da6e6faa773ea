"""Composition root of the agent runtime: the model endpoint, the SDK, the store, the pool,
the service and its server (``compose`` wires them; ``build`` adds the real SDK).

With no ``ANTHROPIC_API_KEY`` the runtime starts the offline model server (a local stand-in
for the Messages API) in this process and points every agent at it, and says so loudly: its
answers are scripted, not Claude's. With a key, none of it runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from claude_agent_sdk.types import CanUseToolShadowedWarning
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from opentelemetry.metrics import Meter

from corral.libs.app import Infrastructure, ServiceApp
from corral.libs.auth.jwt import JwksSource
from corral.libs.config import Settings
from corral.libs.grpc.server import ServiceRegistration
from corral.runtime.v1 import runtime_service_pb2, runtime_service_pb2_grpc
from corral.services.runtime import model_endpoint
from corral.services.runtime.api import RuntimeApi
from corral.services.runtime.claude import ClaudeSdk
from corral.services.runtime.metrics import RuntimeMetrics, for_meter
from corral.services.runtime.model_endpoint import ModelEndpoint
from corral.services.runtime.offline_model import pricing as offline_pricing
from corral.services.runtime.pool import ProcessPool
from corral.services.runtime.sandbox import SandboxPolicy, SandboxUnavailable, command, prepare
from corral.services.runtime.sdk import AgentSdk
from corral.services.runtime.service import RuntimeConfig, RuntimeService
from corral.services.runtime.store import SessionStore

log = logging.getLogger("corral.runtime")

OFFLINE_API_KEY = "offline-model-no-key"


async def build(
    settings: Settings, *, port: int | None = None, jwks_source: JwksSource | None = None
) -> ServiceApp:
    """The runtime, with the Claude Agent SDK. ``jwks_source`` replaces identity's JWKS
    endpoint (tests, or one-process deployments)."""
    app, _ = await compose(settings, port=port, jwks_source=jwks_source)
    return app


async def compose(
    settings: Settings,
    sdk: AgentSdk | None = None,
    *,
    port: int | None = None,
    jwks_source: JwksSource | None = None,
    clock: Callable[[], float] = time.monotonic,
    meter: Meter | None = None,
    model_check_seconds: float = model_endpoint.CHECK_SECONDS,
) -> tuple[ServiceApp, RuntimeService]:
    """Wires the runtime: the SDK (by default the Claude Agent SDK, talking to the model
    endpoint, whose reachability is checked every ``model_check_seconds``), the session store,
    the process pool (``clock`` measures idleness), the service (started: its directories
    exist), its servicer and server, the idle-process reaper; its metrics go to ``meter``
    (default: the process's). The service is returned with the app, for tests that drive it."""
    resources = AsyncExitStack()
    endpoint: ModelEndpoint | None = None
    try:
        infra = Infrastructure(settings, "runtime", resources)
        metrics = for_meter(meter or infra.meter())
        charge = True  # an SDK handed in reports its own costs
        if sdk is None:
            sdk, base_url = await _claude_sdk(settings, resources)
            endpoint = ModelEndpoint(base_url, interval=model_check_seconds)
            charge = offline_pricing.charged(settings)
        service = await _service(settings, sdk, clock, metrics, charge=charge)
        resources.push_async_callback(service.close)
        api = RuntimeApi(service)
        registration = ServiceRegistration(
            runtime_service_pb2.DESCRIPTOR.services_by_name["RuntimeService"].full_name,
            lambda server: runtime_service_pb2_grpc.add_RuntimeServiceServicer_to_server(
                api, server
            ),
        )
        server = infra.server([registration], verifier=infra.verifier(jwks_source), port=port)
    except BaseException:
        await resources.aclose()
        raise

    async def reap_idle_processes() -> None:
        interval = max(0.5, min(settings.runtime_idle_seconds / 2, 30.0))
        while True:
            await asyncio.sleep(interval)
            try:
                await service.reap_idle()
            except Exception:
                log.exception("reaping idle agent processes failed")

    background = [reap_idle_processes]
    if endpoint is not None:
        await _report_model_endpoint(endpoint, server.health, metrics)
        service.model_endpoint = endpoint
        background.append(endpoint.run)
    app = RuntimeApp("runtime", server, resources, background=background, service=service)
    return app, service


@dataclass
class RuntimeApp(ServiceApp):
    """The runtime's server, which drains its turns before it stops: NOT_SERVING, then every
    running turn is interrupted and its stream carries its turn_result (with what it cost)
    before the server's own stop closes whatever calls remain."""

    service: RuntimeService | None = None

    async def stop(self, grace: float | None = None) -> None:
        if self.service is not None:
            await self.server.health.enter_graceful_shutdown()
            try:
                await self.service.drain()
            except Exception:
                log.exception("draining the runtime's turns failed")
        await super().stop(grace)


async def _report_model_endpoint(
    endpoint: ModelEndpoint, health: HealthServicer, metrics: RuntimeMetrics
) -> None:
    """The endpoint's reachability as a health service name of its own (UNKNOWN until the first
    check) and a metric. The runtime's own names (its readiness) do not follow it."""
    name = model_endpoint.SERVICE_NAME
    status = health_pb2.HealthCheckResponse

    async def report(reachable: bool) -> None:
        await health.set(name, status.SERVING if reachable else status.NOT_SERVING)

    endpoint.on_change = report
    metrics.track_endpoint(endpoint)
    await health.set(name, status.UNKNOWN)


async def _service(
    settings: Settings,
    sdk: AgentSdk,
    clock: Callable[[], float],
    metrics: RuntimeMetrics,
    *,
    charge: bool = True,
) -> RuntimeService:
    service = RuntimeService(
        RuntimeConfig(
            pool_size=settings.runtime_pool_size,
            idle_seconds=settings.runtime_idle_seconds,
            default_model=settings.runtime_model,
            permission_timeout_seconds=settings.runtime_permission_timeout_seconds,
            interrupt_grace_seconds=settings.runtime_interrupt_grace_seconds,
            replica_id=socket.gethostname(),
            charge_model_cost=charge,
        ),
        sdk,
        SessionStore(settings.runtime_dir(), settings.workspaces_dir()),
        ProcessPool(
            settings.runtime_pool_size,
            settings.runtime_idle_seconds,
            clock,
            max_waiting=settings.runtime_max_waiting_turns(),
        ),
        metrics,
    )
    await service.start()
    return service


async def _claude_sdk(settings: Settings, resources: AsyncExitStack) -> tuple[ClaudeSdk, str]:
    """The SDK, and the model endpoint's base URL its agents use."""
    # The runtime gates tools with a PreToolUse hook and can_use_tool together, on purpose.
    warnings.filterwarnings("ignore", category=CanUseToolShadowedWarning)
    policy = await sandbox_policy(settings)
    model_env = await _model_endpoint(settings, resources)
    sdk = ClaudeSdk(
        settings.runtime_dir(),
        model_env,
        # The CLI scrubs its tools' environment with a bubblewrap of its own, which cannot run
        # inside the agent's sandbox; there the tools share the CLI's user anyway (see README).
        # Nor as root unsandboxed: its user namespace cannot enter the workspaces storage gives
        # the agent user (0700), and a root agent on the host reads the CLI's /proc environ
        # regardless, so the scrub would hide nothing.
        scrub_tool_env=policy is None and os.geteuid() != 0 and _can_scrub_tool_env(model_env),
        sandbox=policy,
    )
    return sdk, model_env.get("ANTHROPIC_BASE_URL", model_endpoint.DEFAULT_BASE_URL)


async def sandbox_policy(settings: Settings) -> SandboxPolicy | None:
    """How agents are confined, or None (unsandboxed). Production refuses to run agents
    unsandboxed (sandboxing off, bubblewrap missing or not working) unless the operator opted
    out with CORRAL_RUNTIME_ALLOW_UNSANDBOXED; development warns and goes on."""
    allowed = settings.is_development or settings.runtime_allow_unsandboxed
    if settings.runtime_sandbox == "off":
        if not allowed:
            raise SandboxUnavailable(
                "CORRAL_RUNTIME_SANDBOX=off in production needs"
                " CORRAL_RUNTIME_ALLOW_UNSANDBOXED=true"
            )
        log.warning("agents run UNSANDBOXED (CORRAL_RUNTIME_SANDBOX=off): they can read the host")
        return None
    policy = SandboxPolicy(
        uid=settings.runtime_agent_uid,
        gid=settings.runtime_agent_gid,
        read_only=tuple(settings.runtime_sandbox_read_only),
    )
    try:
        policy.require()
        await _probe(policy, settings.runtime_dir())
    except SandboxUnavailable as exc:
        if not allowed:
            raise
        log.warning("agents run UNSANDBOXED: %s", exc)
        return None
    return policy


async def _probe(policy: SandboxPolicy, root: Path) -> None:
    """Run ``true`` in a sandbox once: bubblewrap may be installed but not usable here (no user
    namespaces, no privileges)."""
    with tempfile.TemporaryDirectory(prefix="sandbox-probe-", dir=_existing(root)) as scratch:
        workspace, config = Path(scratch) / "workspace", Path(scratch) / "config"
        workspace.mkdir()  # as storage makes a session's
        await asyncio.to_thread(prepare, policy, workspace=workspace, config_dir=config)
        argv = command(policy, workspace=workspace, config_dir=config, cli=Path("/usr/bin/true"))
        child = await asyncio.create_subprocess_exec(
            *argv,
            "/usr/bin/true",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await child.communicate()
    if child.returncode != 0:
        raise SandboxUnavailable(
            f"bubblewrap cannot start a sandbox here: {err.decode(errors='replace').strip()}"
        )


def _existing(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return root


async def _model_endpoint(settings: Settings, resources: AsyncExitStack) -> dict[str, str]:
    """ANTHROPIC_BASE_URL / ANTHROPIC_API_KEY for the agents."""
    key = settings.anthropic_api_key.get_secret_value()
    if key:
        env = {"ANTHROPIC_API_KEY": key}
        if settings.anthropic_base_url:
            env["ANTHROPIC_BASE_URL"] = settings.anthropic_base_url
        return env
    if settings.anthropic_base_url:
        log.warning(
            "ANTHROPIC_API_KEY is not set: agents use the model server at %s without a key",
            settings.anthropic_base_url,
        )
        return {
            "ANTHROPIC_BASE_URL": settings.anthropic_base_url,
            "ANTHROPIC_API_KEY": OFFLINE_API_KEY,
        }
    from corral.services.runtime.offline_model import start

    server, bound = await start("127.0.0.1", 0)

    async def close() -> None:
        server.close()
        await server.wait_closed()

    resources.push_async_callback(close)
    url = f"http://127.0.0.1:{bound}"
    log.warning(
        "ANTHROPIC_API_KEY is not set: agents talk to the OFFLINE MODEL server at %s, a local "
        "scripted stand-in. Its answers are NOT from Claude. Set ANTHROPIC_API_KEY for real ones."
        " %s.",
        url,
        offline_pricing.ANNOUNCEMENT
        if not offline_pricing.charged(settings)
        else "Its turns are charged at Claude's list prices (CORRAL_OFFLINE_MODEL_PRICING=list)",
    )
    return {"ANTHROPIC_BASE_URL": url, "ANTHROPIC_API_KEY": OFFLINE_API_KEY}


def _can_scrub_tool_env(model_env: dict[str, str]) -> bool:
    """The CLI strips credentials from its tools' environment only with bubblewrap installed."""
    if shutil.which("bwrap"):
        return True
    if model_env.get("ANTHROPIC_API_KEY") != OFFLINE_API_KEY:
        log.warning(
            "bubblewrap (bwrap) is not installed: agents' tools can read ANTHROPIC_API_KEY from "
            "their environment. Install bubblewrap to have the Claude CLI scrub it."
        )
    return False
