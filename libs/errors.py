"""Error categories the service layers raise.

Each service's domain raises subclasses of these (or these directly) with a stable,
machine-readable ``reason`` (UPPER_SNAKE). The gRPC edge turns them into a status code and a
``google.rpc.Status`` with ``ErrorInfo`` through the one table in
:mod:`corral.libs.grpc.errors`. Nothing here imports grpc: domains stay transport-free.
"""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType

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
    """Try again later: ``retry_after_seconds`` (a ``google.rpc.RetryInfo`` on the wire) says
    when, if known."""

    default_reason = "UNAVAILABLE"

    def __init__(
        self,
        message: str,
        *,
        retry_after_seconds: float | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after_seconds = retry_after_seconds


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


# -- outages of what a service stands on ---------------------------------------------------------

OUTAGE_RETRY_SECONDS = 1.0
# PostgreSQL SQLSTATEs of a server that cannot serve right now: class 08 (connection exception),
# class 53 (insufficient resources: too many connections, out of memory or disk), and the
# operator interventions of class 57 (admin or crash shutdown, starting up, statement cancelled).
_PG_DOWN_CLASSES = ("08", "53")
_PG_DOWN_STATES = frozenset({"57P01", "57P02", "57P03", "57P05", "57014"})
# A transaction that lost to a concurrent one and was rolled back: retrying it is safe.
_PG_RETRY_STATES = frozenset({"40001", "40P01"})
# SQLite's transient failures (the file is locked or busy, or cannot be opened or written).
_SQLITE_TRANSIENT = ("locked", "busy", "unable to open", "disk i/o")
_DATABASE_MODULES = ("sqlalchemy", "asyncpg", "aiosqlite", "sqlite3")
_REDIS_MODULES = ("redis",)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what it wraps (a driver's ``orig``) and what caused it, each once."""
    seen: set[int] = set()
    pending = [exc]
    while pending and len(seen) < 16:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for linked in (getattr(current, "orig", None), current.__cause__, current.__context__):
            if isinstance(linked, BaseException):
                pending.append(linked)


def _raised_in(tb: TracebackType | None) -> str:
    """Which backing store's client code a raw socket error came through: ``database``,
    ``redis``, or ``""``."""
    found = ""
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        if module.startswith(_DATABASE_MODULES):
            found = "database"
        elif module.startswith(_REDIS_MODULES):
            found = "redis"
        tb = tb.tb_next
    return found


def _database() -> Unavailable:
    return Unavailable(
        "the database is unavailable; retry",
        reason="DATABASE_UNAVAILABLE",
        retry_after_seconds=OUTAGE_RETRY_SECONDS,
    )


def _redis() -> Unavailable:
    return Unavailable(
        "redis is unavailable; retry",
        reason="REDIS_UNAVAILABLE",
        retry_after_seconds=OUTAGE_RETRY_SECONDS,
    )


def outage(exc: BaseException) -> CorralError | None:
    """What an infrastructure failure means for the caller, or None when ``exc`` is not one.

    The one place that knows the drivers' errors: a database that cannot be reached, went away
    mid-query, shuts down or starts up (SQLAlchemy, asyncpg, aiosqlite) is ``UNAVAILABLE``
    (``DATABASE_UNAVAILABLE``), a Redis connection or timeout error ``UNAVAILABLE``
    (``REDIS_UNAVAILABLE``), both with a retry delay; a transaction PostgreSQL rolled back for a
    deadlock or a serialization failure ``ABORTED``; any other refused, reset or timed-out
    connection ``UNAVAILABLE`` (``DEPENDENCY_FAILED``). The gRPC kit applies it to every
    handler's unexpected exception, so no service answers INTERNAL for an outage.
    """
    import redis.exceptions
    import sqlalchemy.exc

    for cause in _causes(exc):
        if isinstance(cause, CorralError):
            return None
        state = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
        if isinstance(state, str) and state:
            if state in _PG_RETRY_STATES:
                return Aborted(
                    "the transaction lost to a concurrent one and was rolled back; retry",
                    reason="ABORTED",
                )
            if state.startswith(_PG_DOWN_CLASSES) or state in _PG_DOWN_STATES:
                return _database()
        if isinstance(cause, sqlalchemy.exc.DBAPIError) and cause.connection_invalidated:
            return _database()
        if isinstance(cause, sqlalchemy.exc.TimeoutError | sqlalchemy.exc.DisconnectionError):
            return _database()  # no pooled connection in time, or the connection went away
        if isinstance(cause, sqlite3.OperationalError) and any(
            word in str(cause).lower() for word in _SQLITE_TRANSIENT
        ):
            return _database()
        if isinstance(cause, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
            return _redis()
    for cause in _causes(exc):
        if isinstance(cause, ConnectionError | TimeoutError | socket.gaierror):
            origin = _raised_in(cause.__traceback__)
            if origin == "database":
                return _database()
            if origin == "redis":
                return _redis()
            return Unavailable(
                "a service this one depends on is unreachable; retry",
                reason="DEPENDENCY_FAILED",
                retry_after_seconds=OUTAGE_RETRY_SECONDS,
            )
    return None
