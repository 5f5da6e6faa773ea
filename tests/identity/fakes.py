"""In-memory fakes of identity's unit of work, for service-layer tests of its rules.

A :class:`FakeStore` is the "database"; each :class:`FakeUnitOfWork` works on a copy of it and
writes the copy back on ``commit`` (no commit: nothing happened), like a transaction. Only what
the ledger and the account rules use is faked.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

from corral.services.identity.base import Config, UnitOfWorkFactory
from corral.services.identity.domain import (
    AuditEvent,
    Organization,
    Quota,
    Reservation,
    ReservationState,
    Role,
    ServiceAccount,
    State,
    UsageKind,
    User,
)
from corral.services.identity.repository import DuplicateKey

CONFIG = Config(issuer="https://identity.test", audience="corral")


@dataclass
class FakeStore:
    organizations: dict[str, Organization] = field(default_factory=dict)
    users: dict[str, User] = field(default_factory=dict)
    service_accounts: dict[str, ServiceAccount] = field(default_factory=dict)
    quotas: dict[str, Quota] = field(default_factory=dict)
    counters: dict[tuple[str, UsageKind, str], list[int]] = field(default_factory=dict)
    reservations: dict[str, Reservation] = field(default_factory=dict)
    entries: list[tuple[str, str, UsageKind, int, float]] = field(default_factory=list)
    audit: list[AuditEvent] = field(default_factory=list)
    revoked_sign_ins: list[str] = field(default_factory=list)

    def used(self, subject: str, kind: UsageKind, period: str = "") -> tuple[int, int]:
        """(used, reserved) of one counter."""
        used, reserved = self.counters.get((subject, kind, period), [0, 0])
        return used, reserved

    def unit_of_work(self) -> UnitOfWorkFactory:
        return lambda: cast(Any, FakeUnitOfWork(self))


class _Repo:
    def __init__(self, data: FakeStore) -> None:
        self.d = data


class _Organizations(_Repo):
    async def get(self, org_id: str) -> Organization | None:
        return self.d.organizations.get(org_id)


class _Users(_Repo):
    async def get(self, org_id: str, user_id: str) -> User | None:
        user = self.d.users.get(user_id)
        return copy.deepcopy(user) if user and user.organization_id == org_id else None

    async def by_email(self, email: str) -> User | None:
        return next((u for u in self.d.users.values() if u.email == email), None)

    async def save(self, user: User, expected_version: int) -> bool:
        if self.d.users[user.id].version != expected_version:
            return False
        self.d.users[user.id] = copy.deepcopy(user)
        return True

    async def active_admins(self, org_id: str) -> list[str]:
        return [
            u.id
            for u in self.d.users.values()
            if u.organization_id == org_id and u.role is Role.ADMIN and u.state is State.ACTIVE
        ]

    async def bump_generation(self, user_id: str) -> None:
        self.d.users[user_id].token_generation += 1


class _ServiceAccounts(_Repo):
    async def get(self, org_id: str, sa_id: str) -> ServiceAccount | None:
        account = self.d.service_accounts.get(sa_id)
        return account if account and account.organization_id == org_id else None


class _RefreshTokens(_Repo):
    async def revoke_user(self, user_id: str, at: float, *, keep_family: str = "") -> int:
        self.d.revoked_sign_ins.append(user_id)
        return 1


class _Quotas(_Repo):
    async def get(self, subject: str) -> Quota | None:
        return self.d.quotas.get(subject)

    async def get_many(self, subjects: list[str]) -> dict[str, Quota]:
        return {s: self.d.quotas[s] for s in subjects if s in self.d.quotas}

    async def usage(
        self, subject: str, periods: dict[UsageKind, str]
    ) -> dict[UsageKind, tuple[int, int]]:
        return {k: self.d.used(subject, k, p) for k, p in periods.items()}

    async def hold(
        self, subject: str, kind: UsageKind, period: str, amount: int, limit: int | None
    ) -> bool:
        counter = self.d.counters.setdefault((subject, kind, period), [0, 0])
        if limit is not None and sum(counter) + amount > limit:
            return False
        counter[1] += amount
        return True

    async def adjust(
        self, subject: str, kind: UsageKind, period: str, *, used: int = 0, reserved: int = 0
    ) -> None:
        counter = self.d.counters.setdefault((subject, kind, period), [0, 0])
        counter[0] = max(counter[0] + used, 0)
        counter[1] = max(counter[1] + reserved, 0)


class _Reservations(_Repo):
    async def by_request(self, request_id: str) -> Reservation | None:
        return next((r for r in self.d.reservations.values() if r.request_id == request_id), None)

    async def add(self, r: Reservation) -> None:
        if await self.by_request(r.request_id) is not None:
            raise DuplicateKey(r.request_id)
        self.d.reservations[r.id] = copy.deepcopy(r)

    async def get(self, org_id: str, reservation_id: str) -> Reservation | None:
        r = self.d.reservations.get(reservation_id)
        return copy.deepcopy(r) if r and r.organization_id == org_id else None

    async def transition(self, r: Reservation, expected: ReservationState) -> bool:
        if self.d.reservations[r.id].state is not expected:
            return False
        self.d.reservations[r.id] = copy.deepcopy(r)
        return True

    async def expired(self, at: float, limit: int = 100) -> list[Reservation]:
        return [
            copy.deepcopy(r)
            for r in self.d.reservations.values()
            if r.state is ReservationState.RESERVED and r.expire_time <= at
        ][:limit]

    async def record(
        self, org_id: str, principal: str, kind: UsageKind, amount: int, at: float
    ) -> None:
        self.d.entries.append((org_id, principal, kind, amount, at))


class _Audit(_Repo):
    async def append(self, events: list[AuditEvent]) -> None:
        self.d.audit.extend(events)


class FakeUnitOfWork:
    def __init__(self, store: FakeStore) -> None:
        self._store = store

    async def __aenter__(self) -> FakeUnitOfWork:
        self._work = copy.deepcopy(self._store)
        for name, repo in (
            ("organizations", _Organizations),
            ("users", _Users),
            ("service_accounts", _ServiceAccounts),
            ("refresh_tokens", _RefreshTokens),
            ("quotas", _Quotas),
            ("reservations", _Reservations),
            ("audit", _Audit),
        ):
            setattr(self, name, repo(self._work))
        return self

    async def commit(self) -> None:
        self._store.__dict__.update(copy.deepcopy(self._work).__dict__)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None
