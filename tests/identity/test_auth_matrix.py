"""Every identity RPC x every kind of caller -> allowed or refused, as designed.

Columns: no token, viewer, user, another organisation's admin, admin, superuser (in that order,
so a superuser's success never hides what the others were refused). A foreign organisation's
resources answer NOT_FOUND, never PERMISSION_DENIED; a role that may see but not change answers
PERMISSION_DENIED.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2

from corral.identity.v1 import (
    audit_event_pb2,
    organization_pb2,
    quota_pb2,
    role_pb2,
    service_account_pb2,
    usage_pb2,
    user_pb2,
)
from corral.identity.v1 import identity_service_pb2 as pb
from tests.identity.conftest import Identity, bearer, error_info
from tests.identity.world import World, build_world

PRINCIPALS = ("none", "viewer", "user", "other_admin", "admin", "superuser")
CODES = {
    "OK": grpc.StatusCode.OK,
    "UA": grpc.StatusCode.UNAUTHENTICATED,
    "PD": grpc.StatusCode.PERMISSION_DENIED,
    "NF": grpc.StatusCode.NOT_FOUND,
}
ACME = "organizations/acme"
Builder = Callable[[World], Awaitable[Any]]


def _uid() -> str:
    return uuid.uuid4().hex[:10]


async def _fresh_service_account(world: World) -> str:
    reply = await world.identity.stub.CreateServiceAccount(
        pb.CreateServiceAccountRequest(
            parent=ACME,
            service_account=service_account_pb2.ServiceAccount(
                display_name="temp", role=role_pb2.ROLE_VIEWER
            ),
        ),
        metadata=world.auth("superuser"),
    )
    return reply.service_account.name


def const(message: Any) -> Builder:
    async def build(world: World) -> Any:
        return message

    return build


def of(factory: Callable[[World], Any]) -> Builder:
    async def build(world: World) -> Any:
        return factory(world)

    return build


async def _delete_request(world: World) -> pb.DeleteServiceAccountRequest:
    return pb.DeleteServiceAccountRequest(name=await _fresh_service_account(world))


def _mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


MATRIX: list[tuple[str, Builder, str]] = [
    # organizations
    ("GetOrganization", const(pb.GetOrganizationRequest(name=ACME)), "UA OK OK NF OK OK"),
    ("ListOrganizations", const(pb.ListOrganizationsRequest()), "UA OK OK OK OK OK"),
    (
        "CreateOrganization",
        of(
            lambda w: pb.CreateOrganizationRequest(
                organization=organization_pb2.Organization(display_name="New"),
                organization_id=f"new-{_uid()}",
            )
        ),
        "UA PD PD PD PD OK",
    ),
    (
        "UpdateOrganization",
        const(
            pb.UpdateOrganizationRequest(
                organization=organization_pb2.Organization(name=ACME, display_name="Acme Inc"),
                update_mask=_mask("display_name"),
            )
        ),
        "UA PD PD NF OK OK",
    ),
    ("EnableOrganization", const(pb.EnableOrganizationRequest(name=ACME)), "UA PD PD NF PD OK"),
    # users
    ("GetUser", of(lambda w: pb.GetUserRequest(name=w.names["user"])), "UA PD OK NF OK OK"),
    ("ListUsers", const(pb.ListUsersRequest(parent=ACME)), "UA PD PD NF OK OK"),
    (
        "CreateUser",
        of(
            lambda w: pb.CreateUserRequest(
                parent=ACME,
                user=user_pb2.User(
                    email=f"n-{_uid()}@acme.test",
                    role=role_pb2.ROLE_USER,
                    password="another fine password",
                ),
            )
        ),
        "UA PD PD NF OK OK",
    ),
    (
        "UpdateUser",
        of(
            lambda w: pb.UpdateUserRequest(
                user=user_pb2.User(name=w.names["user"], display_name="Renamed"),
                update_mask=_mask("display_name"),
            )
        ),
        "UA PD OK NF OK OK",
    ),
    (
        "ChangeUserPassword",
        of(
            lambda w: pb.ChangeUserPasswordRequest(
                name=w.names["victim"], new_password="a brand new password"
            )
        ),
        "UA PD PD NF OK OK",
    ),
    (
        "DisableUser",
        of(lambda w: pb.DisableUserRequest(name=w.names["victim"])),
        "UA PD PD NF OK OK",
    ),
    ("EnableUser", of(lambda w: pb.EnableUserRequest(name=w.names["victim"])), "UA PD PD NF OK OK"),
    (
        "LogoutEverywhere",
        of(lambda w: pb.LogoutEverywhereRequest(user=w.names["victim"])),
        "UA PD PD NF OK OK",
    ),
    # service accounts and API keys
    (
        "GetServiceAccount",
        of(lambda w: pb.GetServiceAccountRequest(name=w.names["service_account"])),
        "UA PD PD NF OK OK",
    ),
    ("ListServiceAccounts", const(pb.ListServiceAccountsRequest(parent=ACME)), "UA PD PD NF OK OK"),
    (
        "CreateServiceAccount",
        const(
            pb.CreateServiceAccountRequest(
                parent=ACME,
                service_account=service_account_pb2.ServiceAccount(
                    display_name="bot", role=role_pb2.ROLE_USER
                ),
            )
        ),
        "UA PD PD NF OK OK",
    ),
    (
        "UpdateServiceAccount",
        of(
            lambda w: pb.UpdateServiceAccountRequest(
                service_account=service_account_pb2.ServiceAccount(
                    name=w.names["service_account"], description="builds things"
                ),
                update_mask=_mask("description"),
            )
        ),
        "UA PD PD NF OK OK",
    ),
    ("DeleteServiceAccount", _delete_request, "UA PD PD NF OK OK"),
    ("GetApiKey", of(lambda w: pb.GetApiKeyRequest(name=w.names["api_key"])), "UA PD PD NF OK OK"),
    (
        "ListApiKeys",
        of(lambda w: pb.ListApiKeysRequest(parent=w.names["service_account"])),
        "UA PD PD NF OK OK",
    ),
    (
        "CreateApiKey",
        of(lambda w: pb.CreateApiKeyRequest(parent=w.names["service_account"])),
        "UA PD PD NF OK OK",
    ),
    (
        "RevokeApiKey",
        of(lambda w: pb.RevokeApiKeyRequest(name=w.names["api_key"])),
        "UA PD PD NF OK OK",
    ),
    # keys
    ("GetJwks", const(pb.GetJwksRequest()), "OK OK OK OK OK OK"),
    ("ListSigningKeys", const(pb.ListSigningKeysRequest()), "UA PD PD PD PD OK"),
    ("RotateSigningKeys", const(pb.RotateSigningKeysRequest()), "UA PD PD PD PD OK"),
    # quotas and the ledger
    ("GetQuota", const(pb.GetQuotaRequest(name=f"{ACME}/quota")), "UA OK OK NF OK OK"),
    (
        "GetQuota",
        of(lambda w: pb.GetQuotaRequest(name=f"{w.names['user']}/quota")),
        "UA PD OK NF OK OK",
    ),
    (
        "UpdateQuota",
        const(
            pb.UpdateQuotaRequest(
                quota=quota_pb2.Quota(name=f"{ACME}/quota", tokens_per_month=1_000_000),
                update_mask=_mask("tokens_per_month"),
            )
        ),
        "UA PD PD NF PD OK",
    ),
    (
        "UpdateQuota",
        of(
            lambda w: pb.UpdateQuotaRequest(
                quota=quota_pb2.Quota(name=f"{w.names['user']}/quota", tokens_per_month=500_000),
                update_mask=_mask("tokens_per_month"),
            )
        ),
        "UA PD PD NF OK OK",
    ),
    (
        "ReserveUsage",
        of(
            lambda w: pb.ReserveUsageRequest(
                parent=ACME,
                subject=w.names["user"],
                amounts=[usage_pb2.UsageAmount(kind=usage_pb2.USAGE_KIND_TOKENS, amount=10)],
                ttl=duration_pb2.Duration(seconds=60),
                request_id=str(uuid.uuid4()),
            )
        ),
        "UA PD PD PD PD OK",
    ),
    (
        "GetUsageReport",
        const(pb.GetUsageReportRequest(name=f"{ACME}/usageReport")),
        "UA PD PD NF OK OK",
    ),
    (
        "GetUsageReport",
        of(lambda w: pb.GetUsageReportRequest(name=f"{w.names['user']}/usageReport")),
        "UA PD OK NF OK OK",
    ),
    # audit
    ("ListAuditEvents", const(pb.ListAuditEventsRequest(parent=ACME)), "UA PD PD NF OK OK"),
    (
        "ListAuditEvents",
        const(pb.ListAuditEventsRequest(parent="organizations/-")),
        "UA PD PD PD PD OK",
    ),
    (
        "WriteAuditEvents",
        of(
            lambda w: pb.WriteAuditEventsRequest(
                parent=ACME,
                request_id=str(uuid.uuid4()),
                audit_events=[
                    audit_event_pb2.AuditEvent(
                        event_time=timestamp_pb2.Timestamp(seconds=1_750_000_000),
                        actor=w.names["user"],
                        organization=ACME,
                        action="/corral.session.v1.SessionService/CreateSession",
                        outcome=audit_event_pb2.AuditEvent.OUTCOME_SUCCEEDED,
                        service="session",
                    )
                ],
            )
        ),
        "UA PD PD PD PD OK",
    ),
    # last: it signs acme out
    ("DisableOrganization", const(pb.DisableOrganizationRequest(name=ACME)), "UA PD PD NF PD OK"),
]


async def test_auth_matrix(identity: Identity) -> None:
    world = await build_world(identity)
    wrong: list[str] = []
    for method, build, expected in MATRIX:
        for principal, want in zip(PRINCIPALS, expected.split(), strict=True):
            request = await build(world)
            try:
                await getattr(identity.stub, method)(request, metadata=world.auth(principal))
                got = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                got = exc.code()
            if got != CODES[want]:
                wrong.append(f"{method} as {principal}: expected {want}, got {got.name}")
    assert not wrong, "\n".join(wrong)


async def test_foreign_and_missing_resources_look_the_same(identity: Identity) -> None:
    """Another organisation's user and a user that does not exist: same code, same reason."""
    world = await build_world(identity)
    foreign = pb.GetUserRequest(name=world.names["user"])
    missing = pb.GetUserRequest(name="organizations/globex/users/nobody")
    errors = []
    for request in (foreign, missing):
        try:
            await identity.stub.GetUser(request, metadata=bearer(world.tokens["other_admin"]))
        except grpc.aio.AioRpcError as exc:
            errors.append((exc.code(), error_info(exc).reason))
    assert errors == [(grpc.StatusCode.NOT_FOUND, "NOT_FOUND")] * 2


async def test_lists_never_show_another_organizations_data(identity: Identity) -> None:
    world = await build_world(identity)
    other = bearer(world.tokens["other_admin"])
    orgs = await identity.stub.ListOrganizations(pb.ListOrganizationsRequest(), metadata=other)
    assert [o.name for o in orgs.organizations] == ["organizations/globex"]
    assert orgs.total_size == 1
    events = await identity.stub.ListAuditEvents(
        pb.ListAuditEventsRequest(parent="organizations/globex"), metadata=other
    )
    assert events.audit_events  # their own logins and creations ...
    assert {e.organization for e in events.audit_events} == {"organizations/globex"}  # ... only
    everything = await identity.stub.ListOrganizations(
        pb.ListOrganizationsRequest(), metadata=world.auth("superuser")
    )
    assert {"organizations/acme", "organizations/globex"} <= {
        o.name for o in everything.organizations
    }
