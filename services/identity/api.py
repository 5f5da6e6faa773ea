"""The grpc.aio servicer: protobuf <-> domain, request validation, and nothing else."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from google.protobuf import timestamp_pb2

from corral.identity.v1 import (
    api_key_pb2,
    audit_event_pb2,
    identity_service_pb2_grpc,
    organization_pb2,
    quota_pb2,
    role_pb2,
    service_account_pb2,
    signing_key_pb2,
    usage_pb2,
    user_pb2,
)
from corral.identity.v1 import (
    identity_service_pb2 as pb,
)
from corral.libs.auth.caller import current_caller
from corral.libs.errors import Validator
from corral.libs.grpc.interceptors import CallInfo
from corral.services.identity import domain, service, tokens
from corral.services.identity.domain import (
    EMAIL,
    LIMIT_FIELDS,
    ApiKeyState,
    KeyState,
    Outcome,
    ReservationState,
    Role,
    State,
    UsageKind,
    parse_name,
)

if TYPE_CHECKING:
    import grpc

    Ctx = grpc.aio.ServicerContext[Any, Any]
else:
    Ctx = Any

SERVICE_NAME = "corral.identity.v1.IdentityService"
PUBLIC_METHODS = tuple(
    f"/{SERVICE_NAME}/{name}"
    for name in ("Login", "RefreshToken", "Logout", "ExchangeApiKey", "GetJwks")
)

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


def api_key_pb(key: domain.ApiKey) -> api_key_pb2.ApiKey:
    return api_key_pb2.ApiKey(
        name=key.name,
        display_name=key.display_name,
        key_prefix=key.key_prefix,
        state=API_KEY_STATE[key.state_at(domain.now())],
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
        name=f"signingKeys/{key.kid}",
        algorithm=key.algorithm,
        state=KEY_STATE[key.state],
        public_key=jwk_pb(key.public_jwk),
        create_time=ts(key.create_time),
        activate_time=ts(key.activate_time),
        retire_time=ts(key.retire_time),
        unpublish_time=ts(key.unpublish_time),
    )


def grant_pb(grant: service.TokenGrant) -> pb.TokenGrant:
    return pb.TokenGrant(
        access_token=grant.access_token,
        token_type="Bearer",
        access_token_expire_time=ts(grant.access_expire_time),
        refresh_token=grant.refresh_token,
        refresh_token_expire_time=ts(grant.refresh_expire_time),
    )


def quota_pb(view: service.QuotaView) -> quota_pb2.Quota:
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


def totals_pb(t: service.UsageTotals) -> usage_pb2.UsageTotals:
    return usage_pb2.UsageTotals(
        session_turns=t.session_turns,
        task_runs=t.task_runs,
        tokens=t.tokens,
        cost_usd_micros=t.cost_usd_micros,
        storage_bytes=t.storage_bytes,
    )


def audit_event_pb(e: domain.AuditEvent) -> audit_event_pb2.AuditEvent:
    return audit_event_pb2.AuditEvent(
        name=e.name,
        event_time=ts(e.event_time),
        actor=e.actor,
        organization=domain.org_name(e.organization_id),
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


def _peer_ip(peer: str) -> str:
    """``ipv4:1.2.3.4:5678`` / ``ipv6:[::1]:5678`` -> the address."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return rest or peer


def request_context(context: Ctx) -> service.Context:
    metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    caller = current_caller()
    principal = domain.Principal.from_caller(caller) if caller else None
    family = ""
    if caller is not None:
        family = str(tokens.token_claims(caller.token).get("sid", ""))
    source = metadata.get("x-envoy-external-address") or _peer_ip(context.peer() or "")
    return service.Context(
        principal=principal,
        source_ip=source,
        user_agent=metadata.get("user-agent", "")[:256],
        request_id=metadata.get("x-request-id", ""),
        family_id=family,
    )


def _name(kind: str, value: str, field_path: str) -> tuple[str, ...]:
    ids = parse_name(kind, value)
    if ids is None:
        check = Validator()
        check.add(field_path, f"must be a {kind.replace('_', ' ')} resource name")
        check.raise_if_any()
        raise AssertionError("unreachable")  # pragma: no cover
    return ids


def _mask(paths: Iterable[str], allowed: Iterable[str]) -> list[str]:
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


