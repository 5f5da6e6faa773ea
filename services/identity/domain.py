"""Identity's domain: principals, roles and who may do what, quotas and the usage ledger.

Plain Python: no grpc, no SQLAlchemy. Errors are the kit's categories with stable reasons.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from corral.libs.auth.caller import SERVICE_ROLE, SUPERUSER_ROLE, Caller
from corral.libs.errors import FailedPrecondition, NotFound, PermissionDenied
from corral.libs.etags import etag_of
from corral.libs.names import ResourcePattern

MIN_PASSWORD_LENGTH = 12
ORGANIZATION_ID = re.compile(r"^[a-z][a-z0-9-]{2,62}$")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def now() -> float:
    return time.time()


class Role(StrEnum):
    ADMIN = "admin"
    USER = "user"
    VIEWER = "viewer"


class State(StrEnum):
    ACTIVE = "active"
    DISABLED = "disabled"


# ---- resource names (one pattern per resource in protos/corral/identity/v1) ----

ORGANIZATION = ResourcePattern("organizations/{organization}")
USER = ResourcePattern("organizations/{organization}/users/{user}")
SERVICE_ACCOUNT = ResourcePattern("organizations/{organization}/serviceAccounts/{service_account}")
API_KEY = ResourcePattern(
    "organizations/{organization}/serviceAccounts/{service_account}/keys/{key}"
)
ORGANIZATION_QUOTA = ResourcePattern("organizations/{organization}/quota")
USER_QUOTA = ResourcePattern("organizations/{organization}/users/{user}/quota")
ORGANIZATION_USAGE_REPORT = ResourcePattern("organizations/{organization}/usageReport")
USER_USAGE_REPORT = ResourcePattern("organizations/{organization}/users/{user}/usageReport")
RESERVATION = ResourcePattern("organizations/{organization}/usageReservations/{usage_reservation}")
AUDIT_EVENT = ResourcePattern("organizations/{organization}/auditEvents/{audit_event}")
SIGNING_KEY = ResourcePattern("signingKeys/{signing_key}")


# ---- entities ----


@dataclass
class Organization:
    id: str
    display_name: str
    state: State = State.ACTIVE
    create_time: float = field(default_factory=now)
    update_time: float = field(default_factory=now)
    version: int = 1

    @property
    def name(self) -> str:
        return ORGANIZATION.format(self.id)

    @property
    def etag(self) -> str:
        return etag_of(self.name, self.version)


@dataclass
class User:
    id: str
    organization_id: str
    email: str
    display_name: str
    role: Role
    password_hash: str
    state: State = State.ACTIVE
    superuser: bool = False
    token_generation: int = 0
    create_time: float = field(default_factory=now)
    update_time: float = field(default_factory=now)
    last_login_time: float | None = None
    version: int = 1

    @property
    def name(self) -> str:
        return USER.format(self.organization_id, self.id)

    @property
    def etag(self) -> str:
        return etag_of(self.name, self.version)

    @property
    def token_roles(self) -> list[str]:
        return [self.role.value, SUPERUSER_ROLE] if self.superuser else [self.role.value]


@dataclass
class ServiceAccount:
    id: str
    organization_id: str
    display_name: str
    description: str
    role: Role
    internal: bool = False  # a Corral service's own account: its tokens carry the service role
    deleted: bool = False
    token_generation: int = 0
    create_time: float = field(default_factory=now)
    update_time: float = field(default_factory=now)
    version: int = 1

    @property
    def name(self) -> str:
        return SERVICE_ACCOUNT.format(self.organization_id, self.id)

    @property
    def etag(self) -> str:
        return etag_of(self.name, self.version)


class ApiKeyState(StrEnum):
    ACTIVE = "active"
    EXPIRED = "expired"
    REVOKED = "revoked"


@dataclass
class ApiKey:
    id: str
    organization_id: str
    service_account_id: str
    display_name: str
    lookup: str  # the public part of the key, used to find it
    secret_hash: str
    expire_time: float | None
    create_time: float = field(default_factory=now)
    last_use_time: float | None = None
    revoke_time: float | None = None

    @property
    def name(self) -> str:
        return API_KEY.format(self.organization_id, self.service_account_id, self.id)

    @property
    def key_prefix(self) -> str:
        return f"crl_{self.lookup}"

    def state_at(self, at: float) -> ApiKeyState:
        if self.revoke_time is not None:
            return ApiKeyState.REVOKED
        if self.expire_time is not None and self.expire_time <= at:
            return ApiKeyState.EXPIRED
        return ApiKeyState.ACTIVE


class KeyState(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    RETIRED = "retired"
    REVOKED = "revoked"


@dataclass
class SigningKeyRecord:
    kid: str
    algorithm: str
    state: KeyState
    private_key: bytes  # PEM, sealed by the key store's cipher
    public_jwk: dict[str, str]
    create_time: float = field(default_factory=now)
    activate_time: float | None = None
    retire_time: float | None = None
    unpublish_time: float | None = None

    def published_at(self, at: float) -> bool:
        if self.state in (KeyState.PENDING, KeyState.ACTIVE):
            return True
        return self.unpublish_time is not None and self.unpublish_time > at


@dataclass
class RefreshToken:
    id: str
    family_id: str
    user_id: str
    organization_id: str
    token_hash: str
    expire_time: float
    create_time: float = field(default_factory=now)
    used_time: float | None = None
    family_revoked: bool = False


# ---- who may do what ----


@dataclass(frozen=True)
class Principal:
    """The caller as identity's policy sees it (built from the verified access token)."""

    subject: str
    organization_id: str
    role: Role | None
    superuser: bool = False
    service: bool = False
    token_id: str = ""

    @classmethod
    def from_caller(cls, caller: Caller) -> Principal:
        (org,) = ORGANIZATION.parse(caller.organization) or ("",)
        role = next(
            (Role(r) for r in (Role.ADMIN, Role.USER, Role.VIEWER) if r in caller.roles), None
        )
        return cls(
            subject=caller.subject,
            organization_id=org,
            role=role,
            superuser=caller.is_superuser,
            service=SERVICE_ROLE in caller.roles,
            token_id=caller.token_id,
        )

    def member_of(self, org_id: str) -> bool:
        return self.superuser or self.organization_id == org_id

    def see_org(self, org_id: str) -> None:
        """Another organisation's resources do not exist for this caller."""
        if not self.member_of(org_id):
            raise NotFound(f"{ORGANIZATION.format(org_id)} was not found", reason="NOT_FOUND")

    def is_admin_of(self, org_id: str) -> bool:
        return self.superuser or (self.organization_id == org_id and self.role is Role.ADMIN)

    def require_admin(self, org_id: str) -> None:
        self.see_org(org_id)
        if not self.is_admin_of(org_id):
            raise PermissionDenied(
                "this needs the admin role in the organization", reason="ROLE_INSUFFICIENT"
            )

    def require_self_or_admin(self, org_id: str, subject: str) -> None:
        self.see_org(org_id)
        if self.subject != subject and not self.is_admin_of(org_id):
            raise PermissionDenied(
                "only the principal itself or an admin may do this", reason="ROLE_INSUFFICIENT"
            )

    def require_superuser(self, org_id: str | None = None) -> None:
        if org_id is not None:
            self.see_org(org_id)
        if not self.superuser:
            raise PermissionDenied("this needs a platform superuser", reason="SUPERUSER_REQUIRED")

    def sees_service_account(self, account: ServiceAccount) -> bool:
        """Corral's internal service accounts (whose tokens carry the ``service`` role) exist
        only for superusers (``corral admin`` acts as one) and for themselves: to an admin of
        their organization they are as absent as a missing account."""
        return not account.internal or self.superuser or self.subject == account.name

    def require_manage_service_account(self, account: ServiceAccount) -> None:
        """Keys, updates and deletion of an internal service account are a superuser's only
        (anyone else could mint a key and act as Corral's services across every tenant):
        NOT_FOUND to those who cannot see it, PERMISSION_DENIED to the account itself."""
        if not account.internal or self.superuser:
            return
        if not self.sees_service_account(account):
            raise NotFound(f"{account.name} was not found", reason="NOT_FOUND")
        raise PermissionDenied(
            "only a superuser may manage an internal service account",
            reason="SUPERUSER_REQUIRED",
        )

    def require_manage_user(self, user: User) -> None:
        """A superuser's account is changed (email, role, password reset, state) by itself or
        by another superuser, never by an admin of its organization: a reset password would
        let that admin sign in as a superuser."""
        if user.superuser and not self.superuser and self.subject != user.name:
            raise PermissionDenied(
                "only a superuser may change a superuser's account", reason="SUPERUSER_REQUIRED"
            )

    def require_service(self) -> None:
        if not (self.service or self.superuser):
            raise PermissionDenied("only Corral services may call this", reason="SERVICE_REQUIRED")


