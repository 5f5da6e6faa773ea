"""Settings from environment variables (prefix ``CORRAL_``); every one is listed in README.md."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from corral.libs.crypto import KeyRing, load_key_ring

SERVICE_NAMES: tuple[str, ...] = ("identity", "session", "task", "runtime", "storage")
DEFAULT_PORTS: dict[str, int] = {
    "identity": 50051,
    "session": 50052,
    "task": 50053,
    "runtime": 50054,
    "storage": 50055,
}


class Settings(BaseSettings):
    """Process-wide settings. Construct once in a composition root; never at import time."""

    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="ignore")

    env: Literal["development", "production"] = "development"
    data_dir: Path = Path(".corral")
    host: str = "127.0.0.1"

    # Databases: one URL for all services (PostgreSQL: each service gets its own schema), or
    # CORRAL_<SERVICE>_DATABASE_URL per service. Empty means SQLite under data_dir.
    database_url: str = ""
    identity_database_url: str = ""
    session_database_url: str = ""
    task_database_url: str = ""
    runtime_database_url: str = ""
    storage_database_url: str = ""
    database_pool_size: int = 10
    auto_migrate: bool | None = None  # default: on in development, off in production

    # Redis: empty means in-process implementations (development only).
    redis_url: str = ""

    # Request rate limits per caller and service (GCRA; shared through Redis when configured).
    rate_limit_per_minute: int = 600
    rate_limit_anonymous_per_minute: int = 60
    rate_limit_burst: int = 50
    # Corral's own services calling as themselves (tokens with the `service` role): their own,
    # generous allowance per service account and service, apart from any organisation's.
    rate_limit_service_per_minute: int = Field(default=60_000, ge=1)
    # Who may tell a service the real client address (the edge): the last x-forwarded-for
    # entry is believed only from these networks. Set it to the edge's addresses in production.
    trusted_proxies: list[str] = Field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])

    # Ports (0 picks a free one) and addresses other services are reached at.
    identity_port: int = DEFAULT_PORTS["identity"]
    session_port: int = DEFAULT_PORTS["session"]
    task_port: int = DEFAULT_PORTS["task"]
    runtime_port: int = DEFAULT_PORTS["runtime"]
    storage_port: int = DEFAULT_PORTS["storage"]
    identity_target: str = ""
    session_target: str = ""
    task_target: str = ""
    runtime_target: str = ""
    storage_target: str = ""

    # Tokens: every service verifies bearer JWTs itself against identity's JWKS.
    jwt_issuer: str = "corral-identity"
    jwt_audience: str = "corral"
    jwt_algorithms: list[str] = Field(default_factory=lambda: ["ES256", "EdDSA"])
    jwks_url: str = ""  # empty: http://<host>:<identity http port>/.well-known/jwks.json
    jwks_cache_seconds: float = 300.0
    # How often each service re-reads the revocation feed (disabled users, revoked keys, ...).
    revocation_refresh_seconds: float = 1.0
    identity_http_port: int = 8081

    # This service's own credentials (an internal service account's API key), for the calls it
    # makes as itself: the usage ledger and the audit log. In development identity creates one
    # on first start and leaves it in <data_dir>/service-api-key.
    service_api_key: str = ""

    # TLS between services (libs/tls.py): a certificate and key make a service serve TLS only; a
    # CA bundle makes it (and the edge) call the others over TLS.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    # TLS at the edge: Envoy terminates it for clients (HTTP/2 and HTTP/1.1 by ALPN).
    edge_tls_cert_file: Path | None = None
    edge_tls_key_file: Path | None = None

    # Secrets at rest (MCP secrets, policy secrets): AES-256-GCM keys, `id:base64key,...`, the
    # first one encrypts. Production refuses to start without; development makes one under
    # data_dir (libs/crypto.py).
    encryption_keys: SecretStr = SecretStr("")

    # The edge (Envoy): one port in front of every service; `corral dev` starts it when enabled.
    edge_enabled: bool = True
    edge_port: int = 8080
    edge_admin_port: int = 0  # Envoy's admin interface, on loopback only; 0 picks a free port
    # Envoy's stats for Prometheus (GET /stats/prometheus) on a listener of their own, apart from
    # the edge; needs a fixed edge_admin_port. Unset: none (read the loopback admin port).
    edge_stats_port: int | None = None
    cors_origins: list[str] = Field(
        default_factory=lambda: [
            "http://localhost:8080",
            "http://127.0.0.1:8080",
            "http://localhost:5173",
            "http://127.0.0.1:5173",
            "http://localhost:8090",  # the web console (console_port)
            "http://127.0.0.1:8090",
        ]
    )
    # The web console (libs/web-console/dist): `corral dev` serves it on this port.
    console_enabled: bool = True
    console_port: int = 8090

    # Files of the repository the edge and the console read (relative paths are from the working
    # directory: the repository root, where `make run` runs). The Python package ships none of
    # them; set these when running from elsewhere.
    protos_dir: Path = Path("protos")
    envoy_template: Path = Path("deploy/envoy/envoy.yaml.template")
    console_dir: Path = Path("libs/web-console/dist")

    # Sessions: quiet streams get a heartbeat this often (keep it under proxies' idle timeouts).
    session_heartbeat_seconds: float = 15.0
    # A turn whose session-service process stops renewing its lease this long is ended as
    # FAILED by any replica (the process is gone, and the sender's token with it).
    session_turn_lease_seconds: float = 30.0

    # Behaviour of the gRPC servers.
    shutdown_grace_seconds: float = 10.0
    health_check_interval_seconds: float = 5.0
    default_deadline_seconds: float = 10.0
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"

    # Agent runtime: one Claude CLI process per live session, at most runtime_pool_size of them;
    # its own state (transcripts, config directories) under runtime_root (default
    # <data_dir>/runtime). Agents work in storage's workspaces (see workspaces_dir).
    runtime_root: Path | None = None
    runtime_pool_size: int = Field(default=8, ge=1)
    # Turns that may wait for a process when every one is running a turn (in order of arrival);
    # unset: 4 x runtime_pool_size; 0: none wait (refused POOL_EXHAUSTED at once).
    runtime_pool_queue_size: int | None = Field(default=None, ge=0)
    runtime_idle_seconds: float = Field(default=600.0, gt=0)
    runtime_model: str = "claude-sonnet-4-5"
    runtime_permission_timeout_seconds: float = Field(default=60.0, gt=0)
    runtime_interrupt_grace_seconds: float = Field(default=5.0, gt=0)
    # Agents in sandboxes (services/runtime/sandbox.py): `bwrap` (bubblewrap) or `off`.
    # Production refuses `off` (or a missing bwrap) unless runtime_allow_unsandboxed is true;
    # development warns and runs unsandboxed when bwrap is missing.
    runtime_sandbox: Literal["bwrap", "off"] = "bwrap"
    runtime_allow_unsandboxed: bool = False
    # The user agents run as when the runtime runs as root; storage, when it runs as root,
    # gives the files it writes into workspaces to the same user.
    runtime_agent_uid: int = Field(default=10001, ge=1)
    runtime_agent_gid: int = Field(default=10001, ge=1)
    # Extra paths agents may read (e.g. the virtualenv an MCP server runs from).
    runtime_sandbox_read_only: list[Path] = Field(default_factory=list)
    # A turn's spending cap when neither its session nor its organisation's policy sets one.
    session_default_turn_budget_usd: float = Field(default=1.0, gt=0)
    # The model endpoint, under the standard names. No key: the runtime starts the offline model
    # server (a local stand-in, never the real model) and says so loudly.
    anthropic_api_key: SecretStr = Field(
        default=SecretStr(""), validation_alias=AliasChoices("anthropic_api_key")
    )
    anthropic_base_url: str = Field(default="", validation_alias=AliasChoices("anthropic_base_url"))
    # What the offline model's turns cost: "free" (nothing, the default: its costs are invented)
    # or "list" (Claude's list prices, as the CLI computes them; to exercise budgets).
    offline_model_pricing: Literal["free", "list"] = "free"

    # Storage: workspaces (the agents' working directories), uploads and the local blob store
    # under storage_root (default <data_dir>/storage), a filesystem the runtime shares
    # (ReadWriteMany in Kubernetes); the largest file and workspace it accepts.
    storage_root: Path | None = None
    storage_max_file_bytes: int = Field(default=5 * 1024**3, ge=1)
    storage_max_workspace_bytes: int = Field(default=20 * 1024**3, ge=1)
    # Where reports, archives and upload parts are kept: `local` (under storage_root) or `s3`,
    # any S3-compatible object store (services/storage/README.md). Credentials: the key pair (the
    # secret inline or in a mounted file), or neither for botocore's chain (AWS_* variables,
    # profile, instance or pod role). Path-style addressing for MinIO and most self-hosted stores.
    storage_blob: Literal["local", "s3"] = "local"
    storage_s3_endpoint_url: str = ""  # empty: AWS S3 in storage_s3_region
    storage_s3_bucket: str = ""
    storage_s3_region: str = "us-east-1"
    storage_s3_access_key_id: str = ""
    storage_s3_secret_access_key: SecretStr = SecretStr("")
    storage_s3_secret_access_key_file: Path | None = None
    storage_s3_path_style: bool = False
    storage_s3_ca_file: Path | None = None  # a private CA for the endpoint's certificate
    storage_s3_part_size: int = Field(default=8 * 1024**2, ge=5 * 1024**2, le=5 * 1024**3)

    # Metrics (libs/metrics.py): Prometheus' text format at http://<host>:<port>/metrics. One
    # endpoint for the process (metrics_port), or one per service (<service>_metrics_port, which
    # wins); 0 picks a free port, unset serves none. OTLP too when the endpoint below is set.
    metrics_port: int | None = None
    identity_metrics_port: int | None = None
    session_metrics_port: int | None = None
    task_metrics_port: int | None = None
    runtime_metrics_port: int | None = None
    storage_metrics_port: int | None = None
    metrics_enabled: bool = True  # off: no instruments are recorded (the benchmark's baseline)

    # Tracing: OTLP when an endpoint is configured (the standard OTEL_* variables), else none.
    otel_exporter_otlp_endpoint: str = Field(
        default="", validation_alias="OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    otel_service_namespace: str = "corral"

    @property
    def is_development(self) -> bool:
        return self.env == "development"

    @property
    def migrate_on_start(self) -> bool:
        return self.is_development if self.auto_migrate is None else self.auto_migrate

    def database_url_for(self, service: str) -> str:
        url = str(getattr(self, f"{service}_database_url", "")) or self.database_url
        if url:
            return url
        return f"sqlite+aiosqlite:///{(self.data_dir / f'{service}.db').resolve()}"

    def port_for(self, service: str) -> int:
        return int(getattr(self, f"{service}_port"))

    def metrics_port_for(self, service: str) -> tuple[int | None, bool]:
        """The metrics port of ``service`` and whether it is its own (else the process's)."""
        own = getattr(self, f"{service}_metrics_port", None)
        return (int(own), True) if own is not None else (self.metrics_port, False)

    def target_for(self, service: str) -> str:
        return (
            str(getattr(self, f"{service}_target", "")) or f"{self.host}:{self.port_for(service)}"
        )

    def runtime_dir(self) -> Path:
        return (self.runtime_root or self.data_dir / "runtime").resolve()

    def storage_dir(self) -> Path:
        return (self.storage_root or self.data_dir / "storage").resolve()

    def workspaces_dir(self) -> Path:
        """Where the agents' working directories are, ``<id>/`` each: storage makes them and
        the runtime runs agents in them, so both read this one setting (storage_root)."""
        return self.storage_dir() / "workspaces"

    def runtime_max_waiting_turns(self) -> int:
        if self.runtime_pool_queue_size is None:
            return 4 * self.runtime_pool_size
        return self.runtime_pool_queue_size

    def resolved_service_api_key(self) -> str:
        if self.service_api_key:
            return self.service_api_key
        path = self.data_dir / "service-api-key"
        return path.read_text().strip() if path.exists() else ""

    def key_ring(self) -> KeyRing:
        return load_key_ring(
            self.encryption_keys.get_secret_value(),
            production=not self.is_development,
            data_dir=self.data_dir,
        )

    def jwks_endpoint(self) -> str:
        return (
            self.jwks_url or f"http://{self.host}:{self.identity_http_port}/.well-known/jwks.json"
        )
