"""Quotas and the usage ledger: atomic reservations under concurrency, settle, release, expiry."""

from __future__ import annotations

import asyncio
import uuid

import grpc
from google.protobuf import duration_pb2, field_mask_pb2
from google.rpc import error_details_pb2

from corral.identity.v1 import identity_service_pb2 as pb
from corral.identity.v1 import quota_pb2, role_pb2, usage_pb2
from tests.identity.conftest import Identity, bearer, detail_of, fails
from tests.identity.world import create_user

ORG = "organizations/default"
SESSIONS = usage_pb2.USAGE_KIND_SESSIONS
TOKENS = usage_pb2.USAGE_KIND_TOKENS


def _reserve(
    subject: str, *amounts: tuple[int, int], ttl: float = 60, request_id: str | None = None
) -> pb.ReserveUsageRequest:
    return pb.ReserveUsageRequest(
        parent=ORG,
        subject=subject,
        amounts=[usage_pb2.UsageAmount(kind=k, amount=a) for k, a in amounts],  # type: ignore[arg-type]
        ttl=duration_pb2.Duration(seconds=int(ttl), nanos=int((ttl % 1) * 1e9)),
        request_id=request_id or str(uuid.uuid4()),
    )


async def _limit(identity: Identity, root: str, name: str, **limits: int) -> quota_pb2.Quota:
    reply = await identity.stub.UpdateQuota(
        pb.UpdateQuotaRequest(
            quota=quota_pb2.Quota(name=name, **limits),
            update_mask=field_mask_pb2.FieldMask(paths=list(limits)),
        ),
        metadata=bearer(root),
    )
    return reply.quota


