"""The grpc.aio servicer: protobuf <-> domain, request validation, and nothing else."""

from __future__ import annotations

from typing import Any

from corral.identity.v1 import identity_service_pb2 as pb
from corral.identity.v1 import identity_service_pb2_grpc
from corral.libs.errors import Validator
from corral.libs.ratelimit import Networks
from corral.services.identity.base import Context
from corral.services.identity.converters import (
    Ctx,
    amounts_of,
    api_key_pb,
    audit_event_pb,
    audit_events_of,
    check_email,
    grant_pb,
    jwk_pb,
    list_request,
    mask,
    organization_pb,
    page_of,
    quota_pb,
    request_context,
    reservation_pb,
    role_of,
    seconds_of,
    service_account_pb,
    signing_key_pb,
    subject_of,
    usage_report_pb,
    user_pb,
)
from corral.services.identity.domain import (
    API_KEY,
    LIMIT_FIELDS,
    ORGANIZATION,
    ORGANIZATION_ID,
    ORGANIZATION_QUOTA,
    ORGANIZATION_USAGE_REPORT,
    RESERVATION,
    SERVICE_ACCOUNT,
    USER,
    USER_QUOTA,
    USER_USAGE_REPORT,
    Role,
    State,
    User,
)
from corral.services.identity.service import IdentityService

SERVICE_NAME = "corral.identity.v1.IdentityService"
PUBLIC_METHODS = tuple(
    f"/{SERVICE_NAME}/{name}"
    for name in ("Login", "RefreshToken", "Logout", "ExchangeApiKey", "GetJwks")
)


def _organization_or_all(parent: str) -> str | None:
    """``organizations/-`` (every organization) -> None; else the organization's id."""
    return None if parent == "organizations/-" else ORGANIZATION.parse_field(parent, "parent")[0]


