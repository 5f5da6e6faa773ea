"""Error categories the service layers raise.

Each service's domain raises subclasses of these (or these directly) with a stable,
machine-readable ``reason`` (UPPER_SNAKE). The gRPC edge turns them into a status code and a
``google.rpc.Status`` with ``ErrorInfo`` through the one table in
:mod:`corral.libs.grpc.errors`. Nothing here imports grpc: domains stay transport-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

ERROR_DOMAIN = "corral.dev"


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field of a request: ``field`` is a dotted path, e.g. ``session.display_name``."""

    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    """One exhausted quota: ``subject`` is who (``organizations/acme``), ``limit`` which one."""

    subject: str
    limit: str
    description: str


class CorralError(Exception):
    """Base of every expected error. ``reason`` is stable; ``message`` is for people."""

    default_reason = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(CorralError):
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        *,
        violations: Iterable[FieldViolation] = (),
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = list(violations)


class NotFound(CorralError):
    default_reason = "NOT_FOUND"


class AlreadyExists(CorralError):
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(CorralError):
    default_reason = "FAILED_PRECONDITION"


class Aborted(CorralError):
    """A concurrent change won (e.g. an ``etag`` mismatch): re-read and retry."""

    default_reason = "ABORTED"


class PermissionDenied(CorralError):
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(CorralError):
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(CorralError):
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        violations: Iterable[QuotaViolation] = (),
        retry_after_seconds: float | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = list(violations)
        self.retry_after_seconds = retry_after_seconds


class Unavailable(CorralError):
    default_reason = "UNAVAILABLE"


class Unimplemented(CorralError):
    default_reason = "UNIMPLEMENTED"


class DeadlineExceeded(CorralError):
    default_reason = "DEADLINE_EXCEEDED"


@dataclass
class Validator:
    """Collects field violations, then raises one :class:`InvalidArgument` for all of them."""

    violations: list[FieldViolation] = field(default_factory=list)

    def add(self, field_path: str, description: str) -> None:
        self.violations.append(FieldViolation(field_path, description))

    def require(self, value: object, field_path: str) -> None:
        if value is None or value == "" or (value == 0 and not isinstance(value, bool)):
            self.add(field_path, "is required")

    def check(self, condition: bool, field_path: str, description: str) -> None:
        if not condition:
            self.add(field_path, description)

    def raise_if_any(self, message: str = "the request has invalid fields") -> None:
        if self.violations:
            raise InvalidArgument(message, violations=self.violations)