def ensure_not_last_admin(active_admins_left: int) -> None:
    if active_admins_left < 1:
        raise FailedPrecondition(
            "the organization would be left without an active admin", reason="LAST_ADMIN"
        )


# ---- quotas and the ledger ----


class UsageKind(StrEnum):
    SESSIONS = "sessions"
    RUNS = "runs"
    TOKENS = "tokens"
    COST_USD_MICROS = "cost_usd_micros"
    STORAGE_BYTES = "storage_bytes"

    @property
    def is_gauge(self) -> bool:
        return self in (UsageKind.SESSIONS, UsageKind.RUNS, UsageKind.STORAGE_BYTES)


LIMIT_FIELDS: tuple[str, ...] = (
    "max_concurrent_sessions",
    "max_concurrent_runs",
    "requests_per_minute",
    "tokens_per_month",
    "cost_usd_micros_per_month",
    "storage_bytes",
)
LIMIT_FOR_KIND: dict[UsageKind, str] = {
    UsageKind.SESSIONS: "max_concurrent_sessions",
    UsageKind.RUNS: "max_concurrent_runs",
    UsageKind.TOKENS: "tokens_per_month",
    UsageKind.COST_USD_MICROS: "cost_usd_micros_per_month",
    UsageKind.STORAGE_BYTES: "storage_bytes",
}


