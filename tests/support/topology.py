"""A production-like Corral on loopback, started by a test: tests/faults, and the benchmarks that
need the production shape (issues 15 and 16).

- Its own PostgreSQL cluster (``initdb`` + ``pg_ctl`` from /usr/lib/postgresql/*/bin into a
  temporary folder, on a free port; as the ``postgres`` user when the test runs as root, since
  initdb refuses root) and its own ``redis-server``: never the machine's servers.
- ``corral migrate``, then the accounts an operator makes (``corral admin``: an organisation, a
  superuser admin, the services' internal account and its API key).
- One OS process per service, ``corral serve <service>`` in production mode: identity, storage
  (sessions' workspaces, under a storage root the runtimes share), N session replicas and N
  runtime replicas (session replica i calls runtime i mod N; they share one runtime root, as
  replicas share a volume), the offline model server as the model endpoint
  (a process of its own, like a real endpoint: it outlives a runtime), and Envoy
  (``libs/envoy.py``) in front of identity and every session replica.

Processes are ended only by the pid this module started them with (the cluster by its
postmaster's pid file, through ``pg_ctl``), and every child gets the parent-death signal, so
none outlives a test run that crashed.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from corral.libs.config import Settings
from corral.libs.envoy import EdgeError, Envoy, write_config
from corral.services.identity import admin
from corral.services.identity.config import IdentitySettings
from corral.services.runtime.process import TAG_VARIABLE
from tests.support.grpc_tools import free_port

ROOT = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
READY_SECONDS = 90.0  # generous: a loaded two-core machine starts Python services slowly
# Client channels that find a restarted server quickly (gRPC's default backoff reaches 2 min).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
SERVICES = ("identity", "session", "runtime", "storage")  # what runs here (and is migrated)
ORGANIZATION = "faults"
ADMIN_EMAIL = "admin@faults.test"
PASSWORD = "faults-topology-password"


class TopologyError(RuntimeError):
    """A part of the topology did not start or stop as it should."""


def require_binary(name: str, hint: str) -> str:
    """The binary's path; a skip when it is missing (a failure under CI=true)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed ({hint})"
        if IN_CI:
            pytest.fail(f"{message}; under CI=true this is a failure, not a skip", pytrace=False)
        pytest.skip(message)
    return path


def postgres_bin() -> Path:
    """The newest PostgreSQL's bin folder (Debian: /usr/lib/postgresql/<major>/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    initdb = str(found[-1]) if found else require_binary("initdb", "apt-get install postgresql")
    return Path(initdb).parent


def _pdeathsig(argv: Sequence[str]) -> list[str]:
    """``argv`` with SIGKILL as its parent-death signal (util-linux setpriv), when available."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else list(argv)


