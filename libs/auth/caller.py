"""Who is calling: set by the authentication interceptor, read by service layers."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

from corral.libs.errors import Unauthenticated

SUPERUSER_ROLE = "superuser"
# Corral's own services (their internal service accounts): the ledger, the audit log and the
# runtime answer them, and they have their own request-rate allowance (libs/ratelimit.py).
SERVICE_ROLE = "service"


@dataclass(frozen=True)
class Caller:
    """An authenticated principal.

    ``subject`` is a resource name (``organizations/acme/users/u1`` or a service account);
    ``organization`` is the organisation the token is scoped to; ``roles`` come from the token.
    """

    subject: str
    organization: str
    roles: frozenset[str] = field(default_factory=frozenset)
    token_id: str = ""
    token: str = field(default="", repr=False)
    expires_at: float = 0.0
    # What a revocation can name (libs/auth/revocation.py): when the token was issued, the
    # sign-in it belongs to (``sid``), the API key it was exchanged for (``akid``), its signing key.
    issued_at: float = 0.0
    session_id: str = ""
    api_key_id: str = ""
    key_id: str = ""
    # Request-rate quotas the token carries (identity puts the caller's and the organisation's
    # requests_per_minute there); None: the deployment's default applies.
    requests_per_minute: int | None = None
    organization_requests_per_minute: int | None = None

    @property
    def is_superuser(self) -> bool:
        return SUPERUSER_ROLE in self.roles

    @property
    def is_service(self) -> bool:
        """A Corral service calling as itself (never implied by superuser)."""
        return SERVICE_ROLE in self.roles

    def has_role(self, *roles: str) -> bool:
        return self.is_superuser or bool(self.roles.intersection(roles))


_current: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "corral_caller", default=None
)


def current_caller() -> Caller | None:
    return _current.get()


def require_caller() -> Caller:
    caller = _current.get()
    if caller is None:
        raise Unauthenticated("this method needs a bearer token", reason="TOKEN_MISSING")
    return caller


def set_caller(caller: Caller | None) -> contextvars.Token[Caller | None]:
    return _current.set(caller)


def reset_caller(token: contextvars.Token[Caller | None]) -> None:
    _current.reset(token)
