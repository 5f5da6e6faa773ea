"""Identity's own settings (on top of the shared ones; same ``CORRAL_`` environment prefix)."""

from __future__ import annotations

from corral.libs.config import Settings


class IdentitySettings(Settings):
    # PostgreSQL schema of identity's tables (tests use a fresh one each).
    identity_database_schema: str = "identity"
    identity_access_token_ttl_seconds: int = 900
    identity_refresh_token_ttl_seconds: int = 30 * 86400
    # How long a retired signing key stays in the JWKS; default: access-token lifetime + 60 s.
    identity_key_retirement_seconds: float | None = None
    # Legacy, read-only: the key that sealed private signing keys before the shared key ring
    # (CORRAL_ENCRYPTION_KEYS). Set it once so identity re-seals them under the ring at start.
    identity_key_encryption_key: str = ""
    # argon2id cost (RFC 9106 "second recommended" profile by default).
    identity_argon2_time_cost: int = 3
    identity_argon2_memory_kib: int = 65536
    identity_argon2_parallelism: int = 4
    # Login throttling: failures tolerated per account and per source address in the window.
    identity_login_max_failures: int = 5
    identity_login_max_failures_per_source: int = 50
    identity_login_window_seconds: float = 900.0
    # How often unsettled, expired usage reservations are given back.
    identity_reservation_sweep_seconds: float = 30.0
    # The first start in development creates organizations/default and this superuser.
    bootstrap_admin_email: str = ""
    bootstrap_admin_password: str = ""

    @property
    def key_retirement_seconds(self) -> float:
        if self.identity_key_retirement_seconds is not None:
            return self.identity_key_retirement_seconds
        return self.identity_access_token_ttl_seconds + 60.0


def identity_settings(settings: Settings) -> IdentitySettings:
    """Shared settings plus identity's own (read from the environment when not given)."""
    if isinstance(settings, IdentitySettings):
        return settings
    return IdentitySettings(**settings.model_dump(exclude={"otel_exporter_otlp_endpoint"}))
