"""Repositories of the usage ledger: quotas, usage counters, reservations and usage entries."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from corral.services.identity import rows
from corral.services.identity.domain import Quota, Reservation, ReservationState, UsageKind
from corral.services.identity.sql import Repo
from corral.services.identity.tables import quotas, reservations, usage_counters, usage_entries


class Quotas(Repo):
    async def get(self, subject: str) -> Quota | None:
        row = await self._one(sa.select(quotas).where(quotas.c.subject == subject))
        return rows.quota(row) if row else None

    async def get_many(self, subjects: Sequence[str]) -> dict[str, Quota]:
        found = await self.c.execute(sa.select(quotas).where(quotas.c.subject.in_(subjects)))
        return {q.subject: q for q in map(rows.quota, found)}

    async def add(self, quota: Quota) -> None:
        await self._insert(
            quotas,
            {
                "subject": quota.subject,
                "organization_id": quota.organization_id,
                **quota.limits,
                "update_time": quota.update_time,
                "version": quota.version,
            },
        )

    async def save(self, quota: Quota, expected_version: int) -> bool:
        result = await self.c.execute(
            quotas.update()
            .where(quotas.c.subject == quota.subject, quotas.c.version == expected_version)
            .values(**quota.limits, update_time=quota.update_time, version=quota.version)
        )
        return bool(result.rowcount)

    async def usage(
        self, subject: str, periods: dict[UsageKind, str]
    ) -> dict[UsageKind, tuple[int, int]]:
        counters = await self.c.execute(
            sa.select(usage_counters).where(usage_counters.c.subject == subject)
        )
        found: dict[UsageKind, tuple[int, int]] = {}
        for row in counters:
            m = row._mapping
            kind = UsageKind(m["kind"])
            if periods.get(kind) == m["period"]:
                found[kind] = (int(m["used"]), int(m["reserved"]))
        return found

    async def _counter(self, subject: str, kind: UsageKind, period: str) -> sa.Update:
        """An UPDATE of one usage counter (created at zero if it was not there)."""
        values = {"subject": subject, "kind": kind.value, "period": period}
        await self.c.execute(
            self._upsert_ignore(usage_counters, {**values, "used": 0, "reserved": 0})
        )
        return usage_counters.update().where(
            usage_counters.c.subject == subject,
            usage_counters.c.kind == kind.value,
            usage_counters.c.period == period,
        )

    async def hold(
        self, subject: str, kind: UsageKind, period: str, amount: int, limit: int | None
    ) -> bool:
        """Atomically add ``amount`` to the held total if it stays within ``limit``.

        One conditional UPDATE: on PostgreSQL the row lock serializes racing holders and each
        re-checks the condition on the latest row; on SQLite writers are serialized anyway.
        """
        query = await self._counter(subject, kind, period)
        if limit is not None:
            query = query.where(usage_counters.c.used + usage_counters.c.reserved + amount <= limit)
        result = await self.c.execute(query.values(reserved=usage_counters.c.reserved + amount))
        return bool(result.rowcount)

    async def adjust(
        self, subject: str, kind: UsageKind, period: str, *, used: int = 0, reserved: int = 0
    ) -> None:
        """Add ``used`` and ``reserved`` (either may be negative) to a counter, never below 0."""
        query = await self._counter(subject, kind, period)
        floor = sa.func.greatest if self.c.dialect.name == "postgresql" else sa.func.max
        c = usage_counters.c
        await self.c.execute(
            query.values(used=floor(c.used + used, 0), reserved=floor(c.reserved + reserved, 0))
        )


class Reservations(Repo):
    async def get(self, org_id: str, reservation_id: str) -> Reservation | None:
        row = await self._one(
            sa.select(reservations).where(
                reservations.c.id == reservation_id, reservations.c.organization_id == org_id
            )
        )
        return rows.reservation(row) if row else None

    async def by_request(self, request_id: str) -> Reservation | None:
        row = await self._one(
            sa.select(reservations).where(reservations.c.request_id == request_id)
        )
        return rows.reservation(row) if row else None

    async def add(self, r: Reservation) -> None:
        await self._insert(reservations, rows.reservation_values(r))

    async def transition(self, r: Reservation, expected: ReservationState) -> bool:
        result = await self.c.execute(
            reservations.update()
            .where(reservations.c.id == r.id, reservations.c.state == expected.value)
            .values(
                state=r.state.value,
                settled_amounts=rows.amounts_json(r.settled_amounts),
                settle_time=r.settle_time,
                end_time=r.end_time,
            )
        )
        return bool(result.rowcount)

    async def expired(self, at: float, limit: int = 100) -> list[Reservation]:
        found = await self.c.execute(
            sa.select(reservations)
            .where(
                reservations.c.state == ReservationState.RESERVED.value,
                reservations.c.expire_time <= at,
            )
            .limit(limit)
        )
        return [rows.reservation(r) for r in found]

    async def record(
        self, org_id: str, principal: str, kind: UsageKind, amount: int, at: float
    ) -> None:
        await self.c.execute(
            usage_entries.insert().values(
                organization_id=org_id, principal=principal, kind=kind.value, amount=amount, time=at
            )
        )

    async def entries(
        self, org_id: str, principal: str | None, start: float, end: float
    ) -> list[tuple[str, UsageKind, int, float]]:
        query = sa.select(
            usage_entries.c.principal,
            usage_entries.c.kind,
            usage_entries.c.amount,
            usage_entries.c.time,
        ).where(
            usage_entries.c.organization_id == org_id,
            usage_entries.c.time >= start,
            usage_entries.c.time < end,
        )
        if principal is not None:
            query = query.where(usage_entries.c.principal == principal)
        found = await self.c.execute(query.order_by(usage_entries.c.time))
        return [(r[0], UsageKind(r[1]), int(r[2]), float(r[3])) for r in found]