@dataclass
class Quota:
    subject: str  # organizations/{o} or organizations/{o}/users/{u}
    organization_id: str
    limits: dict[str, int | None]
    update_time: float = field(default_factory=now)
    version: int = 1

    @property
    def name(self) -> str:
        return f"{self.subject}/quota"

    @property
    def etag(self) -> str:
        return etag_of(self.name, self.version)


def month_period(at: float) -> tuple[str, float, float]:
    """The calendar month (UTC) containing ``at``: its key, start and end."""
    t = time.gmtime(at)
    start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    end = calendar.timegm((year, month, 1, 0, 0, 0))
    return f"{t.tm_year:04d}-{t.tm_mon:02d}", float(start), float(end)


def counter_period(kind: UsageKind, at: float) -> str:
    """Gauges have one running value; counters restart every calendar month."""
    return "" if kind.is_gauge else month_period(at)[0]


class ReservationState(StrEnum):
    RESERVED = "reserved"
    SETTLED = "settled"
    RELEASED = "released"
    EXPIRED = "expired"


@dataclass
class Reservation:
    id: str
    organization_id: str
    subject: str
    amounts: dict[UsageKind, int]
    reference: str
    request_id: str
    period: str
    expire_time: float
    state: ReservationState = ReservationState.RESERVED
    settled_amounts: dict[UsageKind, int] = field(default_factory=dict)
    create_time: float = field(default_factory=now)
    settle_time: float | None = None
    end_time: float | None = None

    @property
    def name(self) -> str:
        return RESERVATION.format(self.organization_id, self.id)


def settled_amounts(
    held: Mapping[UsageKind, int], actual: Mapping[UsageKind, int]
) -> dict[UsageKind, int]:
    """What settling a hold of ``held`` debits: the ``actual`` amounts; a gauge it does not
    mention (concurrent sessions, runs, stored bytes) stays used as held, a counter it does
    not mention (tokens, cost) was not used at all."""
    settled = {k: actual.get(k, v if k.is_gauge else 0) for k, v in held.items()}
    settled.update(actual)
    return settled


def debited_subjects(org_id: str, subject: str) -> list[str]:
    """A user's usage counts against the user and the organization; others against the org."""
    org = ORGANIZATION.format(org_id)
    return [org, subject] if USER.matches(subject) else [org]


# ---- audit ----


class Outcome(StrEnum):
    SUCCEEDED = "succeeded"
    DENIED = "denied"
    FAILED = "failed"


@dataclass
class AuditEvent:
    organization_id: str
    actor: str
    action: str
    resource: str
    outcome: Outcome
    status_code: int = 0
    source_ip: str = ""
    user_agent: str = ""
    request_id: str = ""
    service: str = "identity"
    metadata: dict[str, str] = field(default_factory=dict)
    event_time: float = field(default_factory=now)
    create_time: float = field(default_factory=now)
    seq: int = 0

    @property
    def name(self) -> str:
        return AUDIT_EVENT.format(self.organization_id, f"{self.seq:020d}")
