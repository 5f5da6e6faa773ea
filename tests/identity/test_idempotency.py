"""Every Create of identity keeps the idempotency contract (tests/identity/idempotency_contract.py)
on a real server: retries answer with the first resource, a reused request_id with another
payload is refused, and one caller's request_id never answers for another caller."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import pytest

from corral.identity.v1 import (
    api_key_pb2,
    organization_pb2,
    role_pb2,
    service_account_pb2,
    user_pb2,
)
from corral.identity.v1 import identity_service_pb2 as pb
from corral.services.identity.base import SYSTEM_CONTEXT
from corral.services.identity.domain import Role
from tests.identity.conftest import PASSWORD, Identity, bearer
from tests.support.idempotency_contract import Caller, CreateCase, assert_idempotent_create

ORG = "organizations/acme"
CaseFactory = Callable[[Identity, Caller], Awaitable[CreateCase]]


async def _organization(identity: Identity, root: Caller) -> CreateCase:
    async def create(caller: Caller, request_id: str, payload: str) -> str:
        reply = await identity.stub.CreateOrganization(
            pb.CreateOrganizationRequest(
                organization=organization_pb2.Organization(display_name=f"Org {payload}"),
                organization_id=f"org-{caller.label}",
                request_id=request_id,
            ),
            metadata=caller.metadata,
        )
        return reply.organization.name

    async def count() -> int:
        listed = await identity.stub.ListOrganizations(
            pb.ListOrganizationsRequest(), metadata=root.metadata
        )
        return listed.total_size

    return CreateCase("CreateOrganization", create, count)


async def _user(identity: Identity, root: Caller) -> CreateCase:
    async def create(caller: Caller, request_id: str, payload: str) -> str:
        user = user_pb2.User(
            email=f"{caller.label}@acme.test",
            display_name=f"User {payload}",
            role=role_pb2.ROLE_USER,
            password=PASSWORD,
        )
        reply = await identity.stub.CreateUser(
            pb.CreateUserRequest(parent=ORG, user=user, request_id=request_id),
            metadata=caller.metadata,
        )
        return reply.user.name

    async def count() -> int:
        listed = await identity.stub.ListUsers(
            pb.ListUsersRequest(parent=ORG), metadata=root.metadata
        )
        return listed.total_size

    return CreateCase("CreateUser", create, count)


async def _service_account(identity: Identity, root: Caller) -> CreateCase:
    async def create(caller: Caller, request_id: str, payload: str) -> str:
        account = service_account_pb2.ServiceAccount(
            display_name=f"ci {payload}", role=role_pb2.ROLE_USER
        )
        reply = await identity.stub.CreateServiceAccount(
            pb.CreateServiceAccountRequest(
                parent=ORG, service_account=account, request_id=request_id
            ),
            metadata=caller.metadata,
        )
        return reply.service_account.name

    async def count() -> int:
        listed = await identity.stub.ListServiceAccounts(
            pb.ListServiceAccountsRequest(parent=ORG), metadata=root.metadata
        )
        return listed.total_size

    return CreateCase("CreateServiceAccount", create, count)


async def _api_key(identity: Identity, root: Caller) -> CreateCase:
    account = (
        await identity.stub.CreateServiceAccount(
            pb.CreateServiceAccountRequest(
                parent=ORG,
                service_account=service_account_pb2.ServiceAccount(
                    display_name="keys", role=role_pb2.ROLE_USER
                ),
            ),
            metadata=root.metadata,
        )
    ).service_account

    async def create(caller: Caller, request_id: str, payload: str) -> str:
        reply = await identity.stub.CreateApiKey(
            pb.CreateApiKeyRequest(
                parent=account.name,
                api_key=api_key_pb2.ApiKey(display_name=f"key {payload}"),
                request_id=request_id,
            ),
            metadata=caller.metadata,
        )
        return reply.api_key.name

    async def count() -> int:
        listed = await identity.stub.ListApiKeys(
            pb.ListApiKeysRequest(parent=account.name, page_size=1000), metadata=root.metadata
        )
        return len(listed.api_keys)

    return CreateCase("CreateApiKey", create, count)


CASES: dict[str, CaseFactory] = {
    "CreateOrganization": _organization,
    "CreateUser": _user,
    "CreateServiceAccount": _service_account,
    "CreateApiKey": _api_key,
}


@pytest.mark.parametrize("method", list(CASES))
async def test_create_is_idempotent_per_caller(identity: Identity, method: str) -> None:
    """Two callers allowed to make the resource: the bootstrap superuser, and a second
    superuser (only superusers create organizations; both are admins of every organization)."""
    root = Caller("root", bearer(await identity.root()))
    await identity.stub.CreateOrganization(
        pb.CreateOrganizationRequest(
            organization=organization_pb2.Organization(display_name="Acme"),
            organization_id="acme",
        ),
        metadata=root.metadata,
    )
    assert identity.app.identity is not None
    await identity.app.identity.accounts.create_user(
        SYSTEM_CONTEXT,
        "default",
        "second@corral.test",
        "Second",
        Role.ADMIN,
        PASSWORD,
        "",
        superuser=True,
    )
    second = Caller("second", bearer(await identity.token("second@corral.test")))
    case = await CASES[method](identity, root)
    await assert_idempotent_create(case, root, second)


@pytest.mark.parametrize("method", ["CreateOrganization", "CreateUser"])
async def test_concurrent_duplicates_create_one_resource(identity: Identity, method: str) -> None:
    """Two copies of one request racing: one creates, the other answers with its resource
    (whether it loses on the request id or on the resource's own unique id)."""
    root = Caller("root", bearer(await identity.root()))
    await identity.stub.CreateOrganization(
        pb.CreateOrganizationRequest(
            organization=organization_pb2.Organization(display_name="Acme"),
            organization_id="acme",
        ),
        metadata=root.metadata,
    )
    case = await CASES[method](identity, root)
    before = await case.count()
    request_id = str(uuid.uuid4())
    first, second = await asyncio.gather(
        case.create(root, request_id, "A"), case.create(root, request_id, "A")
    )
    assert first == second
    assert await case.count() == before + 1


async def test_request_ids_are_forgotten_after_their_retention(identity: Identity) -> None:
    """Housekeeping deletes request ids older than 24 hours: the same id may then carry a new
    request, which creates a new resource instead of failing REQUEST_ID_REUSED."""
    root = Caller("root", bearer(await identity.root()))
    await identity.stub.CreateOrganization(
        pb.CreateOrganizationRequest(
            organization=organization_pb2.Organization(display_name="Acme"),
            organization_id="acme",
        ),
        metadata=root.metadata,
    )
    case = await _user(identity, root)
    request_id = str(uuid.uuid4())
    first = await case.create(root, request_id, "A")
    assert identity.app.identity is not None
    identity.clock.advance(25 * 3600)  # housekeeping a day later
    await identity.app.identity.housekeeping()
    identity.clock.advance(-25 * 3600)  # the caller's token is still the one it had
    later = await case.create(Caller("late", root.metadata), request_id, "B")
    assert later != first


async def test_a_retry_that_changes_only_the_password_returns_the_first_user(
    identity: Identity,
) -> None:
    """As the proto says: the password is not part of the request's fingerprint (it is never
    hashed fast), so a retry with another password answers with the first user."""
    root = Caller("root", bearer(await identity.root()))
    await identity.stub.CreateOrganization(
        pb.CreateOrganizationRequest(
            organization=organization_pb2.Organization(display_name="Acme"),
            organization_id="acme",
        ),
        metadata=root.metadata,
    )
    request_id = str(uuid.uuid4())

    async def create(password: str) -> str:
        user = user_pb2.User(
            email="retry@acme.test", display_name="R", role=role_pb2.ROLE_USER, password=password
        )
        reply = await identity.stub.CreateUser(
            pb.CreateUserRequest(parent=ORG, user=user, request_id=request_id),
            metadata=root.metadata,
        )
        return reply.user.name

    first = await create(PASSWORD)
    assert await create(PASSWORD + " but longer") == first
    assert (await identity.login("retry@acme.test")).user.name == first  # the first one holds
