"""A populated identity: two organizations and one principal of every kind, with their tokens."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from corral.identity.v1 import identity_service_pb2 as pb
from corral.identity.v1 import organization_pb2, role_pb2, service_account_pb2, user_pb2
from tests.identity.conftest import PASSWORD, Identity, bearer


@dataclass
class World:
    identity: Identity
    tokens: dict[str, str] = field(default_factory=dict)  # principal -> access token
    names: dict[str, str] = field(default_factory=dict)  # principal/resource -> resource name
    emails: dict[str, str] = field(default_factory=dict)

    def auth(self, principal: str) -> tuple[tuple[str, str], ...]:
        return bearer(self.tokens[principal]) if principal in self.tokens else ()


async def create_user(
    identity: Identity, root: str, org: str, role: int, label: str
) -> user_pb2.User:
    email = f"{label}-{uuid.uuid4().hex[:8]}@{org.split('/')[1]}.test"
    reply = await identity.stub.CreateUser(
        pb.CreateUserRequest(
            parent=org,
            user=user_pb2.User(email=email, display_name=label, role=role, password=PASSWORD),  # type: ignore[arg-type]
        ),
        metadata=bearer(root),
    )
    return reply.user


async def build_world(identity: Identity) -> World:
    world = World(identity)
    root = await identity.root()
    world.tokens["superuser"] = root
    for org_id in ("acme", "globex"):
        await identity.stub.CreateOrganization(
            pb.CreateOrganizationRequest(
                organization=organization_pb2.Organization(display_name=org_id.title()),
                organization_id=org_id,
            ),
            metadata=bearer(root),
        )
    people = [
        ("admin", "organizations/acme", role_pb2.ROLE_ADMIN),
        ("user", "organizations/acme", role_pb2.ROLE_USER),
        ("viewer", "organizations/acme", role_pb2.ROLE_VIEWER),
        ("victim", "organizations/acme", role_pb2.ROLE_USER),
        ("other_admin", "organizations/globex", role_pb2.ROLE_ADMIN),
    ]
    for label, org, role in people:
        user = await create_user(identity, root, org, role, label)
        world.names[label] = user.name
        world.emails[label] = user.email
        if label != "victim":
            world.tokens[label] = await identity.token(user.email)
    account = await identity.stub.CreateServiceAccount(
        pb.CreateServiceAccountRequest(
            parent="organizations/acme",
            service_account=service_account_pb2.ServiceAccount(
                display_name="ci", role=role_pb2.ROLE_USER
            ),
        ),
        metadata=bearer(root),
    )
    world.names["service_account"] = account.service_account.name
    key = await identity.stub.CreateApiKey(
        pb.CreateApiKeyRequest(parent=account.service_account.name), metadata=bearer(root)
    )
    world.names["api_key"] = key.api_key.name
    return world
