"""Quotas and the usage ledger other services debit: reserve -> settle | release | expire.

A reservation *holds* amounts against the limits of its subject and (for a user) of the
organization; settling turns the hold into usage (``actual`` amounts; gauges such as
concurrent sessions stay used until released), releasing gives back what is still held, and a
hold nobody settles or releases in time expires and is given back. ``ReserveUsage`` has its
own retry rule (the proto's): the same ``request_id`` answers with the same reservation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from corral.libs.errors import (
    Aborted,
    CorralError,
    FailedPrecondition,
    InvalidArgument,
    QuotaViolation,
    ResourceExhausted,
    Validator,
)
from corral.libs.etags import check_etag, mismatch
from corral.libs.names import new_id
from corral.services.identity.accounts import active_organization
from corral.services.identity.base import Context, UseCases, found
from corral.services.identity.domain import (
    LIMIT_FIELDS,
    LIMIT_FOR_KIND,
    ORGANIZATION,
    RESERVATION,
    SERVICE_ACCOUNT,
    USER,
    Principal,
    Quota,
    Reservation,
    ReservationState,
    State,
    UsageKind,
    counter_period,
    debited_subjects,
    month_period,
    settled_amounts,
)
from corral.services.identity.metrics import outcome
from corral.services.identity.repository import DuplicateKey, IdentityUnitOfWork


@dataclass(frozen=True)
class QuotaView:
    quota: Quota
    usage: dict[UsageKind, tuple[int, int]]  # kind -> (used, reserved)
    period_start: float
    period_end: float


@dataclass(frozen=True)
class UsageTotals:
    session_turns: int = 0
    task_runs: int = 0
    tokens: int = 0
    cost_usd_micros: int = 0
    storage_bytes: int = 0


@dataclass(frozen=True)
class UsageReport:
    name: str
    start_time: float
    end_time: float
    totals: UsageTotals
    daily: list[tuple[float, UsageTotals]]
    by_principal: dict[str, UsageTotals]


REPORTED = {
    UsageKind.SESSIONS: "session_turns",
    UsageKind.RUNS: "task_runs",
    UsageKind.TOKENS: "tokens",
    UsageKind.COST_USD_MICROS: "cost_usd_micros",
}


def _changed() -> Aborted:
    return Aborted("the reservation changed concurrently; retry", reason="ABORTED")


class Counter(NamedTuple):
    """One usage counter row: whose, what, which period. Every transaction that changes
    counters (reserve, settle, release, expiry) changes them in this tuple's sort order, so
    concurrent ones take the rows' locks in one order and never deadlock."""

    subject: str
    kind: UsageKind
    period: str


def _period(kind: UsageKind, r: Reservation) -> str:
    """The counter period a reservation's amount of ``kind`` sits in (gauges have none)."""
    return "" if kind.is_gauge else r.period


class Changes:
    """Counter changes gathered first and written in the one lock order (:class:`Counter`)."""

    def __init__(self) -> None:
        self._deltas: dict[Counter, tuple[int, int]] = {}

    def add(self, counter: Counter, *, used: int = 0, reserved: int = 0) -> None:
        was_used, was_reserved = self._deltas.get(counter, (0, 0))
        self._deltas[counter] = (was_used + used, was_reserved + reserved)

    async def apply(self, uow: IdentityUnitOfWork) -> None:
        for counter in sorted(self._deltas):
            used, reserved = self._deltas[counter]
            if used or reserved:
                await uow.quotas.adjust(*counter, used=used, reserved=reserved)


def _authorize(
    ctx: Context,
    subject: str,
    for_organization: Callable[[Principal, str], None],
    for_member: Callable[[Principal, str, str], None],
) -> tuple[str, bool]:
    """Apply the rule for a quota or usage subject: ``for_organization(principal, org_id)``
    when it is the organization, ``for_member(principal, org_id, subject)`` when it is one of
    its principals. Returns the organization's id and whether the subject is the organization."""
    principal = ctx.require()
    org_id = subject.split("/")[1]
    is_org = subject == ORGANIZATION.format(org_id)
    if is_org:
        for_organization(principal, org_id)
    else:
        for_member(principal, org_id, subject)
    return org_id, is_org


