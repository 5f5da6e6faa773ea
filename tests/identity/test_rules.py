"""Identity's rules at the service layer, on in-memory fakes (tests/identity/fakes.py): the
ledger's reserve/settle/release/expire arithmetic and the admin-role rules, where the numbers
and states are easier to see than through gRPC."""

from __future__ import annotations

from typing import Any, cast

import pytest

from corral.libs.errors import FailedPrecondition, PermissionDenied, ResourceExhausted
from corral.services.identity.accounts import Accounts
from corral.services.identity.base import Context
from corral.services.identity.domain import (
    Organization,
    Principal,
    Quota,
    ReservationState,
    Role,
    State,
    UsageKind,
    User,
    month_period,
)
from corral.services.identity.ledger import Ledger
from tests.identity.fakes import CONFIG, FakeStore

ORG = "organizations/acme"
USER = "organizations/acme/users/u1"
SERVICE = Context(
    principal=Principal("organizations/default/serviceAccounts/svc", "default", None, service=True)
)
SESSIONS, TOKENS = UsageKind.SESSIONS, UsageKind.TOKENS


class Clock:
    def __init__(self) -> None:
        self.now = 1_750_000_000.0

    def __call__(self) -> float:
        return self.now


def _user(user_id: str, role: Role) -> User:
    return User(user_id, "acme", f"{user_id}@acme.test", user_id, role, password_hash="")


def _quota(subject: str, **limits: int) -> Quota:
    return Quota(subject, "acme", dict(limits))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> FakeStore:
    store = FakeStore()
    store.organizations["acme"] = Organization("acme", "Acme")
    store.users["u1"] = _user("u1", Role.USER)
    store.users["a1"] = _user("a1", Role.ADMIN)
    return store


@pytest.fixture
def ledger(store: FakeStore, clock: Clock) -> Ledger:
    return Ledger(store.unit_of_work(), CONFIG, clock)


async def _reserve(ledger: Ledger, request_id: str, ttl: float = 60, **amounts: int) -> Any:
    held = {UsageKind(k): v for k, v in amounts.items()}
    return await ledger.reserve(SERVICE, "acme", USER, held, "sessions/s/turns/1", ttl, request_id)


async def test_a_users_hold_counts_against_the_user_and_the_organization(
    ledger: Ledger, store: FakeStore, clock: Clock
) -> None:
    store.quotas[ORG] = _quota(ORG, tokens_per_month=1000)
    store.quotas[USER] = _quota(USER, tokens_per_month=100)
    month = month_period(clock())[0]
    await _reserve(ledger, "r1", tokens=80)
    assert store.used(USER, TOKENS, month) == (0, 80)
    assert store.used(ORG, TOKENS, month) == (0, 80)

    with pytest.raises(ResourceExhausted) as caught:
        await _reserve(ledger, "r2", tokens=30)  # fits the organization, not the user
    assert caught.value.reason == "QUOTA_EXCEEDED"
    assert [(v.subject, v.limit) for v in caught.value.violations] == [(USER, "tokens_per_month")]
    # The organization's part of the refused hold was rolled back with it.
    assert store.used(ORG, TOKENS, month) == (0, 80)


async def test_settling_debits_what_was_used_and_a_gauge_stays_used_until_released(
    ledger: Ledger, store: FakeStore, clock: Clock
) -> None:
    month = month_period(clock())[0]
    held = await _reserve(ledger, "r1", sessions=1, tokens=50)
    settled = await ledger.settle(SERVICE, "acme", held.id, {TOKENS: 20})
    assert settled.settled_amounts == {SESSIONS: 1, TOKENS: 20}  # the gauge as held
    for subject in (ORG, USER):
        assert store.used(subject, TOKENS, month) == (20, 0)  # the unused 30 is given back
        assert store.used(subject, SESSIONS) == (1, 0)  # the session is still open
    assert sorted((kind, amount) for _, _, kind, amount, _ in store.entries) == [
        (SESSIONS, 1),
        (TOKENS, 20),
    ]

    released = await ledger.release(SERVICE, "acme", held.id)
    assert released.state is ReservationState.RELEASED
    for subject in (ORG, USER):
        assert store.used(subject, SESSIONS) == (0, 0)  # the session closed
        assert store.used(subject, TOKENS, month) == (20, 0)  # tokens stay spent


async def test_settle_is_idempotent_for_the_same_amounts_only(
    ledger: Ledger, store: FakeStore
) -> None:
    held = await _reserve(ledger, "r1", tokens=50)
    first = await ledger.settle(SERVICE, "acme", held.id, {TOKENS: 20})
    again = await ledger.settle(SERVICE, "acme", held.id, {TOKENS: 20})
    assert again.settled_amounts == first.settled_amounts
    assert len(store.entries) == 1  # the retry recorded nothing more
    with pytest.raises(FailedPrecondition) as caught:
        await ledger.settle(SERVICE, "acme", held.id, {TOKENS: 30})
    assert caught.value.reason == "ALREADY_SETTLED"

    other = await _reserve(ledger, "r2", tokens=5)
    await ledger.release(SERVICE, "acme", other.id)
    with pytest.raises(FailedPrecondition) as caught:
        await ledger.settle(SERVICE, "acme", other.id, {TOKENS: 5})
    assert caught.value.reason == "RESERVATION_RELEASED"


async def test_an_expired_hold_makes_room_and_can_no_longer_be_settled(
    ledger: Ledger, store: FakeStore, clock: Clock
) -> None:
    store.quotas[ORG] = _quota(ORG, max_concurrent_sessions=1)
    first = await _reserve(ledger, "r1", ttl=10, sessions=1)
    with pytest.raises(ResourceExhausted):
        await _reserve(ledger, "r2", sessions=1)
    clock.now += 11
    await _reserve(ledger, "r3", sessions=1)  # the expired hold was given back first
    assert store.reservations[first.id].state is ReservationState.EXPIRED
    assert store.used(ORG, SESSIONS) == (0, 1)
    with pytest.raises(FailedPrecondition) as caught:
        await ledger.settle(SERVICE, "acme", first.id, {SESSIONS: 1})
    assert caught.value.reason == "RESERVATION_EXPIRED"


async def test_the_last_active_admin_stays_and_only_admins_change_roles(
    store: FakeStore, clock: Clock
) -> None:
    accounts = Accounts(store.unit_of_work(), CONFIG, clock, passwords=cast(Any, None))
    admin = Context(principal=Principal("organizations/acme/users/a1", "acme", Role.ADMIN))
    user = Context(principal=Principal(USER, "acme", Role.USER))

    with pytest.raises(FailedPrecondition) as caught:
        await accounts.update_user(admin, "acme", "a1", {"role": Role.USER}, "")
    assert caught.value.reason == "LAST_ADMIN"
    with pytest.raises(FailedPrecondition) as caught:
        await accounts.set_user_state(admin, "acme", "a1", State.DISABLED)
    assert caught.value.reason == "LAST_ADMIN"
    with pytest.raises(PermissionDenied) as denied:
        await accounts.update_user(user, "acme", "u1", {"role": Role.ADMIN}, "")
    assert denied.value.reason == "ROLE_INSUFFICIENT"
    assert store.users["u1"].role is Role.USER

    await accounts.update_user(admin, "acme", "u1", {"role": Role.ADMIN}, "")
    await accounts.update_user(admin, "acme", "a1", {"role": Role.VIEWER}, "")
    assert store.users["a1"].role is Role.VIEWER
    changes = [e.metadata for e in store.audit if e.action == "identity.users.role_change"]
    assert changes[-1] == {"old_role": "admin", "new_role": "viewer"}