def _base_environment() -> dict[str, str]:
    """The test's environment without any Corral, model or tracing setting of its own."""
    prefixes = ("CORRAL_", "ANTHROPIC_", "OTEL_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


class OsProcess:
    """A child process: its command line, environment and log file; started (again) on demand,
    signalled by its own pid only."""

    def __init__(self, label: str, argv: Sequence[str], env: Mapping[str, str], logs: Path):
        self.label = label
        self.argv = list(argv)
        self.env = dict(env)
        self.log = logs / f"{label}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.alive:
            raise TopologyError(f"{self.label} is already running (pid {self.pid})")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as sink:
            sink.write(f"\n==== {self.label} starting at {time.time():.3f}\n".encode())
            sink.flush()
            self.popen = subprocess.Popen(
                _pdeathsig(self.argv),
                env=self.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise TopologyError(f"{self.label} was never started")
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            os.kill(self.pid, sig)

    async def wait_exit(self, within: float) -> bool:
        """Until the process has exited (and is reaped), within ``within`` s; whether it did."""
        deadline = time.monotonic() + within
        while self.alive:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def kill(self) -> None:
        """``kill -9`` this process (only it: not its group, not its children)."""
        self.signal(signal.SIGKILL)
        await self.wait_exit(30)

    async def stop(self, grace: float = 10.0) -> None:
        self.signal(signal.SIGTERM)
        if not await self.wait_exit(grace):
            await self.kill()

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def exited(self) -> TopologyError:
        code = None if self.popen is None else self.popen.returncode
        return TopologyError(f"{self.label} exited with status {code}:\n{self.tail()}")


class Service(OsProcess):
    """``corral serve <name>``: ready when its gRPC health check answers SERVING."""

    def __init__(
        self, name: str, replica: int, port: int, env: Mapping[str, str], logs: Path
    ) -> None:
        argv = [sys.executable, "-m", "corral.services.cli", "serve", name]
        super().__init__(f"{name}-{replica}", argv, env, logs)
        self.name = name
        self.replica = replica
        self.port = port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def ready(self, within: float = READY_SECONDS) -> None:
        deadline = time.monotonic() + within
        async with grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if not self.alive:
                    raise self.exited()
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    raise TopologyError(
                        f"{self.label} not SERVING after {within:g} s:\n{self.tail()}"
                    )
                await asyncio.sleep(0.1)


async def _port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class Listener(OsProcess):
    """A server process (Redis, the model endpoint) ready when its TCP port accepts."""

    def __init__(self, label: str, port: int, argv: Sequence[str], logs: Path) -> None:
        super().__init__(label, argv, _base_environment(), logs)
        self.port = port

    async def ready(self, within: float = READY_SECONDS) -> None:
        deadline = time.monotonic() + within
        while not await _port_open(self.port):
            if not self.alive:
                raise self.exited()
            if time.monotonic() > deadline:
                raise TopologyError(
                    f"{self.label} not listening after {within:g} s:\n{self.tail()}"
                )
            await asyncio.sleep(0.05)


class PostgresCluster:
    """A cluster of its own in a temporary folder: initdb, pg_ctl start/restart/stop."""

    def __init__(self, log_dir: Path) -> None:
        self.bin = postgres_bin()
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="corral-pg-"))
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self.log_copy = log_dir / "postgres.log"
        self.as_root = os.geteuid() == 0
        if self.as_root:  # initdb refuses root: the cluster belongs to `postgres`
            shutil.chown(self.folder, "postgres", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _owned(self, argv: Sequence[str]) -> list[str]:
        if not self.as_root:
            return list(argv)
        setpriv = require_binary("setpriv", "util-linux")
        return [setpriv, "--reuid=postgres", "--regid=postgres", "--init-groups", "--", *argv]

    async def _run(self, tool: str, *args: str, within: float = 120) -> None:
        output = self.folder / f"{tool}.out"
        with output.open("ab") as sink:
            child = await asyncio.create_subprocess_exec(
                *self._owned([str(self.bin / tool), *args]),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
            )
            try:
                code = await asyncio.wait_for(child.wait(), within)
            except TimeoutError:
                child.kill()
                await child.wait()
                raise
        if code != 0:
            raise TopologyError(f"{tool} {' '.join(args)} failed ({code}):\n{output.read_text()}")

    async def init(self) -> None:
        options = ["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"]
        await self._run("initdb", "-D", str(self.data), *options)
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.folder}'\nmax_connections = 300\n"
                # A test cluster: no fsync (the machine's disk is shared); restarts stay clean.
                "fsync = off\nfull_page_writes = off\n"
            )

    async def _pg_ctl(self, *args: str) -> None:
        """``pg_ctl`` on this cluster, waiting (60 s at most) for the action to complete."""
        await self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", *args
        )

    async def start(self) -> None:
        await self._pg_ctl("start")

    async def restart(self, mode: str = "fast") -> None:
        await self._pg_ctl("-m", mode, "restart")

    async def stop(self, mode: str = "fast") -> None:
        await self._pg_ctl("-m", mode, "stop")

    @property
    def pid(self) -> int | None:
        """The postmaster's pid, from its pid file (None when it is not running)."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.log_copy.write_bytes(self.log.read_bytes())
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass(frozen=True)
class AgentProcess:
    pid: int
    start: int  # clock ticks after boot: a pid alone may be reused
    cmdline: str

    @property
    def alive(self) -> bool:
        return _start_time(self.pid) == self.start


def _start_time(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def agent_processes(runtime_root: Path) -> list[AgentProcess]:
    """Every live process an agent of this topology runs: the runtime puts ``TAG_VARIABLE`` in
    the environment of each agent process (inherited by what it starts) and the session's
    directories under ``runtime_root`` in its HOME/CLAUDE_CONFIG_DIR."""
    root = str(runtime_root).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        tagged = any(v.startswith(TAG_VARIABLE.encode() + b"=") for v in environ)
        if tagged and any(root in v for v in environ):
            start = _start_time(int(entry))
            if start is not None:
                found.append(AgentProcess(int(entry), start, cmdline.decode(errors="replace")))
    return found


def descendants(root: int) -> list[AgentProcess]:
    """Every live descendant of process ``root`` (what it started, and what they started)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = Path(f"/proc/{entry}/stat").read_text(errors="replace")
            children.setdefault(int(text[text.rfind(")") + 2 :].split()[1]), []).append(int(entry))
    found, stack = [], list(children.get(root, []))
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            start = _start_time(pid)
            if start is not None:
                found.append(AgentProcess(pid, start, cmdline.decode(errors="replace")))
    return found