class IdentityApi(identity_service_pb2_grpc.IdentityServiceServicer):
    def __init__(self, identity: IdentityService, trusted_proxies: Networks = ()) -> None:
        self._identity = identity
        self._trusted_proxies = trusted_proxies  # who may name the client's address: the edge

    def _context(self, context: Ctx) -> Context:
        return request_context(context, self._trusted_proxies)

    # ---- organizations ----

    async def GetOrganization(
        self, request: pb.GetOrganizationRequest, context: Ctx
    ) -> pb.GetOrganizationResponse:
        (org_id,) = ORGANIZATION.parse_field(request.name, "name")
        org = await self._identity.accounts.get_organization(self._context(context), org_id)
        return pb.GetOrganizationResponse(organization=organization_pb(org))

    async def ListOrganizations(
        self, request: pb.ListOrganizationsRequest, context: Ctx
    ) -> pb.ListOrganizationsResponse:
        result = await self._identity.accounts.list_organizations(
            self._context(context),
            list_request(request),
        )
        return pb.ListOrganizationsResponse(
            organizations=[organization_pb(o) for o in result.items],
            **page_of(result),
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
                bool(ORGANIZATION_ID.match(request.organization_id)),
                "organization_id",
                "must be 3-63 characters of [a-z0-9-], starting with a letter",
            )
        admin = None
        if request.HasField("initial_admin"):
            check_email(request.initial_admin.email, "initial_admin.email", check)
            check.require(request.initial_admin.password, "initial_admin.password")
            admin = User(
                id="",
                organization_id="",
                email=request.initial_admin.email,
                display_name=request.initial_admin.display_name,
                role=Role.ADMIN,
                password_hash="",
            )
        check.raise_if_any()
        org, user = await self._identity.accounts.create_organization(
            self._context(context),
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
        (org_id,) = ORGANIZATION.parse_field(request.organization.name, "organization.name")
        fields = mask(request.update_mask.paths, ["display_name"])
        changes = {"display_name": request.organization.display_name.strip()}
        check = Validator()
        check.check(
            1 <= len(changes["display_name"]) <= 200,
            "organization.display_name",
            "must be 1-200 characters",
        )
        check.raise_if_any()
        org = await self._identity.accounts.update_organization(
            self._context(context),
            org_id,
            {k: v for k, v in changes.items() if k in fields},
            request.organization.etag,
        )
        return pb.UpdateOrganizationResponse(organization=organization_pb(org))

    async def DisableOrganization(
        self, request: pb.DisableOrganizationRequest, context: Ctx
    ) -> pb.DisableOrganizationResponse:
        (org_id,) = ORGANIZATION.parse_field(request.name, "name")
        org = await self._identity.accounts.set_organization_state(
            self._context(context), org_id, State.DISABLED, request.reason
        )
        return pb.DisableOrganizationResponse(organization=organization_pb(org))

    async def EnableOrganization(
        self, request: pb.EnableOrganizationRequest, context: Ctx
    ) -> pb.EnableOrganizationResponse:
        (org_id,) = ORGANIZATION.parse_field(request.name, "name")
        org = await self._identity.accounts.set_organization_state(
            self._context(context), org_id, State.ACTIVE
        )
        return pb.EnableOrganizationResponse(organization=organization_pb(org))

    # ---- users ----

    async def GetUser(self, request: pb.GetUserRequest, context: Ctx) -> pb.GetUserResponse:
        org_id, user_id = USER.parse_field(request.name, "name")
        user = await self._identity.accounts.get_user(self._context(context), org_id, user_id)
        return pb.GetUserResponse(user=user_pb(user))

    async def ListUsers(self, request: pb.ListUsersRequest, context: Ctx) -> pb.ListUsersResponse:
        (org_id,) = ORGANIZATION.parse_field(request.parent, "parent")
        result = await self._identity.accounts.list_users(
            self._context(context),
            org_id,
            list_request(request),
        )
        return pb.ListUsersResponse(
            users=[user_pb(u) for u in result.items],
            **page_of(result),
        )

    async def CreateUser(
        self, request: pb.CreateUserRequest, context: Ctx
    ) -> pb.CreateUserResponse:
        (org_id,) = ORGANIZATION.parse_field(request.parent, "parent")
        check = Validator()
        check_email(request.user.email, "user.email", check)
        check.check(len(request.user.display_name) <= 200, "user.display_name", "is too long")
        role = role_of(request.user.role, "user.role", check)
        check.require(request.user.password, "user.password")
        check.raise_if_any()
        user = await self._identity.accounts.create_user(
            self._context(context),
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
        org_id, user_id = USER.parse_field(request.user.name, "user.name")
        fields = mask(request.update_mask.paths, ["display_name", "email", "role"])
        check = Validator()
        changes: dict[str, Any] = {}
        if "display_name" in fields:
            check.check(len(request.user.display_name) <= 200, "user.display_name", "is too long")
            changes["display_name"] = request.user.display_name
        if "email" in fields:
            check_email(request.user.email, "user.email", check)
            changes["email"] = request.user.email
        if "role" in fields:
            changes["role"] = role_of(request.user.role, "user.role", check)
        check.raise_if_any()
        user = await self._identity.accounts.update_user(
            self._context(context), org_id, user_id, changes, request.user.etag
        )
        return pb.UpdateUserResponse(user=user_pb(user))

    async def ChangeUserPassword(
        self, request: pb.ChangeUserPasswordRequest, context: Ctx
    ) -> pb.ChangeUserPasswordResponse:
        org_id, user_id = USER.parse_field(request.name, "name")
        check = Validator()
        check.require(request.new_password, "new_password")
        check.raise_if_any()
        await self._identity.accounts.change_password(
            self._context(context),
            org_id,
            user_id,
            request.current_password,
            request.new_password,
        )
        return pb.ChangeUserPasswordResponse()

    async def DisableUser(
        self, request: pb.DisableUserRequest, context: Ctx
    ) -> pb.DisableUserResponse:
        org_id, user_id = USER.parse_field(request.name, "name")
        user = await self._identity.accounts.set_user_state(
            self._context(context), org_id, user_id, State.DISABLED, request.reason
        )
        return pb.DisableUserResponse(user=user_pb(user))

    async def EnableUser(
        self, request: pb.EnableUserRequest, context: Ctx
    ) -> pb.EnableUserResponse:
        org_id, user_id = USER.parse_field(request.name, "name")
        user = await self._identity.accounts.set_user_state(
            self._context(context), org_id, user_id, State.ACTIVE
        )
        return pb.EnableUserResponse(user=user_pb(user))

    # ---- service accounts and API keys ----

    async def GetServiceAccount(
        self, request: pb.GetServiceAccountRequest, context: Ctx
    ) -> pb.GetServiceAccountResponse:
        org_id, sa_id = SERVICE_ACCOUNT.parse_field(request.name, "name")
        account = await self._identity.service_accounts.get_service_account(
            self._context(context), org_id, sa_id
        )
        return pb.GetServiceAccountResponse(service_account=service_account_pb(account))

    async def ListServiceAccounts(
        self, request: pb.ListServiceAccountsRequest, context: Ctx
    ) -> pb.ListServiceAccountsResponse:
        (org_id,) = ORGANIZATION.parse_field(request.parent, "parent")
        result = await self._identity.service_accounts.list_service_accounts(
            self._context(context),
            org_id,
            list_request(request),
        )
        return pb.ListServiceAccountsResponse(
            service_accounts=[service_account_pb(a) for a in result.items],
            **page_of(result),
        )

    async def CreateServiceAccount(
        self, request: pb.CreateServiceAccountRequest, context: Ctx
    ) -> pb.CreateServiceAccountResponse:
        (org_id,) = ORGANIZATION.parse_field(request.parent, "parent")
        account = request.service_account
        check = Validator()
        check.check(
            1 <= len(account.display_name.strip()) <= 200,
            "service_account.display_name",
            "must be 1-200 characters",
        )
        check.check(len(account.description) <= 1000, "service_account.description", "is too long")
        role = role_of(account.role, "service_account.role", check)
        check.raise_if_any()
        created = await self._identity.service_accounts.create_service_account(
            self._context(context),
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
        org_id, sa_id = SERVICE_ACCOUNT.parse_field(account.name, "service_account.name")
        fields = mask(request.update_mask.paths, ["display_name", "description", "role"])
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
            changes["role"] = role_of(account.role, "service_account.role", check)
        check.raise_if_any()
        updated = await self._identity.service_accounts.update_service_account(
            self._context(context), org_id, sa_id, changes, account.etag
        )
        return pb.UpdateServiceAccountResponse(service_account=service_account_pb(updated))

    async def DeleteServiceAccount(
        self, request: pb.DeleteServiceAccountRequest, context: Ctx
    ) -> pb.DeleteServiceAccountResponse:
        org_id, sa_id = SERVICE_ACCOUNT.parse_field(request.name, "name")
        await self._identity.service_accounts.delete_service_account(
            self._context(context), org_id, sa_id, request.etag
        )
        return pb.DeleteServiceAccountResponse()

    async def GetApiKey(self, request: pb.GetApiKeyRequest, context: Ctx) -> pb.GetApiKeyResponse:
        ids = API_KEY.parse_field(request.name, "name")
        key = await self._identity.service_accounts.get_api_key(self._context(context), *ids)
        return pb.GetApiKeyResponse(api_key=api_key_pb(key, self._identity.clock()))

    async def ListApiKeys(
        self, request: pb.ListApiKeysRequest, context: Ctx
    ) -> pb.ListApiKeysResponse:
        org_id, sa_id = SERVICE_ACCOUNT.parse_field(request.parent, "parent")
        result = await self._identity.service_accounts.list_api_keys(
            self._context(context),
            org_id,
            sa_id,
            list_request(request),
        )
        return pb.ListApiKeysResponse(
            api_keys=[api_key_pb(k, self._identity.clock()) for k in result.items],
            **page_of(result, total=False),
        )

    async def CreateApiKey(
        self, request: pb.CreateApiKeyRequest, context: Ctx
    ) -> pb.CreateApiKeyResponse:
        org_id, sa_id = SERVICE_ACCOUNT.parse_field(request.parent, "parent")
        check = Validator()
        check.check(len(request.api_key.display_name) <= 200, "api_key.display_name", "is too long")
        check.raise_if_any()
        expire = (
            seconds_of(request.api_key.expire_time)
            if request.api_key.HasField("expire_time")
            else None
        )
        key, plaintext = await self._identity.service_accounts.create_api_key(
            self._context(context),
            org_id,
            sa_id,
            request.api_key.display_name,
            expire,
            request.request_id,
        )
        return pb.CreateApiKeyResponse(
            api_key=api_key_pb(key, self._identity.clock()), plaintext_key=plaintext
        )

    async def RevokeApiKey(
        self, request: pb.RevokeApiKeyRequest, context: Ctx
    ) -> pb.RevokeApiKeyResponse:
        ids = API_KEY.parse_field(request.name, "name")
        key = await self._identity.service_accounts.revoke_api_key(self._context(context), *ids)
        return pb.RevokeApiKeyResponse(api_key=api_key_pb(key, self._identity.clock()))

    # ---- sign-in and tokens ----

    async def Login(self, request: pb.LoginRequest, context: Ctx) -> pb.LoginResponse:
        check = Validator()
        check.require(request.email, "email")
        check.require(request.password, "password")
        org_id = ""
        if request.organization:
            ids = ORGANIZATION.parse(request.organization)
            check.check(ids is not None, "organization", "must be organizations/{organization}")
            org_id = ids[0] if ids else ""
        check.raise_if_any()
        grant, user = await self._identity.auth.login(
            self._context(context), request.email, request.password, org_id
        )
        return pb.LoginResponse(token=grant_pb(grant), user=user_pb(user))

    async def RefreshToken(
        self, request: pb.RefreshTokenRequest, context: Ctx
    ) -> pb.RefreshTokenResponse:
        check = Validator()
        check.require(request.refresh_token, "refresh_token")
        check.raise_if_any()
        grant = await self._identity.auth.refresh(self._context(context), request.refresh_token)
        return pb.RefreshTokenResponse(token=grant_pb(grant))

    async def Logout(self, request: pb.LogoutRequest, context: Ctx) -> pb.LogoutResponse:
        check = Validator()
        check.require(request.refresh_token, "refresh_token")
        check.raise_if_any()
        await self._identity.auth.logout(self._context(context), request.refresh_token)
        return pb.LogoutResponse()

    async def LogoutEverywhere(
        self, request: pb.LogoutEverywhereRequest, context: Ctx
    ) -> pb.LogoutEverywhereResponse:
        if request.user:
            USER.parse_field(request.user, "user")
        count = await self._identity.auth.logout_everywhere(self._context(context), request.user)
        return pb.LogoutEverywhereResponse(revoked_token_families=count)

    async def ExchangeApiKey(
        self, request: pb.ExchangeApiKeyRequest, context: Ctx
    ) -> pb.ExchangeApiKeyResponse:
        check = Validator()
        check.require(request.api_key, "api_key")
        check.raise_if_any()
        grant, account = await self._identity.auth.exchange_api_key(
            self._context(context), request.api_key
        )
        return pb.ExchangeApiKeyResponse(token=grant_pb(grant), service_account=account)

    async def GetJwks(self, request: pb.GetJwksRequest, context: Ctx) -> pb.GetJwksResponse:
        keys = await self._identity.keys.jwks()
        return pb.GetJwksResponse(keys=[jwk_pb(k) for k in keys])

    async def ListSigningKeys(
        self, request: pb.ListSigningKeysRequest, context: Ctx
    ) -> pb.ListSigningKeysResponse:
        result = await self._identity.keys.list_signing_keys(
            self._context(context), list_request(request)
        )
        return pb.ListSigningKeysResponse(
            signing_keys=[signing_key_pb(k) for k in result.items],
            **page_of(result, total=False),
        )

    async def RotateSigningKeys(
        self, request: pb.RotateSigningKeysRequest, context: Ctx
    ) -> pb.RotateSigningKeysResponse:
        rotation = await self._identity.keys.rotate_signing_keys(
            self._context(context), request.revoke_previous
        )
        return pb.RotateSigningKeysResponse(
            active_key=signing_key_pb(rotation.active),
            pending_key=signing_key_pb(rotation.pending),
            previous_key=signing_key_pb(rotation.previous) if rotation.previous else None,
        )

    # ---- quotas and the usage ledger ----

    async def GetQuota(self, request: pb.GetQuotaRequest, context: Ctx) -> pb.GetQuotaResponse:
        subject = subject_of(request.name, "name", ORGANIZATION_QUOTA, USER_QUOTA)
        view = await self._identity.ledger.get_quota(self._context(context), subject)
        return pb.GetQuotaResponse(quota=quota_pb(view))

    async def UpdateQuota(
        self, request: pb.UpdateQuotaRequest, context: Ctx
    ) -> pb.UpdateQuotaResponse:
        subject = subject_of(request.quota.name, "quota.name", ORGANIZATION_QUOTA, USER_QUOTA)
        fields = mask(request.update_mask.paths, LIMIT_FIELDS)
        check = Validator()
        changes: dict[str, int | None] = {}
        for name in fields:
            value = getattr(request.quota, name) if request.quota.HasField(name) else None  # type: ignore[arg-type]
            check.check(value is None or value >= 0, f"quota.{name}", "must not be negative")
            changes[name] = value
        check.raise_if_any()
        view = await self._identity.ledger.update_quota(
            self._context(context), subject, changes, request.quota.etag
        )
        return pb.UpdateQuotaResponse(quota=quota_pb(view))

    async def ReserveUsage(
        self, request: pb.ReserveUsageRequest, context: Ctx
    ) -> pb.ReserveUsageResponse:
        (org_id,) = ORGANIZATION.parse_field(request.parent, "parent")
        check = Validator()
        check.require(request.subject, "subject")
        check.check(bool(request.amounts), "amounts", "is required")
        ttl = request.ttl.ToNanoseconds() / 1e9
        check.check(1 <= ttl <= 86400, "ttl", "must be between 1 second and 24 hours")
        check.require(request.request_id, "request_id")
        check.check(len(request.request_id) <= 64, "request_id", "is too long")
        check.raise_if_any()
        amounts = amounts_of(request.amounts, "amounts")
        reservation = await self._identity.ledger.reserve(
            self._context(context),
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
        org_id, reservation_id = RESERVATION.parse_field(request.name, "name")
        actual = amounts_of(request.actual_amounts, "actual_amounts")
        reservation = await self._identity.ledger.settle(
            self._context(context), org_id, reservation_id, actual
        )
        return pb.SettleUsageResponse(usage_reservation=reservation_pb(reservation))

    async def ReleaseUsage(
        self, request: pb.ReleaseUsageRequest, context: Ctx
    ) -> pb.ReleaseUsageResponse:
        org_id, reservation_id = RESERVATION.parse_field(request.name, "name")
        reservation = await self._identity.ledger.release(
            self._context(context), org_id, reservation_id
        )
        return pb.ReleaseUsageResponse(usage_reservation=reservation_pb(reservation))

    async def GetUsageReport(
        self, request: pb.GetUsageReportRequest, context: Ctx
    ) -> pb.GetUsageReportResponse:
        subject = subject_of(request.name, "name", ORGANIZATION_USAGE_REPORT, USER_USAGE_REPORT)
        report = await self._identity.ledger.usage_report(
            self._context(context),
            subject,
            seconds_of(request.start_time) if request.HasField("start_time") else None,
            seconds_of(request.end_time) if request.HasField("end_time") else None,
        )
        return pb.GetUsageReportResponse(usage_report=usage_report_pb(report))

    # ---- audit log ----

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: Ctx
    ) -> pb.ListAuditEventsResponse:
        org_id = _organization_or_all(request.parent)
        result = await self._identity.audit.list_audit_events(
            self._context(context),
            org_id,
            list_request(request),
        )
        return pb.ListAuditEventsResponse(
            audit_events=[audit_event_pb(e) for e in result.items],
            **page_of(result, total=False),
        )

    async def WriteAuditEvents(
        self, request: pb.WriteAuditEventsRequest, context: Ctx
    ) -> pb.WriteAuditEventsResponse:
        org_id = _organization_or_all(request.parent)
        check = Validator()
        check.check(1 <= len(request.audit_events) <= 500, "audit_events", "must hold 1-500 events")
        check.require(request.request_id, "request_id")
        check.check(len(request.request_id) <= 64, "request_id", "is too long")
        events = audit_events_of(request.audit_events, check)
        check.raise_if_any()
        written = await self._identity.audit.write_audit_events(
            self._context(context), org_id, events, request.request_id
        )
        return pb.WriteAuditEventsResponse(written_count=written)