async def test_concurrent_reservations_never_overshoot(identity: Identity) -> None:
    root = await identity.root()
    await _limit(identity, root, f"{ORG}/quota", max_concurrent_sessions=5)
    results = await asyncio.gather(
        *(
            identity.stub.ReserveUsage(_reserve(ORG, (SESSIONS, 1)), metadata=bearer(root))
            for _ in range(20)
        ),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, pb.ReserveUsageResponse)]
    lost = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(won) == 5, [
        r for r in results if not isinstance(r, pb.ReserveUsageResponse | grpc.aio.AioRpcError)
    ]
    assert len(lost) == 15
    assert all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in lost)
    failure = detail_of(lost[0], error_details_pb2.QuotaFailure)
    assert failure.violations[0].subject == ORG
    assert "max_concurrent_sessions" in failure.violations[0].description
    quota = (
        await identity.stub.GetQuota(pb.GetQuotaRequest(name=f"{ORG}/quota"), metadata=bearer(root))
    ).quota
    assert quota.usage.concurrent_sessions == 5

    # Releasing one frees exactly one slot.
    await identity.stub.ReleaseUsage(
        pb.ReleaseUsageRequest(name=won[0].usage_reservation.name), metadata=bearer(root)
    )
    await identity.stub.ReserveUsage(_reserve(ORG, (SESSIONS, 1)), metadata=bearer(root))
    await fails(
        identity.stub.ReserveUsage(_reserve(ORG, (SESSIONS, 1)), metadata=bearer(root)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "QUOTA_EXCEEDED",
    )


async def test_user_is_held_to_their_quota_and_the_organizations(identity: Identity) -> None:
    root = await identity.root()
    user = await create_user(identity, root, ORG, role_pb2.ROLE_USER, "spender")
    await _limit(identity, root, f"{ORG}/quota", tokens_per_month=1000)
    await _limit(identity, root, f"{user.name}/quota", tokens_per_month=300)
    held = await identity.stub.ReserveUsage(
        _reserve(user.name, (TOKENS, 300)), metadata=bearer(root)
    )
    error = await fails(
        identity.stub.ReserveUsage(_reserve(user.name, (TOKENS, 1)), metadata=bearer(root)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "QUOTA_EXCEEDED",
    )
    assert [v.subject for v in detail_of(error, error_details_pb2.QuotaFailure).violations] == [
        user.name
    ]
    # Settling for less gives the rest back; the tokens used stay used for the month.
    settled = await identity.stub.SettleUsage(
        pb.SettleUsageRequest(
            name=held.usage_reservation.name,
            actual_amounts=[usage_pb2.UsageAmount(kind=TOKENS, amount=120)],
        ),
        metadata=bearer(root),
    )
    assert settled.usage_reservation.state == usage_pb2.UsageReservation.STATE_SETTLED
    again = await identity.stub.SettleUsage(  # idempotent for the same amounts
        pb.SettleUsageRequest(
            name=held.usage_reservation.name,
            actual_amounts=[usage_pb2.UsageAmount(kind=TOKENS, amount=120)],
        ),
        metadata=bearer(root),
    )
    assert again.usage_reservation.settle_time == settled.usage_reservation.settle_time
    await identity.stub.ReserveUsage(_reserve(user.name, (TOKENS, 180)), metadata=bearer(root))
    user_quota = (
        await identity.stub.GetQuota(
            pb.GetQuotaRequest(name=f"{user.name}/quota"), metadata=bearer(root)
        )
    ).quota
    assert (user_quota.usage.tokens, user_quota.usage.reserved_tokens) == (120, 180)
    org_quota = (
        await identity.stub.GetQuota(pb.GetQuotaRequest(name=f"{ORG}/quota"), metadata=bearer(root))
    ).quota
    assert (org_quota.usage.tokens, org_quota.usage.reserved_tokens) == (120, 180)
    report = (
        await identity.stub.GetUsageReport(
            pb.GetUsageReportRequest(name=f"{ORG}/usageReport"), metadata=bearer(root)
        )
    ).usage_report
    assert report.totals.tokens == 120
    assert report.by_principal[user.name].tokens == 120


async def test_retry_with_same_request_id_holds_nothing_more(identity: Identity) -> None:
    root = await identity.root()
    await _limit(identity, root, f"{ORG}/quota", max_concurrent_runs=1)
    request = _reserve(ORG, (usage_pb2.USAGE_KIND_RUNS, 1))
    first = await identity.stub.ReserveUsage(request, metadata=bearer(root))
    second = await identity.stub.ReserveUsage(request, metadata=bearer(root))
    assert first.usage_reservation.name == second.usage_reservation.name


async def test_unsettled_reservations_expire_and_give_back(identity: Identity) -> None:
    root = await identity.root()
    await _limit(identity, root, f"{ORG}/quota", max_concurrent_sessions=1)
    held = await identity.stub.ReserveUsage(
        _reserve(ORG, (SESSIONS, 1), ttl=1), metadata=bearer(root)
    )
    await fails(
        identity.stub.ReserveUsage(_reserve(ORG, (SESSIONS, 1)), metadata=bearer(root)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )
    identity.clock.advance(2)
    await identity.stub.ReserveUsage(_reserve(ORG, (SESSIONS, 1)), metadata=bearer(root))
    await fails(
        identity.stub.SettleUsage(
            pb.SettleUsageRequest(name=held.usage_reservation.name), metadata=bearer(root)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "RESERVATION_EXPIRED",
    )
    released = await identity.stub.ReleaseUsage(
        pb.ReleaseUsageRequest(name=held.usage_reservation.name), metadata=bearer(root)
    )
    assert released.usage_reservation.state == usage_pb2.UsageReservation.STATE_EXPIRED


async def test_quota_update_mask_and_etag(identity: Identity) -> None:
    root = await identity.root()
    quota = await _limit(identity, root, f"{ORG}/quota", storage_bytes=10, tokens_per_month=5)
    assert quota.HasField("storage_bytes")
    assert quota.storage_bytes == 10
    cleared = await identity.stub.UpdateQuota(
        pb.UpdateQuotaRequest(
            quota=quota_pb2.Quota(name=f"{ORG}/quota", etag=quota.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["storage_bytes"]),
        ),
        metadata=bearer(root),
    )
    assert not cleared.quota.HasField("storage_bytes")
    assert cleared.quota.tokens_per_month == 5
    await fails(
        identity.stub.UpdateQuota(
            pb.UpdateQuotaRequest(
                quota=quota_pb2.Quota(name=f"{ORG}/quota", etag=quota.etag, storage_bytes=1),
                update_mask=field_mask_pb2.FieldMask(paths=["storage_bytes"]),
            ),
            metadata=bearer(root),
        ),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )
    await fails(
        identity.stub.UpdateQuota(
            pb.UpdateQuotaRequest(
                quota=quota_pb2.Quota(name=f"{ORG}/quota"),
                update_mask=field_mask_pb2.FieldMask(paths=["usage"]),
            ),
            metadata=bearer(root),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_tokens_carry_the_request_rate_quotas(identity: Identity) -> None:
    """What every service's rate limiter applies: the user's requests_per_minute as `rpm`,
    the organisation's as `org_rpm` (read from the token, so no service asks identity)."""
    import jwt

    root = await identity.root()
    before = jwt.decode(root, options={"verify_signature": False})
    assert "rpm" not in before and "org_rpm" not in before  # no quota: the default applies
    await _limit(identity, root, f"{ORG}/quota", requests_per_minute=1200)
    user = await create_user(identity, root, ORG, role_pb2.ROLE_USER, "rate")
    await _limit(identity, root, f"{user.name}/quota", requests_per_minute=30)
    grant = await identity.login(user.email)
    claims = jwt.decode(grant.token.access_token, options={"verify_signature": False})
    assert (claims["rpm"], claims["org_rpm"]) == (30, 1200)


async def test_settle_and_release_answer_a_retry_as_the_first_call(identity: Identity) -> None:
    """What the session service's outbox relies on when it did not hear back: the same
    SettleUsage after the settle and the release went through is OK, and so is the release;
    other amounts are refused, and a reservation released unsettled cannot be settled."""
    root = await identity.root()
    held = await identity.stub.ReserveUsage(
        _reserve(ORG, (SESSIONS, 1), (TOKENS, 5)), metadata=bearer(root)
    )
    name = held.usage_reservation.name
    settle = pb.SettleUsageRequest(
        name=name,
        actual_amounts=[
            usage_pb2.UsageAmount(kind=SESSIONS, amount=1),
            usage_pb2.UsageAmount(kind=TOKENS, amount=3),
        ],
    )
    release = pb.ReleaseUsageRequest(name=name)
    for _ in range(2):
        settled = await identity.stub.SettleUsage(settle, metadata=bearer(root))
        assert settled.usage_reservation.name == name
        await identity.stub.ReleaseUsage(release, metadata=bearer(root))
    quota = (
        await identity.stub.GetQuota(pb.GetQuotaRequest(name=f"{ORG}/quota"), metadata=bearer(root))
    ).quota
    assert (quota.usage.concurrent_sessions, quota.usage.tokens) == (0, 3)  # counted once
    other = pb.SettleUsageRequest(
        name=name, actual_amounts=[usage_pb2.UsageAmount(kind=TOKENS, amount=4)]
    )
    await fails(
        identity.stub.SettleUsage(other, metadata=bearer(root)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ALREADY_SETTLED",
    )
    unsettled = await identity.stub.ReserveUsage(_reserve(ORG, (TOKENS, 5)), metadata=bearer(root))
    await identity.stub.ReleaseUsage(
        pb.ReleaseUsageRequest(name=unsettled.usage_reservation.name), metadata=bearer(root)
    )
    await fails(
        identity.stub.SettleUsage(
            pb.SettleUsageRequest(name=unsettled.usage_reservation.name), metadata=bearer(root)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "RESERVATION_RELEASED",
    )
