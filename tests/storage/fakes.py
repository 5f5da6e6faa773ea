"""Fakes for the storage service's identity ports: a usage ledger with identity's storage-bytes
rules (a gauge: held while RESERVED, used once SETTLED, given back on release; a limit checked
when bytes are held, never when they are recorded), and an audit log that remembers."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from corral.libs.audit import AuditEntry
from corral.libs.errors import NotFound, QuotaViolation, ResourceExhausted, Unavailable


@dataclass
class Reservation:
    name: str
    organization: str
    subject: str
    amount: int
    state: str = "RESERVED"
    settled: int = 0

    @property
    def held(self) -> int:
        if self.state == "RESERVED":
            return self.amount
        if self.state == "SETTLED":
            return self.settled
        return 0


@dataclass
class FakeLedger:
    limits: dict[str, int] = field(default_factory=dict)  # subject or organization -> bytes
    reservations: dict[str, Reservation] = field(default_factory=dict)
    down: bool = False  # identity unreachable: every call fails UNAVAILABLE
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def _check(self) -> None:
        if self.down:
            raise Unavailable("identity is down", reason="DEPENDENCY_FAILED")

    def in_use(self, who: str) -> int:
        """Bytes held or used by a subject (a user) or an organization."""
        return sum(r.held for r in self.reservations.values() if who in (r.subject, r.organization))

    def live(self) -> list[Reservation]:
        """Reservations that still hold something."""
        return [r for r in self.reservations.values() if r.state in ("RESERVED", "SETTLED")]

    async def hold(
        self, *, organization: str, subject: str, amount: int, reference: str, request_id: str
    ) -> str:
        self._check()
        violations = [
            QuotaViolation(who, "storage_bytes", f"holding {amount} more would exceed {limit}")
            for who in (subject, organization)
            if (limit := self.limits.get(who)) is not None
            and amount > 0
            and self.in_use(who) + amount > limit
        ]
        if violations:
            raise ResourceExhausted(
                "a quota limit would be exceeded", reason="QUOTA_EXCEEDED", violations=violations
            )
        name = f"{organization}/usageReservations/r{next(self._ids)}"
        self.reservations[name] = Reservation(name, organization, subject, amount)
        return name

    async def settle(self, reservation: str, amount: int) -> None:
        self._check()
        found = self.reservations.get(reservation)
        if found is None:
            raise NotFound("no such reservation")
        if found.state == "RESERVED":
            found.state, found.settled = "SETTLED", amount

    async def record(
        self, *, organization: str, subject: str, amount: int, reference: str, request_id: str
    ) -> str:
        name = await self.hold(
            organization=organization,
            subject=subject,
            amount=0,
            reference=reference,
            request_id=request_id,
        )
        await self.settle(name, amount)
        return name

    async def release(self, reservation: str) -> None:
        self._check()
        found = self.reservations.get(reservation)
        if found is None:
            raise NotFound("no such reservation")
        found.state = "RELEASED"


@dataclass
class FakeAudit:
    entries: list[AuditEntry] = field(default_factory=list)

    async def write(self, entry: AuditEntry, *, token: str) -> None:
        self.entries.append(entry)

    def actions(self) -> list[str]:
        return [e.action for e in self.entries]