async def check_subject(uow: IdentityUnitOfWork, org_id: str, subject: str) -> None:
    """``subject`` must be the organization, or a live user/service account in it."""
    if subject == ORGANIZATION.format(org_id):
        return
    if (ids := USER.parse(subject)) and ids[0] == org_id:
        user = found(await uow.users.get(*ids), subject)
        if user.state is not State.ACTIVE:
            raise FailedPrecondition("the user is disabled", reason="PRINCIPAL_DISABLED")
        return
    if (ids := SERVICE_ACCOUNT.parse(subject)) and ids[0] == org_id:
        found(await uow.service_accounts.get(*ids), subject)
        return
    found(None, subject)


class Ledger(UseCases):
    # ---- quotas ----

    async def get_quota(self, ctx: Context, subject: str) -> QuotaView:
        """Members see their organization's quota; a principal its own, admins everyone's;
        Corral's own services (which debit the ledger) any subject's."""
        if ctx.require().service:
            org_id = subject.split("/")[1]
        else:
            org_id, _ = _authorize(ctx, subject, Principal.see_org, Principal.require_self_or_admin)
        at = self._clock()
        _, start, end = month_period(at)
        async with self._uow() as uow:
            found(await uow.organizations.get(org_id), ORGANIZATION.format(org_id))
            await check_subject(uow, org_id, subject)
            quota = await uow.quotas.get(subject) or Quota(
                subject, org_id, dict.fromkeys(LIMIT_FIELDS), update_time=at, version=0
            )
            usage = await uow.quotas.usage(subject, {k: counter_period(k, at) for k in UsageKind})
        return QuotaView(quota, usage, start, end)

    async def update_quota(
        self, ctx: Context, subject: str, changes: Mapping[str, int | None], etag: str
    ) -> QuotaView:
        """Superusers set an organization's limits, its admins those of its principals."""
        org_id, _ = _authorize(
            ctx, subject, Principal.require_superuser, lambda p, o, _: p.require_admin(o)
        )
        async with self._uow() as uow:
            found(await uow.organizations.get(org_id), ORGANIZATION.format(org_id))
            await check_subject(uow, org_id, subject)
            at = self._clock()
            quota = await uow.quotas.get(subject)
            if quota is None:
                quota = Quota(
                    subject, org_id, dict.fromkeys(LIMIT_FIELDS), update_time=at, version=0
                )
                check_etag(etag, quota.etag, "quota")
                quota.limits.update(changes)
                quota.version = 1
                try:
                    await uow.quotas.add(quota)
                except DuplicateKey as exc:
                    raise mismatch("quota") from exc
            else:
                check_etag(etag, quota.etag, "quota")
                expected = quota.version
                quota.limits.update(changes)
                quota.version += 1
                quota.update_time = at
                if not await uow.quotas.save(quota, expected):
                    raise mismatch("quota")
            limits = {k: "" if v is None else str(v) for k, v in changes.items()}
            await self._audit(uow, ctx, org_id, "quotas.update", quota.name, **limits)
            await uow.commit()
        return await self.get_quota(ctx, subject)

    # ---- reserve, settle, release, expire ----

    async def reserve(
        self,
        ctx: Context,
        org_id: str,
        subject: str,
        amounts: Mapping[UsageKind, int],
        reference: str,
        ttl: float,
        request_id: str,
    ) -> Reservation:
        ctx.require().require_service()
        try:
            reservation = await self._reserve(org_id, subject, amounts, reference, ttl, request_id)
        except CorralError as exc:
            self.metrics.reservations.add(1, {"outcome": outcome(exc)})
            raise
        self.metrics.reservations.add(1, {"outcome": "reserved"})
        return reservation

    async def _reserve(
        self,
        org_id: str,
        subject: str,
        amounts: Mapping[UsageKind, int],
        reference: str,
        ttl: float,
        request_id: str,
    ) -> Reservation:
        violations: list[QuotaViolation] = []
        raced = False
        for attempt in range(2):
            # Over a limit: give back expired holds (outside any transaction) and try once more.
            if attempt and not await self.expire_reservations():
                break
            async with self._uow() as uow:
                existing = await uow.reservations.by_request(request_id)
                if existing is not None:
                    if existing.organization_id != org_id or existing.subject != subject:
                        raise InvalidArgument(
                            "request_id was already used for a different request",
                            reason="REQUEST_ID_REUSED",
                        )
                    return existing
                await active_organization(uow, org_id)
                await check_subject(uow, org_id, subject)
                at = self._clock()
                violations = await self._hold(uow, org_id, subject, amounts, at)
                if violations:
                    continue  # rolls the holds back
                reservation = Reservation(
                    id=new_id(),
                    organization_id=org_id,
                    subject=subject,
                    amounts=dict(amounts),
                    reference=reference,
                    request_id=request_id,
                    period=month_period(at)[0],
                    expire_time=at + ttl,
                    create_time=at,
                )
                try:
                    await uow.reservations.add(reservation)
                except DuplicateKey:
                    raced = True  # a concurrent retry of this request won: answer with its hold
                    break
                await uow.commit()
                return reservation
        if raced:
            async with self._uow() as uow:
                existing = await uow.reservations.by_request(request_id)
            if existing is not None:
                return existing
        raise ResourceExhausted(
            "a quota limit would be exceeded", reason="QUOTA_EXCEEDED", violations=violations
        )

    async def _hold(
        self,
        uow: IdentityUnitOfWork,
        org_id: str,
        subject: str,
        amounts: Mapping[UsageKind, int],
        at: float,
    ) -> list[QuotaViolation]:
        """Hold ``amounts`` against every debited subject's limits; what would not fit."""
        subjects = debited_subjects(org_id, subject)
        limits = await uow.quotas.get_many(subjects)
        violations = []
        holds = [
            Counter(who, kind, counter_period(kind, at))
            for who in subjects
            for kind, amount in amounts.items()
            if amount > 0
        ]
        for counter in sorted(holds):  # the one lock order (see Counter)
            amount = amounts[counter.kind]
            limit_name = LIMIT_FOR_KIND[counter.kind]
            quota = limits.get(counter.subject)
            limit = quota.limits[limit_name] if quota else None
            if not await uow.quotas.hold(*counter, amount, limit):
                violations.append(
                    QuotaViolation(
                        counter.subject, limit_name, f"holding {amount} more would exceed {limit}"
                    )
                )
        return violations

    @staticmethod
    def _give_back(
        changes: Changes, r: Reservation, *, reserved: bool, settled_gauges: bool
    ) -> None:
        """Add to ``changes`` what ending ``r`` gives back: what it still holds, and the gauges
        it settled (a session stays open until its reservation is released)."""
        for who in debited_subjects(r.organization_id, r.subject):
            if reserved:
                for kind, amount in r.amounts.items():
                    changes.add(Counter(who, kind, _period(kind, r)), reserved=-amount)
            if settled_gauges:
                for kind, amount in r.settled_amounts.items():
                    if kind.is_gauge:
                        changes.add(Counter(who, kind, ""), used=-amount)

    async def _reservation(
        self, uow: IdentityUnitOfWork, org_id: str, reservation_id: str
    ) -> Reservation:
        return found(
            await uow.reservations.get(org_id, reservation_id),
            RESERVATION.format(org_id, reservation_id),
        )

    async def settle(
        self, ctx: Context, org_id: str, reservation_id: str, actual: Mapping[UsageKind, int]
    ) -> Reservation:
        ctx.require().require_service()
        async with self._uow() as uow:
            r = await self._reservation(uow, org_id, reservation_id)
            at = self._clock()
            settled = settled_amounts(r.amounts, actual)
            # A retry of a settle that went through (and perhaps the release after it) answers
            # as the first did: callers retry until they hear back (the session's outbox does).
            if r.settle_time is not None:
                if r.settled_amounts == settled:
                    return r
                raise FailedPrecondition(
                    "the reservation was settled with other amounts", reason="ALREADY_SETTLED"
                )
            if r.state is ReservationState.RELEASED:
                raise FailedPrecondition(
                    "the reservation was released", reason="RESERVATION_RELEASED"
                )
            if r.state is ReservationState.EXPIRED or r.expire_time <= at:
                if r.state is ReservationState.RESERVED:
                    changes = Changes()
                    await self._expire(uow, r, at, changes)
                    await changes.apply(uow)
                    await uow.commit()
                raise FailedPrecondition(
                    "the reservation expired before it was settled", reason="RESERVATION_EXPIRED"
                )
            r.state, r.settled_amounts, r.settle_time = ReservationState.SETTLED, settled, at
            if not await uow.reservations.transition(r, ReservationState.RESERVED):
                raise _changed()
            changes = Changes()
            for who in debited_subjects(org_id, r.subject):
                for kind in set(r.amounts) | set(settled):
                    changes.add(
                        Counter(who, kind, _period(kind, r)),
                        reserved=-r.amounts.get(kind, 0),
                        used=settled[kind],
                    )
            await changes.apply(uow)
            for kind, amount in settled.items():
                if amount:
                    await uow.reservations.record(org_id, r.subject, kind, amount, at)
            await uow.commit()
        self.metrics.reservations_ended.add(1, {"how": "settled"})
        return r

    async def release(self, ctx: Context, org_id: str, reservation_id: str) -> Reservation:
        ctx.require().require_service()
        async with self._uow() as uow:
            r = await self._reservation(uow, org_id, reservation_id)
            at = self._clock()
            if r.state in (ReservationState.RELEASED, ReservationState.EXPIRED):
                return r
            if r.state is ReservationState.RESERVED and r.expire_time <= at:
                changes = Changes()
                await self._expire(uow, r, at, changes)
                await changes.apply(uow)
                await uow.commit()
                return r
            was = r.state
            r.state, r.end_time = ReservationState.RELEASED, at
            if not await uow.reservations.transition(r, was):
                raise _changed()
            changes = Changes()
            self._give_back(
                changes,
                r,
                reserved=was is ReservationState.RESERVED,
                settled_gauges=was is ReservationState.SETTLED,
            )
            await changes.apply(uow)
            await uow.commit()
        self.metrics.reservations_ended.add(1, {"how": "released"})
        return r

    async def _expire(
        self, uow: IdentityUnitOfWork, r: Reservation, at: float, changes: Changes
    ) -> bool:
        r.state, r.end_time = ReservationState.EXPIRED, at
        if not await uow.reservations.transition(r, ReservationState.RESERVED):
            return False
        self._give_back(changes, r, reserved=True, settled_gauges=False)
        return True

    async def expire_reservations(self) -> int:
        """Give back what reservations nobody settled or released in time still hold."""
        count = 0
        async with self._uow() as uow:
            at = self._clock()
            changes = Changes()
            # Reservation rows in id order, then every counter in the one order: two sweeps
            # (or a sweep and a settle) never wait for each other in a circle.
            for r in sorted(await uow.reservations.expired(at), key=lambda r: r.id):
                count += await self._expire(uow, r, at, changes)
            await changes.apply(uow)
            await uow.commit()
        if count:
            self.metrics.reservations_ended.add(count, {"how": "expired"})
        return count

    # ---- usage reports ----

    async def usage_report(
        self, ctx: Context, subject: str, start: float | None, end: float | None
    ) -> UsageReport:
        """Admins see their organization's usage (by principal too); a principal its own."""
        org_id, is_org = _authorize(
            ctx, subject, Principal.require_admin, Principal.require_self_or_admin
        )
        at = self._clock()
        start = month_period(at)[1] if start is None else start
        end = at if end is None else end
        check = Validator()
        check.check(end > start, "end_time", "must be after start_time")
        check.check(end - start <= 366 * 86400, "end_time", "the range must not exceed 366 days")
        check.raise_if_any()
        async with self._uow() as uow:
            found(await uow.organizations.get(org_id), ORGANIZATION.format(org_id))
            await check_subject(uow, org_id, subject)
            entries = await uow.reservations.entries(
                org_id, None if is_org else subject, start, end
            )
            storage = await uow.quotas.usage(subject, {UsageKind.STORAGE_BYTES: ""})
        stored = storage.get(UsageKind.STORAGE_BYTES, (0, 0))[0]
        totals: dict[str, int] = {}
        daily: dict[float, dict[str, int]] = {}
        by_principal: dict[str, dict[str, int]] = {}
        for who, kind, amount, when in entries:
            name = REPORTED.get(kind)
            if name is None:
                continue
            day = when - when % 86400
            for bucket in (totals, daily.setdefault(day, {}), by_principal.setdefault(who, {})):
                bucket[name] = bucket.get(name, 0) + amount
        return UsageReport(
            name=f"{subject}/usageReport",
            start_time=start,
            end_time=end,
            totals=UsageTotals(**totals, storage_bytes=stored),
            daily=[(day, UsageTotals(**values)) for day, values in sorted(daily.items())],
            by_principal=(
                {who: UsageTotals(**values) for who, values in by_principal.items()}
                if is_org
                else {}
            ),
        )
