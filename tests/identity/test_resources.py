"""Organizations and users as AIP resources: validation, pagination, update_mask, etag,
idempotent creates, soft delete, and the last-admin rule."""

from __future__ import annotations

import uuid

import grpc
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2

from corral.identity.v1 import identity_service_pb2 as pb
from corral.identity.v1 import organization_pb2, role_pb2, user_pb2
from tests.identity.conftest import PASSWORD, Identity, bearer, detail_of, fails

ORG = "organizations/default"


def _new_user(
    email: str, role: int = role_pb2.ROLE_USER, password: str = PASSWORD
) -> user_pb2.User:
    return user_pb2.User(email=email, role=role, password=password)  # type: ignore[arg-type]


async def test_create_user_validation_and_uniqueness(identity: Identity) -> None:
    root = await identity.root()
    error = await fails(
        identity.stub.CreateUser(
            pb.CreateUserRequest(parent=ORG, user=user_pb2.User(email="not-an-email")),
            metadata=bearer(root),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    fields = {v.field for v in detail_of(error, error_details_pb2.BadRequest).field_violations}
    assert fields == {"user.email", "user.role", "user.password"}
    await fails(
        identity.stub.CreateUser(
            pb.CreateUserRequest(parent=ORG, user=_new_user("weak@x.test", password="short")),
            metadata=bearer(root),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "WEAK_PASSWORD",
    )
    await identity.stub.CreateUser(
        pb.CreateUserRequest(parent=ORG, user=_new_user("Dup@X.test")), metadata=bearer(root)
    )
    await fails(
        identity.stub.CreateUser(
            pb.CreateUserRequest(parent=ORG, user=_new_user("dup@x.test")), metadata=bearer(root)
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "EMAIL_TAKEN",
    )
    await identity.login("DUP@x.test")  # emails are case-insensitive


async def test_request_id_makes_creates_idempotent(identity: Identity) -> None:
    root = await identity.root()
    request_id = str(uuid.uuid4())
    request = pb.CreateUserRequest(parent=ORG, user=_new_user("once@x.test"), request_id=request_id)
    first = await identity.stub.CreateUser(request, metadata=bearer(root))
    second = await identity.stub.CreateUser(request, metadata=bearer(root))
    assert first.user.name == second.user.name
    await fails(
        identity.stub.CreateUser(
            pb.CreateUserRequest(parent=ORG, user=_new_user("twice@x.test"), request_id=request_id),
            metadata=bearer(root),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "REQUEST_ID_REUSED",
    )
    org_request = pb.CreateOrganizationRequest(
        organization=organization_pb2.Organization(display_name="Once"),
        organization_id="once",
        request_id=str(uuid.uuid4()),
    )
    a = await identity.stub.CreateOrganization(org_request, metadata=bearer(root))
    b = await identity.stub.CreateOrganization(org_request, metadata=bearer(root))
    assert a.organization.name == b.organization.name == "organizations/once"
    await fails(
        identity.stub.CreateOrganization(
            pb.CreateOrganizationRequest(
                organization=organization_pb2.Organization(display_name="Again"),
                organization_id="once",
            ),
            metadata=bearer(root),
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "ORGANIZATION_ID_TAKEN",
    )


async def test_list_users_pages_filters_and_orders(identity: Identity) -> None:
    root = await identity.root()
    for i in range(5):
        role = role_pb2.ROLE_VIEWER if i % 2 else role_pb2.ROLE_USER
        await identity.stub.CreateUser(
            pb.CreateUserRequest(parent=ORG, user=_new_user(f"p{i}@x.test", role)),
            metadata=bearer(root),
        )
    emails: list[str] = []
    token = ""
    while True:
        reply = await identity.stub.ListUsers(
            pb.ListUsersRequest(parent=ORG, page_size=2, page_token=token, order_by="email desc"),
            metadata=bearer(root),
        )
        assert reply.total_size == 6  # five plus the bootstrap admin
        emails += [u.email for u in reply.users]
        token = reply.next_page_token
        if not token:
            break
    assert emails == sorted(emails, reverse=True)
    assert len(emails) == 6
    viewers = await identity.stub.ListUsers(
        pb.ListUsersRequest(parent=ORG, filter="role = VIEWER AND state = ACTIVE"),
        metadata=bearer(root),
    )
    assert sorted(u.email for u in viewers.users) == ["p1@x.test", "p3@x.test"]
    await fails(
        identity.stub.ListUsers(
            pb.ListUsersRequest(parent=ORG, page_token=reply.next_page_token or "e30"),
            metadata=bearer(root),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_update_mask_etag_and_last_admin(identity: Identity) -> None:
    root = await identity.root()
    admin = (
        await identity.stub.CreateOrganization(
            pb.CreateOrganizationRequest(
                organization=organization_pb2.Organization(display_name="Solo"),
                organization_id="solo",
                initial_admin=user_pb2.User(email="boss@solo.test", password=PASSWORD),
            ),
            metadata=bearer(root),
        )
    ).initial_admin
    assert admin.role == role_pb2.ROLE_ADMIN
    updated = await identity.stub.UpdateUser(
        pb.UpdateUserRequest(
            user=user_pb2.User(
                name=admin.name, display_name="Boss", etag=admin.etag, email="ignored@x.test"
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=bearer(root),
    )
    assert (updated.user.display_name, updated.user.email) == ("Boss", "boss@solo.test")
    assert updated.user.etag != admin.etag
    await fails(
        identity.stub.UpdateUser(
            pb.UpdateUserRequest(
                user=user_pb2.User(name=admin.name, display_name="Stale", etag=admin.etag),
                update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
            ),
            metadata=bearer(root),
        ),
        grpc.StatusCode.ABORTED,
        "ETAG_MISMATCH",
    )
    await fails(
        identity.stub.UpdateUser(
            pb.UpdateUserRequest(
                user=user_pb2.User(name=admin.name, password="sneaky new password"),
                update_mask=field_mask_pb2.FieldMask(paths=["password"]),
            ),
            metadata=bearer(root),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await fails(
        identity.stub.UpdateUser(
            pb.UpdateUserRequest(
                user=user_pb2.User(name=admin.name, role=role_pb2.ROLE_USER),
                update_mask=field_mask_pb2.FieldMask(paths=["role"]),
            ),
            metadata=bearer(root),
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "LAST_ADMIN",
    )
    await fails(
        identity.stub.DisableUser(pb.DisableUserRequest(name=admin.name), metadata=bearer(root)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "LAST_ADMIN",
    )


async def test_self_service_password_change(identity: Identity) -> None:
    root = await identity.root()
    user = (
        await identity.stub.CreateUser(
            pb.CreateUserRequest(parent=ORG, user=_new_user("me@x.test")), metadata=bearer(root)
        )
    ).user
    mine = (await identity.login("me@x.test")).token
    other_device = (await identity.login("me@x.test")).token
    await fails(
        identity.stub.ChangeUserPassword(
            pb.ChangeUserPasswordRequest(
                name=user.name,
                current_password="wrong wrong wrong",
                new_password="new and long enough",
            ),
            metadata=bearer(mine.access_token),
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "INVALID_CREDENTIALS",
    )
    await identity.stub.ChangeUserPassword(
        pb.ChangeUserPasswordRequest(
            name=user.name, current_password=PASSWORD, new_password="new and long enough"
        ),
        metadata=bearer(mine.access_token),
    )
    await identity.login("me@x.test", "new and long enough")
    await fails(identity.login("me@x.test"), grpc.StatusCode.UNAUTHENTICATED)
    # The caller's own device stays signed in; every other device is signed out.
    await identity.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=mine.refresh_token))
    await fails(
        identity.stub.RefreshToken(
            pb.RefreshTokenRequest(refresh_token=other_device.refresh_token)
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "TOKEN_REVOKED",
    )