def _role(value: int, field_path: str, check: Validator) -> Role:
    role = ROLE_FROM_PB.get(value)  # type: ignore[call-overload]
    check.check(role is not None, field_path, "must be ROLE_ADMIN, ROLE_USER or ROLE_VIEWER")
    return role or Role.VIEWER


def _subject_for(name: str, suffix: str, field_path: str) -> str:
    """``organizations/o/quota`` -> ``organizations/o``; user forms likewise."""
    kinds = {"/quota": ("org_quota", "user_quota"), "/usageReport": ("org_report", "user_report")}
    if any(parse_name(k, name) for k in kinds[suffix]):
        return name.removesuffix(suffix)
    check = Validator()
    check.add(
        field_path,
        f"must be organizations/{{o}}{suffix} or organizations/{{o}}/users/{{u}}{suffix}",
    )
    check.raise_if_any()
    raise AssertionError("unreachable")  # pragma: no cover


def _amounts(values: Iterable[usage_pb2.UsageAmount], field_path: str) -> dict[UsageKind, int]:
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


def _check_email(email: str, field_path: str, check: Validator) -> None:
    check.check(bool(EMAIL.match(email.strip())), field_path, "must be an email address")


class IdentityApi(identity_service_pb2_grpc.IdentityServiceServicer):
    def __init__(self, identity: service.IdentityService) -> None:
        self._identity = identity

    # ---- organizations ----

    async def GetOrganization(
        self, request: pb.GetOrganizationRequest, context: Ctx
    ) -> pb.GetOrganizationResponse:
        (org_id,) = _name("organization", request.name, "name")
        org = await self._identity.get_organization(request_context(context), org_id)
        return pb.GetOrganizationResponse(organization=organization_pb(org))

    async def ListOrganizations(
        self, request: pb.ListOrganizationsRequest, context: Ctx
    ) -> pb.ListOrganizationsResponse:
        result = await self._identity.list_organizations(
            request_context(context),
            request.page_size,
            request.page_token,
            request.filter,
            request.order_by,
        )
        return pb.ListOrganizationsResponse(
            organizations=[organization_pb(o) for o in result.items],
            next_page_token=result.next_page_token,
            total_size=result.total_size,
        )

    async def CreateOrganization(
        self, request: pb.CreateOrganizationRequest, context: Ctx
    ) -> pb.CreateOrganizationResponse:
        check = Validator()
        display_name = request.organization.display_name.strip()
        check.check(
            1 <= len(display_name) <= 200, "organization.display_name", "must be 1-200 characters"
        )
        if request.organization_id:
            check.check(
                bool(domain.ORGANIZATION_ID.match(request.organization_id)),
                "organization_id",
                "must be 3-63 characters of [a-z0-9-], starting with a letter",
            )
        admin = None
        if request.HasField("initial_admin"):
            _check_email(request.initial_admin.email, "initial_admin.email", check)
            check.require(request.initial_admin.password, "initial_admin.password")
            admin = domain.User(
                id="",
                organization_id="",
                email=request.initial_admin.email,
                display_name=request.initial_admin.display_name,
                role=Role.ADMIN,
                password_hash="",
            )
        check.raise_if_any()
        org, user = await self._identity.create_organization(
            request_context(context),
            request.organization_id,
            display_name,
            admin,
            request.initial_admin.password,
            request.request_id,
        )
        return pb.CreateOrganizationResponse(
            organization=organization_pb(org), initial_admin=user_pb(user) if user else None
        )

    async def UpdateOrganization(
        self, request: pb.UpdateOrganizationRequest, context: Ctx
    ) -> pb.UpdateOrganizationResponse:
        (org_id,) = _name("organization", request.organization.name, "organization.name")
        fields = _mask(request.update_mask.paths, ["display_name"])
        changes = {"display_name": request.organization.display_name.strip()}
        check = Validator()
        check.check(
            1 <= len(changes["display_name"]) <= 200,
            "organization.display_name",
            "must be 1-200 characters",
        )
        check.raise_if_any()
        org = await self._identity.update_organization(
            request_context(context),
            org_id,
            {k: v for k, v in changes.items() if k in fields},
            request.organization.etag,
        )
        return pb.UpdateOrganizationResponse(organization=organization_pb(org))

    async def DisableOrganization(
        self, request: pb.DisableOrganizationRequest, context: Ctx
    ) -> pb.DisableOrganizationResponse:
        (org_id,) = _name("organization", request.name, "name")
        org = await self._identity.set_organization_state(
            request_context(context), org_id, State.DISABLED, request.reason
        )
        return pb.DisableOrganizationResponse(organization=organization_pb(org))

    async def EnableOrganization(
        self, request: pb.EnableOrganizationRequest, context: Ctx
    ) -> pb.EnableOrganizationResponse:
        (org_id,) = _name("organization", request.name, "name")
        org = await self._identity.set_organization_state(
            request_context(context), org_id, State.ACTIVE
        )
        return pb.EnableOrganizationResponse(organization=organization_pb(org))

    # ---- users ----

    async def GetUser(self, request: pb.GetUserRequest, context: Ctx) -> pb.GetUserResponse:
        org_id, user_id = _name("user", request.name, "name")
        user = await self._identity.get_user(request_context(context), org_id, user_id)
        return pb.GetUserResponse(user=user_pb(user))

    async def ListUsers(self, request: pb.ListUsersRequest, context: Ctx) -> pb.ListUsersResponse:
        (org_id,) = _name("organization", request.parent, "parent")
        result = await self._identity.list_users(
            request_context(context),
            org_id,
            request.page_size,
            request.page_token,
            request.filter,
            request.order_by,
        )
        return pb.ListUsersResponse(
            users=[user_pb(u) for u in result.items],
            next_page_token=result.next_page_token,
            total_size=result.total_size,
        )

    async def CreateUser(
        self, request: pb.CreateUserRequest, context: Ctx
    ) -> pb.CreateUserResponse:
        (org_id,) = _name("organization", request.parent, "parent")
        check = Validator()
        _check_email(request.user.email, "user.email", check)
        check.check(len(request.user.display_name) <= 200, "user.display_name", "is too long")
        role = _role(request.user.role, "user.role", check)
        check.require(request.user.password, "user.password")
        check.raise_if_any()
        user = await self._identity.create_user(
            request_context(context),
            org_id,
            request.user.email,
            request.user.display_name,
            role,
            request.user.password,
            request.request_id,
        )
        return pb.CreateUserResponse(user=user_pb(user))

    async def UpdateUser(
        self, request: pb.UpdateUserRequest, context: Ctx
    ) -> pb.UpdateUserResponse:
        org_id, user_id = _name("user", request.user.name, "user.name")
        fields = _mask(request.update_mask.paths, ["display_name", "email", "role"])
        check = Validator()
        changes: dict[str, Any] = {}
        if "display_name" in fields:
            check.check(len(request.user.display_name) <= 200, "user.display_name", "is too long")
            changes["display_name"] = request.user.display_name
        if "email" in fields:
            _check_email(request.user.email, "user.email", check)
            changes["email"] = request.user.email
        if "role" in fields:
            changes["role"] = _role(request.user.role, "user.role", check)
        check.raise_if_any()
        user = await self._identity.update_user(
            request_context(context), org_id, user_id, changes, request.user.etag
        )
        return pb.UpdateUserResponse(user=user_pb(user))

    async def ChangeUserPassword(
        self, request: pb.ChangeUserPasswordRequest, context: Ctx
    ) -> pb.ChangeUserPasswordResponse:
        org_id, user_id = _name("user", request.name, "name")
        check = Validator()
        check.require(request.new_password, "new_password")
        check.raise_if_any()
        await self._identity.change_password(
            request_context(context),
            org_id,
            user_id,
            request.current_password,
            request.new_password,
        )
        return pb.ChangeUserPasswordResponse()

    async def DisableUser(
        self, request: pb.DisableUserRequest, context: Ctx
    ) -> pb.DisableUserResponse:
        org_id, user_id = _name("user", request.name, "name")
        user = await self._identity.set_user_state(
            request_context(context), org_id, user_id, State.DISABLED, request.reason
        )
        return pb.DisableUserResponse(user=user_pb(user))

    async def EnableUser(
        self, request: pb.EnableUserRequest, context: Ctx
    ) -> pb.EnableUserResponse:
        org_id, user_id = _name("user", request.name, "name")
        user = await self._identity.set_user_state(
            request_context(context), org_id, user_id, State.ACTIVE
        )
        return pb.EnableUserResponse(user=user_pb(user))

    # ---- service accounts and API keys ----

    async def GetServiceAccount(
        self, request: pb.GetServiceAccountRequest, context: Ctx
    ) -> pb.GetServiceAccountResponse:
        org_id, sa_id = _name("service_account", request.name, "name")
        account = await self._identity.get_service_account(request_context(context), org_id, sa_id)
        return pb.GetServiceAccountResponse(service_account=service_account_pb(account))

    async def ListServiceAccounts(
        self, request: pb.ListServiceAccountsRequest, context: Ctx
    ) -> pb.ListServiceAccountsResponse:
        (org_id,) = _name("organization", request.parent, "parent")
        result = await self._identity.list_service_accounts(
            request_context(context),
            org_id,
            request.page_size,
            request.page_token,
            request.filter,
            request.order_by,
        )
        return pb.ListServiceAccountsResponse(
            service_accounts=[service_account_pb(a) for a in result.items],
            next_page_token=result.next_page_token,
            total_size=result.total_size,
        )

    async def CreateServiceAccount(
        self, request: pb.CreateServiceAccountRequest, context: Ctx
    ) -> pb.CreateServiceAccountResponse:
        (org_id,) = _name("organization", request.parent, "parent")
        account = request.service_account
        check = Validator()
        check.check(
            1 <= len(account.display_name.strip()) <= 200,
            "service_account.display_name",
            "must be 1-200 characters",
        )
        check.check(len(account.description) <= 1000, "service_account.description", "is too long")
        role = _role(account.role, "service_account.role", check)
        check.raise_if_any()
        created = await self._identity.create_service_account(
            request_context(context),
            org_id,
            account.display_name.strip(),
            account.description,
            role,
            request.request_id,
        )
        return pb.CreateServiceAccountResponse(service_account=service_account_pb(created))

    async def UpdateServiceAccount(
        self, request: pb.UpdateServiceAccountRequest, context: Ctx
    ) -> pb.UpdateServiceAccountResponse:
        account = request.service_account
        org_id, sa_id = _name("service_account", account.name, "service_account.name")
        fields = _mask(request.update_mask.paths, ["display_name", "description", "role"])
        check = Validator()
        changes: dict[str, Any] = {}
        if "display_name" in fields:
            check.check(
                1 <= len(account.display_name.strip()) <= 200,
                "service_account.display_name",
                "must be 1-200 characters",
            )
            changes["display_name"] = account.display_name.strip()
        if "description" in fields:
            check.check(
                len(account.description) <= 1000, "service_account.description", "is too long"
            )
            changes["description"] = account.description
        if "role" in fields:
            changes["role"] = _role(account.role, "service_account.role", check)
        check.raise_if_any()
        updated = await self._identity.update_service_account(
            request_context(context), org_id, sa_id, changes, account.etag
        )
        return pb.UpdateServiceAccountResponse(service_account=service_account_pb(updated))

    async def DeleteServiceAccount(
        self, request: pb.DeleteServiceAccountRequest, context: Ctx
    ) -> pb.DeleteServiceAccountResponse:
        org_id, sa_id = _name("service_account", request.name, "name")
        await self._identity.delete_service_account(
            request_context(context), org_id, sa_id, request.etag
        )
        return pb.DeleteServiceAccountResponse()

    async def GetApiKey(self, request: pb.GetApiKeyRequest, context: Ctx) -> pb.GetApiKeyResponse:
        ids = _name("api_key", request.name, "name")
        key = await self._identity.get_api_key(request_context(context), *ids)
        return pb.GetApiKeyResponse(api_key=api_key_pb(key))

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: Ctx
    ) -> pb.ListApiKeysResponse:
        org_id, sa_id = _name("service_account", request.parent, "parent")
        result = await self._identity.list_api_keys(
            request_context(context),
            org_id,
            sa_id,
            request.page_size,
            request.page_token,
            request.filter,
        )
        return pb.ListApiKeysResponse(
            api_keys=[api_key_pb(k) for k in result.items],
            next_page_token=result.next_page_token,
        )

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: Ctx
    ) -> pb.CreateApiKeyResponse:
        org_id, sa_id = _name("service_account", request.parent, "parent")
        check = Validator()
        check.check(len(request.api_key.display_name) <= 200, "api_key.display_name", "is too long")
        check.raise_if_any()
        expire = (
            seconds_of(request.api_key.expire_time)
            if request.api_key.HasField("expire_time")
            else None
        )
        key, plaintext = await self._identity.create_api_key(
            request_context(context),
            org_id,
            sa_id,
            request.api_key.display_name,
            expire,
            request.request_id,
        )
        return pb.CreateApiKeyResponse(api_key=api_key_pb(key), plaintext_key=plaintext)

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: Ctx
    ) -> pb.RevokeApiKeyResponse:
        ids = _name("api_key", request.name, "name")
        key = await self._identity.revoke_api_key(request_context(context), *ids)
        return pb.RevokeApiKeyResponse(api_key=api_key_pb(key))

    # ---- sign-in and tokens ----

    async def Login(self, request: pb.LoginRequest, context: Ctx) -> pb.LoginResponse:
        check = Validator()
        check.require(request.email, "email")
        check.require(request.password, "password")
        org_id = ""
        if request.organization:
            ids = parse_name("organization", request.organization)
            check.check(ids is not None, "organization", "must be organizations/{organization}")
            org_id = ids[0] if ids else ""
        check.raise_if_any()
        grant, user = await self._identity.login(
            request_context(context), request.email, request.password, org_id
        )
        return pb.LoginResponse(token=grant_pb(grant), user=user_pb(user))

    async def RefreshToken(
        self, request: pb.RefreshTokenRequest, context: Ctx
    ) -> pb.RefreshTokenResponse:
        check = Validator()
        check.require(request.refresh_token, "refresh_token")
        check.raise_if_any()
        grant = await self._identity.refresh(request_context(context), request.refresh_token)
        return pb.RefreshTokenResponse(token=grant_pb(grant))

    async def Logout(self, request: pb.LogoutRequest, context: Ctx) -> pb.LogoutResponse:
        check = Validator()
        check.require(request.refresh_token, "refresh_token")
        check.raise_if_any()
        await self._identity.logout(request_context(context), request.refresh_token)
        return pb.LogoutResponse()

    async def LogoutEverywhere(
        self, request: pb.LogoutEverywhereRequest, context: Ctx
    ) -> pb.LogoutEverywhereResponse:
        if request.user:
            _name("user", request.user, "user")
        count = await self._identity.logout_everywhere(request_context(context), request.user)
        return pb.LogoutEverywhereResponse(revoked_token_families=count)

    async def ExchangeApiKey(
        self, request: pb.ExchangeApiKeyRequest, context: Ctx
    ) -> pb.ExchangeApiKeyResponse:
        check = Validator()
        check.require(request.api_key, "api_key")
        check.raise_if_any()
        grant, account = await self._identity.exchange_api_key(
            request_context(context), request.api_key
        )
        return pb.ExchangeApiKeyResponse(token=grant_pb(grant), service_account=account)

    async def GetJwks(self, request: pb.GetJwksRequest, context: Ctx) -> pb.GetJwksResponse:
        keys = await self._identity.jwks()
        return pb.GetJwksResponse(keys=[jwk_pb(k) for k in keys])

    async def ListSigningKeys(
        self, request: pb.ListSigningKeysRequest, context: Ctx
    ) -> pb.ListSigningKeysResponse:
        result = await self._identity.list_signing_keys(
            request_context(context), request.page_size, request.page_token, request.filter
        )
        return pb.ListSigningKeysResponse(
            signing_keys=[signing_key_pb(k) for k in result.items],
            next_page_token=result.next_page_token,
        )

    async def RotateSigningKeys(
        self, request: pb.RotateSigningKeysRequest, context: Ctx
    ) -> pb.RotateSigningKeysResponse:
        rotation = await self._identity.rotate_signing_keys(
            request_context(context), request.revoke_previous
        )
        return pb.RotateSigningKeysResponse(
            active_key=signing_key_pb(rotation.active),
            pending_key=signing_key_pb(rotation.pending),
            previous_key=signing_key_pb(rotation.previous) if rotation.previous else None,
        )

    # ---- quotas and the usage ledger ----

    async def GetQuota(self, request: pb.GetQuotaRequest, context: Ctx) -> pb.GetQuotaResponse:
        subject = _subject_for(request.name, "/quota", "name")
        view = await self._identity.get_quota(request_context(context), subject)
        return pb.GetQuotaResponse(quota=quota_pb(view))

    async def UpdateQuota(
        self, request: pb.UpdateQuotaRequest, context: Ctx
    ) -> pb.UpdateQuotaResponse:
        subject = _subject_for(request.quota.name, "/quota", "quota.name")
        fields = _mask(request.update_mask.paths, LIMIT_FIELDS)
        check = Validator()
        changes: dict[str, int | None] = {}
        for name in fields:
            value = getattr(request.quota, name) if request.quota.HasField(name) else None  # type: ignore[arg-type]
            check.check(value is None or value >= 0, f"quota.{name}", "must not be negative")
            changes[name] = value
        check.raise_if_any()
        view = await self._identity.update_quota(
            request_context(context), subject, changes, request.quota.etag
        )
        return pb.UpdateQuotaResponse(quota=quota_pb(view))

    async def ReserveUsage(
        self, request: pb.ReserveUsageRequest, context: Ctx
    ) -> pb.ReserveUsageResponse:
        (org_id,) = _name("organization", request.parent, "parent")
        check = Validator()
        check.require(request.subject, "subject")
        check.check(bool(request.amounts), "amounts", "is required")
        ttl = request.ttl.ToNanoseconds() / 1e9
        check.check(1 <= ttl <= 86400, "ttl", "must be between 1 second and 24 hours")
        check.require(request.request_id, "request_id")
        check.check(len(request.request_id) <= 64, "request_id", "is too long")
        check.raise_if_any()
        amounts = _amounts(request.amounts, "amounts")
        reservation = await self._identity.reserve(
            request_context(context),
            org_id,
            request.subject,
            amounts,
            request.reference,
            ttl,
            request.request_id,
        )
        return pb.ReserveUsageResponse(usage_reservation=reservation_pb(reservation))

    async def SettleUsage(
        self, request: pb.SettleUsageRequest, context: Ctx
    ) -> pb.SettleUsageResponse:
        org_id, reservation_id = _name("reservation", request.name, "name")
        actual = _amounts(request.actual_amounts, "actual_amounts")
        reservation = await self._identity.settle(
            request_context(context), org_id, reservation_id, actual
        )
        return pb.SettleUsageResponse(usage_reservation=reservation_pb(reservation))

    async def ReleaseUsage(
        self, request: pb.ReleaseUsageRequest, context: Ctx
    ) -> pb.ReleaseUsageResponse:
        org_id, reservation_id = _name("reservation", request.name, "name")
        reservation = await self._identity.release(request_context(context), org_id, reservation_id)
        return pb.ReleaseUsageResponse(usage_reservation=reservation_pb(reservation))

    async def GetUsageReport(
        self, request: pb.GetUsageReportRequest, context: Ctx
    ) -> pb.GetUsageReportResponse:
        subject = _subject_for(request.name, "/usageReport", "name")
        report = await self._identity.usage_report(
            request_context(context),
            subject,
            seconds_of(request.start_time) if request.HasField("start_time") else None,
            seconds_of(request.end_time) if request.HasField("end_time") else None,
        )
        return pb.GetUsageReportResponse(
            usage_report=usage_pb2.UsageReport(
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
        )

    # ---- audit log ----

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: Ctx
    ) -> pb.ListAuditEventsResponse:
        org_id = (
            None
            if request.parent == "organizations/-"
            else _name("organization", request.parent, "parent")[0]
        )
        result = await self._identity.list_audit_events(
            request_context(context),
            org_id,
            request.page_size,
            request.page_token,
            request.filter,
            request.order_by,
        )
        return pb.ListAuditEventsResponse(
            audit_events=[audit_event_pb(e) for e in result.items],
            next_page_token=result.next_page_token,
        )

    async def WriteAuditEvents(
        self, request: pb.WriteAuditEventsRequest, context: Ctx
    ) -> pb.WriteAuditEventsResponse:
        org_id = (
            None
            if request.parent == "organizations/-"
            else _name("organization", request.parent, "parent")[0]
        )
        check = Validator()
        check.check(1 <= len(request.audit_events) <= 500, "audit_events", "must hold 1-500 events")
        check.require(request.request_id, "request_id")
        check.check(len(request.request_id) <= 64, "request_id", "is too long")
        events = []
        for i, e in enumerate(request.audit_events):
            where = f"audit_events[{i}]"
            ids = parse_name("organization", e.organization)
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
            events.append(
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
        check.raise_if_any()
        written = await self._identity.write_audit_events(
            request_context(context), org_id, events, request.request_id
        )
        return pb.WriteAuditEventsResponse(written_count=written)


class TokenCheckHook:
    """After the shared verifier: refuse tokens identity knows to be revoked."""

    def __init__(self, identity: service.IdentityService) -> None:
        self._identity = identity

    async def before(self, call: CallInfo) -> None:
        if call.caller is not None:
            await self._identity.check_access(call.caller)