def kill_agent_processes(processes: Sequence[AgentProcess]) -> None:
    """SIGKILL each (by pid, if it is still the same process)."""
    for process in processes:
        if process.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)


@dataclass(frozen=True)
class Accounts:
    """What the operator made with ``corral admin``."""

    organization: str  # organizations/<id>
    admin_email: str
    admin_password: str
    service_api_key: str


class Topology:
    """The running platform; see the module's docstring. Start it with :func:`running_topology`."""

    def __init__(
        self,
        folder: Path,
        *,
        session_replicas: int = 2,
        runtime_replicas: int = 1,
        pool_size: int = 8,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.folder = folder
        self.logs = folder / "logs"
        self.runtime_root = folder / "runtime"
        self.postgres = PostgresCluster(self.logs)
        redis_port, model_port = free_port(), free_port()
        redis = require_binary("redis-server", "apt-get install redis-server")
        persistence = ["--save", "", "--appendonly", "no"]  # a restart comes back empty
        redis_argv = [redis, "--port", str(redis_port), "--bind", "127.0.0.1", *persistence]
        self.redis = Listener("redis", redis_port, [*redis_argv, "--dir", str(folder)], self.logs)
        model = [sys.executable, "-m", "corral.services.runtime.offline_model"]
        self.model = Listener("model", model_port, [*model, "--port", str(model_port)], self.logs)
        self.encryption_keys = admin.new_encryption_key()
        self.identity_http_port = free_port()
        self.env = {
            **_base_environment(),
            "CORRAL_ENV": "production",
            "CORRAL_HOST": "127.0.0.1",
            "CORRAL_DATA_DIR": str(folder / "data"),
            "CORRAL_DATABASE_URL": self.postgres.url,
            "CORRAL_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "CORRAL_ENCRYPTION_KEYS": self.encryption_keys,
            "CORRAL_IDENTITY_HTTP_PORT": str(self.identity_http_port),
            "CORRAL_JWKS_URL": f"http://127.0.0.1:{self.identity_http_port}/.well-known/jwks.json",
            "CORRAL_RUNTIME_ROOT": str(self.runtime_root),
            "CORRAL_STORAGE_ROOT": str(folder / "storage"),  # workspaces: storage's and runtimes'
            "CORRAL_RUNTIME_POOL_SIZE": str(pool_size),
            "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{model_port}",
            # Turns cost what the CLI says at list prices, so budgets and the ledger see cost.
            "CORRAL_OFFLINE_MODEL_PRICING": "list",
            "CORRAL_LOG_FORMAT": "text",
            "CORRAL_SHUTDOWN_GRACE_SECONDS": "3",
            "CORRAL_HEALTH_CHECK_INTERVAL_SECONDS": "1",
            # A lost replica's turns are found within seconds, not the production 30 s.
            "CORRAL_SESSION_TURN_LEASE_SECONDS": "8",
            "CORRAL_SESSION_HEARTBEAT_SECONDS": "5",
            # Sign-ins are not what is measured: a cheap argon2 keeps many users quick.
            "CORRAL_IDENTITY_ARGON2_TIME_COST": "1",
            "CORRAL_IDENTITY_ARGON2_MEMORY_KIB": "8192",
            "CORRAL_IDENTITY_ARGON2_PARALLELISM": "1",
            **(settings or {}),
        }
        self.identity = self._service("identity", 0, {})
        self.storage = self._service("storage", 0, {})
        self.runtimes = [self._service("runtime", i, {}) for i in range(runtime_replicas)]
        self.sessions = [
            self._service(
                "session",
                i,
                {
                    "CORRAL_RUNTIME_TARGET": self.runtimes[i % runtime_replicas].target,
                    "CORRAL_STORAGE_TARGET": self.storage.target,
                },
            )
            for i in range(session_replicas)
        ]
        self.envoy: Envoy | None = None
        self.accounts: Accounts | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _service(self, name: str, replica: int, extra: Mapping[str, str]) -> Service:
        port = free_port()
        env = {**self.env, f"CORRAL_{name.upper()}_PORT": str(port), **extra}
        if name != "identity":
            env["CORRAL_IDENTITY_TARGET"] = f"127.0.0.1:{self.identity.port}"
        return Service(name, replica, port, env, self.logs)

    @property
    def services(self) -> list[Service]:
        return [self.identity, self.storage, *self.runtimes, *self.sessions]

    @property
    def edge(self) -> str:
        """Envoy's address (host:port), where clients connect."""
        if self.envoy is None:
            raise TopologyError("the edge is not running")
        return self.envoy.url.removeprefix("http://")

    def channel(self, target: str) -> grpc.aio.Channel:
        """A client channel to ``target`` (the edge or one replica), closed with the topology."""
        if target not in self._channels:
            self._channels[target] = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        return self._channels[target]

    # -- starting ------------------------------------------------------------------------------

    async def start(self) -> None:
        self.redis.start()
        self.model.start()
        await self.postgres.init()
        await self.postgres.start()
        await asyncio.gather(self.redis.ready(), self.model.ready(), self._migrate())
        self.accounts = await self._bootstrap()
        for service in self.services:
            service.env["CORRAL_SERVICE_API_KEY"] = self.accounts.service_api_key
        self.identity.start()
        await self.identity.ready()
        for service in [self.storage, *self.runtimes, *self.sessions]:
            service.start()
        await asyncio.gather(*(s.ready() for s in [self.storage, *self.runtimes, *self.sessions]))
        await self.start_edge()

    async def _migrate(self) -> None:
        log = self.logs / "migrate.log"
        with log.open("ab") as sink:
            child = await asyncio.create_subprocess_exec(
                *_pdeathsig([sys.executable, "-m", "corral.services.cli", "migrate", *SERVICES]),
                env=self.env,
                cwd=ROOT,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
            code = await asyncio.wait_for(child.wait(), READY_SECONDS)
        if code != 0:
            raise TopologyError(f"corral migrate failed ({code}):\n{log.read_text()}")

    def admin_settings(self) -> IdentitySettings:
        """The settings `corral admin` runs with here (the identity service's)."""
        return IdentitySettings(
            env="production",
            data_dir=Path(self.env["CORRAL_DATA_DIR"]),
            database_url=self.postgres.url,
            redis_url=self.env["CORRAL_REDIS_URL"],
            encryption_keys=self.encryption_keys,
            identity_argon2_time_cost=int(self.env["CORRAL_IDENTITY_ARGON2_TIME_COST"]),
            identity_argon2_memory_kib=int(self.env["CORRAL_IDENTITY_ARGON2_MEMORY_KIB"]),
            identity_argon2_parallelism=int(self.env["CORRAL_IDENTITY_ARGON2_PARALLELISM"]),
        )

    async def admin(self, *argv: str) -> str:
        """``corral admin ARGV`` against identity's database; its standard output."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = await admin.run(list(argv), self.admin_settings())
        if code != 0:
            raise TopologyError(f"corral admin {' '.join(argv)} failed:\n{out.getvalue()}")
        return out.getvalue()

    async def _bootstrap(self) -> Accounts:
        """What deploy/README.md tells an operator to do on the first start."""
        org = ["--org", ORGANIZATION]
        await self.admin("create-org", ORGANIZATION, "--display-name", "Faults")
        superuser = ["--email", ADMIN_EMAIL, "--role", "admin", "--superuser"]
        await self.admin("create-user", *org, *superuser, "--password", PASSWORD)
        internal = ["--display-name", "Corral services", "--role", "admin", "--internal"]
        account = (await self.admin("create-service-account", *org, *internal)).strip()
        printed = await self.admin("create-api-key", account, "--display-name", "services")
        key = next(line for line in printed.splitlines() if line.startswith("api key:"))
        return Accounts(f"organizations/{ORGANIZATION}", ADMIN_EMAIL, PASSWORD, key.split()[2])

    async def start_edge(self) -> None:
        settings = Settings(
            env="production",
            host="127.0.0.1",
            data_dir=self.folder / "edge",
            edge_port=0,
            jwks_url=self.env["CORRAL_JWKS_URL"],
            protos_dir=ROOT / "protos",
            envoy_template=ROOT / "deploy" / "envoy" / "envoy.yaml.template",
        )
        nowhere = f"127.0.0.1:{free_port()}"  # task is not part of this topology
        upstreams = {
            "identity": [self.identity.target],
            "session": [s.target for s in self.sessions],
            "task": [nowhere],
            "storage": [self.storage.target],
        }
        config = await asyncio.to_thread(
            write_config, settings, self.folder / "edge", upstreams=upstreams, health_interval=1.0
        )
        self.envoy = Envoy(config, log_file=self.logs / "envoy.log")
        await self.envoy.start()
        await self.edge_sees_healthy()

    async def edge_sees_healthy(self, within: float = 60) -> None:
        """Until Envoy's health checks find identity and every session replica healthy."""
        assert self.envoy is not None
        wanted = {("identity", self.identity.target)} | {
            ("session", s.target) for s in self.sessions
        }
        try:
            await self.envoy.wait_healthy(wanted, within=within)
        except EdgeError as exc:
            raise TopologyError(str(exc)) from exc

    async def ensure_up(self) -> None:
        """Start again whatever is down (a test that failed half-way leaves things stopped), and
        wait until everything is ready and the edge routes to every replica."""
        if self.postgres.pid is None:
            await self.postgres.start()
        for listener in (self.redis, self.model):
            if not listener.alive:
                listener.start()
            await listener.ready()
        if not self.identity.alive:
            self.identity.start()
        await self.identity.ready()
        for service in [self.storage, *self.runtimes, *self.sessions]:
            if not service.alive:
                service.start()
        await asyncio.gather(*(s.ready() for s in self.services))
        if self.envoy is None or not self.envoy.running:
            await self.start_edge()
        await self.edge_sees_healthy()

    async def restart(self, service: Service) -> None:
        """Start ``service`` again (stopping it first if it runs) and wait until it serves."""
        if service.alive:
            await service.stop()
        service.start()
        await service.ready()

    def tails(self, lines: int = 30) -> str:
        """The end of every process's log, to tell what happened after a failure."""
        parts = [(p.label, p.tail(lines)) for p in [*self.services, self.redis, self.model]]
        for label, path in (("postgres", self.postgres.log), ("envoy", self.logs / "envoy.log")):
            with contextlib.suppress(OSError):
                parts.append(
                    (label, "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
                )
        return "\n".join(f"---- {label} ----\n{text}" for label, text in parts)

    # -- stopping ------------------------------------------------------------------------------

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(None)
        if self.envoy is not None:
            await self.envoy.stop()
        await asyncio.gather(*(s.stop() for s in self.services if s.alive))
        kill_agent_processes(agent_processes(self.runtime_root))
        for listener in (self.model, self.redis):
            await listener.stop()
        if self.postgres.pid is not None:
            with contextlib.suppress(TopologyError, TimeoutError):
                await self.postgres.stop("immediate")
        self.postgres.remove()


@contextlib.asynccontextmanager
async def running_topology(
    folder: Path,
    *,
    session_replicas: int = 2,
    runtime_replicas: int = 1,
    pool_size: int = 8,
    settings: Mapping[str, str] | None = None,
) -> AsyncIterator[Topology]:
    """The topology, started, and closed afterwards. ``settings``: more CORRAL_* variables for
    every service (they win over the topology's)."""
    require_binary("bwrap", "apt-get install bubblewrap: the runtime sandboxes its agents")
    topology = Topology(
        folder,
        session_replicas=session_replicas,
        runtime_replicas=runtime_replicas,
        pool_size=pool_size,
        settings=settings,
    )
    try:
        await topology.start()
        yield topology
    finally:
        await topology.close()
