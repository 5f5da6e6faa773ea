"""Protobuf <-> identity's domain: messages from domain objects, and the request parsing the
servicer shares (resource names, update masks, roles, usage amounts, the caller's context)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from google.protobuf import timestamp_pb2

from corral.identity.v1 import (
    api_key_pb2,
    audit_event_pb2,
    organization_pb2,
    quota_pb2,
    role_pb2,
    service_account_pb2,
    signing_key_pb2,
    usage_pb2,
    user_pb2,
)
from corral.identity.v1 import identity_service_pb2 as pb
from corral.libs.auth.caller import current_caller
from corral.libs.errors import Validator
from corral.libs.names import ResourcePattern, parse_any
from corral.libs.ratelimit import Networks, client_address
from corral.services.identity import domain, tokens
from corral.services.identity.authentication import TokenGrant
from corral.services.identity.base import Context, ListResult
from corral.services.identity.domain import (
    EMAIL,
    ORGANIZATION,
    SIGNING_KEY,
    USER,
    ApiKeyState,
    KeyState,
    Outcome,
    ReservationState,
    Role,
    State,
    UsageKind,
)
from corral.services.identity.ledger import QuotaView, UsageReport, UsageTotals
from corral.services.identity.queries import ListRequest

if TYPE_CHECKING:
    import grpc

    Ctx = grpc.aio.ServicerContext[Any, Any]
else:
    Ctx = Any

ROLE_TO_PB = {
    Role.ADMIN: role_pb2.ROLE_ADMIN,
    Role.USER: role_pb2.ROLE_USER,
    Role.VIEWER: role_pb2.ROLE_VIEWER,
}
ROLE_FROM_PB = {v: k for k, v in ROLE_TO_PB.items()}
KIND_TO_PB = {
    UsageKind.SESSIONS: usage_pb2.USAGE_KIND_SESSIONS,
    UsageKind.RUNS: usage_pb2.USAGE_KIND_RUNS,
    UsageKind.TOKENS: usage_pb2.USAGE_KIND_TOKENS,
    UsageKind.COST_USD_MICROS: usage_pb2.USAGE_KIND_COST_USD_MICROS,
    UsageKind.STORAGE_BYTES: usage_pb2.USAGE_KIND_STORAGE_BYTES,
}
KIND_FROM_PB = {v: k for k, v in KIND_TO_PB.items()}
OUTCOME_TO_PB = {
    Outcome.SUCCEEDED: audit_event_pb2.AuditEvent.OUTCOME_SUCCEEDED,
    Outcome.DENIED: audit_event_pb2.AuditEvent.OUTCOME_DENIED,
    Outcome.FAILED: audit_event_pb2.AuditEvent.OUTCOME_FAILED,
}
OUTCOME_FROM_PB = {v: k for k, v in OUTCOME_TO_PB.items()}


# ---- conversions ----


def ts(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def seconds_of(stamp: timestamp_pb2.Timestamp) -> float:
    return float(stamp.ToNanoseconds()) / 1e9


def organization_pb(org: domain.Organization) -> organization_pb2.Organization:
    return organization_pb2.Organization(
        name=org.name,
        display_name=org.display_name,
        state=(
            organization_pb2.Organization.STATE_ACTIVE
            if org.state is State.ACTIVE
            else organization_pb2.Organization.STATE_DISABLED
        ),
        create_time=ts(org.create_time),
        update_time=ts(org.update_time),
        etag=org.etag,
    )


def user_pb(user: domain.User) -> user_pb2.User:
    return user_pb2.User(
        name=user.name,
        email=user.email,
        display_name=user.display_name,
        role=ROLE_TO_PB[user.role],
        state=(
            user_pb2.User.STATE_ACTIVE
            if user.state is State.ACTIVE
            else user_pb2.User.STATE_DISABLED
        ),
        superuser=user.superuser,
        create_time=ts(user.create_time),
        update_time=ts(user.update_time),
        last_login_time=ts(user.last_login_time),
        etag=user.etag,
    )


def service_account_pb(account: domain.ServiceAccount) -> service_account_pb2.ServiceAccount:
    return service_account_pb2.ServiceAccount(
        name=account.name,
        display_name=account.display_name,
        description=account.description,
        role=ROLE_TO_PB[account.role],
        create_time=ts(account.create_time),
        update_time=ts(account.update_time),
        etag=account.etag,
    )


API_KEY_STATE = {
    ApiKeyState.ACTIVE: api_key_pb2.ApiKey.STATE_ACTIVE,
    ApiKeyState.EXPIRED: api_key_pb2.ApiKey.STATE_EXPIRED,
    ApiKeyState.REVOKED: api_key_pb2.ApiKey.STATE_REVOKED,
}


def api_key_pb(key: domain.ApiKey, at: float) -> api_key_pb2.ApiKey:
    """The key as the API shows it; its state (expired or not) is as of ``at``."""
    return api_key_pb2.ApiKey(
        name=key.name,
        display_name=key.display_name,
        key_prefix=key.key_prefix,
        state=API_KEY_STATE[key.state_at(at)],
        expire_time=ts(key.expire_time),
        create_time=ts(key.create_time),
        last_use_time=ts(key.last_use_time),
        revoke_time=ts(key.revoke_time),
    )


KEY_STATE = {
    KeyState.PENDING: signing_key_pb2.SigningKey.STATE_PENDING,
    KeyState.ACTIVE: signing_key_pb2.SigningKey.STATE_ACTIVE,
    KeyState.RETIRED: signing_key_pb2.SigningKey.STATE_RETIRED,
    KeyState.REVOKED: signing_key_pb2.SigningKey.STATE_REVOKED,
}


def jwk_pb(jwk: Mapping[str, str]) -> signing_key_pb2.JsonWebKey:
    return signing_key_pb2.JsonWebKey(**tokens.public_only(dict(jwk)))


def signing_key_pb(key: domain.SigningKeyRecord) -> signing_key_pb2.SigningKey:
    return signing_key_pb2.SigningKey(
        name=SIGNING_KEY.format(key.kid),
        algorithm=key.algorithm,
        state=KEY_STATE[key.state],
        public_key=jwk_pb(key.public_jwk),
        create_time=ts(key.create_time),
        activate_time=ts(key.activate_time),
        retire_time=ts(key.retire_time),
        unpublish_time=ts(key.unpublish_time),
    )


def grant_pb(grant: TokenGrant) -> pb.TokenGrant:
    return pb.TokenGrant(
        access_token=grant.access_token,
        token_type="Bearer",
        access_token_expire_time=ts(grant.access_expire_time),
        refresh_token=grant.refresh_token,
        refresh_token_expire_time=ts(grant.refresh_expire_time),
    )


def quota_pb(view: QuotaView) -> quota_pb2.Quota:
    quota = view.quota
    used = {k: view.usage.get(k, (0, 0)) for k in UsageKind}
    limits = {k: v for k, v in quota.limits.items() if v is not None}
    return quota_pb2.Quota(
        name=quota.name,
        usage=quota_pb2.QuotaUsage(
            concurrent_sessions=sum(used[UsageKind.SESSIONS]),
            concurrent_runs=sum(used[UsageKind.RUNS]),
            tokens=used[UsageKind.TOKENS][0],
            reserved_tokens=used[UsageKind.TOKENS][1],
            cost_usd_micros=used[UsageKind.COST_USD_MICROS][0],
            reserved_cost_usd_micros=used[UsageKind.COST_USD_MICROS][1],
            storage_bytes=sum(used[UsageKind.STORAGE_BYTES]),
        ),
        period_start_time=ts(view.period_start),
        period_end_time=ts(view.period_end),
        update_time=ts(quota.update_time),
        etag=quota.etag,
        **limits,
    )


RESERVATION_STATE = {
    ReservationState.RESERVED: usage_pb2.UsageReservation.STATE_RESERVED,
    ReservationState.SETTLED: usage_pb2.UsageReservation.STATE_SETTLED,
    ReservationState.RELEASED: usage_pb2.UsageReservation.STATE_RELEASED,
    ReservationState.EXPIRED: usage_pb2.UsageReservation.STATE_EXPIRED,
}


def amounts_pb(amounts: Mapping[UsageKind, int]) -> list[usage_pb2.UsageAmount]:
    return [usage_pb2.UsageAmount(kind=KIND_TO_PB[k], amount=v) for k, v in sorted(amounts.items())]


def reservation_pb(r: domain.Reservation) -> usage_pb2.UsageReservation:
    return usage_pb2.UsageReservation(
        name=r.name,
        subject=r.subject,
        amounts=amounts_pb(r.amounts),
        settled_amounts=amounts_pb(r.settled_amounts),
        reference=r.reference,
        state=RESERVATION_STATE[r.state],
        create_time=ts(r.create_time),
        expire_time=ts(r.expire_time),
        settle_time=ts(r.settle_time),
        end_time=ts(r.end_time),
    )


def totals_pb(t: UsageTotals) -> usage_pb2.UsageTotals:
    return usage_pb2.UsageTotals(
        session_turns=t.session_turns,
        task_runs=t.task_runs,
        tokens=t.tokens,
        cost_usd_micros=t.cost_usd_micros,
        storage_bytes=t.storage_bytes,
    )


def usage_report_pb(report: UsageReport) -> usage_pb2.UsageReport:
    return usage_pb2.UsageReport(
        name=report.name,
        start_time=ts(report.start_time),
        end_time=ts(report.end_time),
        totals=totals_pb(report.totals),
        daily=[
            usage_pb2.UsageBucket(start_time=ts(day), totals=totals_pb(t))
            for day, t in report.daily
        ],
        by_principal={k: totals_pb(v) for k, v in report.by_principal.items()},
    )


def audit_event_pb(e: domain.AuditEvent) -> audit_event_pb2.AuditEvent:
    return audit_event_pb2.AuditEvent(
        name=e.name,
        event_time=ts(e.event_time),
        actor=e.actor,
        organization=ORGANIZATION.format(e.organization_id),
        action=e.action,
        resource=e.resource,
        outcome=OUTCOME_TO_PB[e.outcome],
        status_code=e.status_code,  # type: ignore[arg-type]
        source_ip=e.source_ip,
        user_agent=e.user_agent,
        request_id=e.request_id,
        service=e.service,
        metadata=e.metadata,
        create_time=ts(e.create_time),
    )


# ---- request helpers ----


class _ListMessage(Protocol):
    page_size: int
    page_token: str
    filter: str


def page_of(result: ListResult[Any], *, total: bool = True) -> dict[str, Any]:
    """The paging fields of a List response: ``next_page_token`` (and ``total_size``)."""
    fields: dict[str, Any] = {"next_page_token": result.next_page_token}
    if total:
        fields["total_size"] = result.total_size
    return fields


def list_request(request: _ListMessage) -> ListRequest:
    """Paging, filter and order of any List request (``order_by`` where it has one)."""
    order_by = str(getattr(request, "order_by", ""))
    return ListRequest(request.page_size, request.page_token, request.filter, order_by)


def request_context(context: Ctx, trusted_proxies: Networks) -> Context:
    """Who is calling, and from where: the kit's :func:`~corral.libs.ratelimit.client_address`
    (a forwarded address only from a trusted proxy, the edge; else the connection's own), so
    the per-source login throttle and the audit log cannot be told another address."""
    metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    caller = current_caller()
    principal = domain.Principal.from_caller(caller) if caller else None
    family = ""
    if caller is not None:
        family = str(tokens.token_claims(caller.token).get("sid", ""))
    source = client_address(context.peer() or "", metadata, trusted_proxies)
    return Context(
        principal=principal,
        source_ip=source,
        user_agent=metadata.get("user-agent", "")[:256],
        request_id=metadata.get("x-request-id", ""),
        family_id=family,
    )


def mask(paths: Iterable[str], allowed: Iterable[str]) -> list[str]:
    allowed = list(allowed)
    fields = list(paths)
    check = Validator()
    check.check(bool(fields), "update_mask", "is required")
    if fields == ["*"]:
        return allowed
    for path in fields:
        check.check(path in allowed, "update_mask", f"{path!r} cannot be updated here")
    check.raise_if_any()
    return fields


def role_of(value: int, field_path: str, check: Validator) -> Role:
    role = ROLE_FROM_PB.get(value)  # type: ignore[call-overload]
    check.check(role is not None, field_path, "must be ROLE_ADMIN, ROLE_USER or ROLE_VIEWER")
    return role or Role.VIEWER


def subject_of(
    name: str, field_path: str, of_org: ResourcePattern, of_user: ResourcePattern
) -> str:
    """``organizations/o/quota`` -> ``organizations/o``; a user's form likewise."""
    which, ids = parse_any(name, field_path, of_org, of_user)
    return (ORGANIZATION, USER)[which].format(*ids)


def amounts_of(values: Iterable[usage_pb2.UsageAmount], field_path: str) -> dict[UsageKind, int]:
    check = Validator()
    found: dict[UsageKind, int] = {}
    for i, value in enumerate(values):
        kind = KIND_FROM_PB.get(value.kind)
        if kind is None:
            check.add(f"{field_path}[{i}].kind", "is required")
            continue
        check.check(kind not in found, f"{field_path}[{i}].kind", "repeats a kind")
        check.check(value.amount >= 0, f"{field_path}[{i}].amount", "must not be negative")
        found[kind] = value.amount
    check.raise_if_any()
    return found


def check_email(email: str, field_path: str, check: Validator) -> None:
    check.check(bool(EMAIL.match(email.strip())), field_path, "must be an email address")


def audit_events_of(
    events: Iterable[audit_event_pb2.AuditEvent], check: Validator
) -> list[domain.AuditEvent]:
    """Other services' events (``WriteAuditEvents``); what is wrong goes to ``check``."""
    found = []
    for i, e in enumerate(events):
        where = f"audit_events[{i}]"
        ids = ORGANIZATION.parse(e.organization)
        check.check(ids is not None, f"{where}.organization", "must be organizations/{o}")
        check.require(e.actor, f"{where}.actor")
        check.require(e.action, f"{where}.action")
        check.require(e.service, f"{where}.service")
        check.check(e.HasField("event_time"), f"{where}.event_time", "is required")
        outcome = OUTCOME_FROM_PB.get(e.outcome)
        check.check(outcome is not None, f"{where}.outcome", "is required")
        check.check(len(e.metadata) <= 32, f"{where}.metadata", "at most 32 entries")
        check.check(
            all(len(k) <= 64 and len(v) <= 1024 for k, v in e.metadata.items()),
            f"{where}.metadata",
            "keys at most 64 and values at most 1024 characters",
        )
        if ids is None or outcome is None:
            continue
        found.append(
            domain.AuditEvent(
                organization_id=ids[0],
                actor=e.actor,
                action=e.action,
                resource=e.resource,
                outcome=outcome,
                status_code=int(e.status_code),
                source_ip=e.source_ip,
                user_agent=e.user_agent,
                request_id=e.request_id,
                service=e.service,
                metadata=dict(e.metadata),
                event_time=seconds_of(e.event_time),
            )
        )
    return found
