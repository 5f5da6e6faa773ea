"""What identity publishes on the revocation feed (libs/auth/revocation.py) after each change
that voids tokens, so every service refuses them within seconds; identity's own use of the feed
(a signed-out sign-in); sub-second ``iat``; and a feed that is down never failing the change.
The cross-service view (session refusing within seconds) is tests/security/test_revocation.py."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

import grpc
import jwt
import pytest

from corral.identity.v1 import identity_service_pb2 as pb
from corral.identity.v1 import (
    organization_pb2,
    role_pb2,
    service_account_pb2,
)
from corral.libs.auth.revocation import Revocation
from tests.identity.conftest import PASSWORD, Identity, IdentityFactory, bearer, fails
from tests.identity.world import create_user

UA = grpc.StatusCode.UNAUTHENTICATED


def _claims(token: str) -> dict[str, object]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


async def _feed(identity: Identity) -> Mapping[tuple[str, str], float]:
    return await identity.revocations.snapshot()


async def _user(identity: Identity, root: str, org: str = "organizations/default") -> str:
    user = await create_user(identity, root, org, role_pb2.ROLE_USER, "u")
    return user.email


@pytest.fixture
async def fast(make_identity: IdentityFactory) -> Identity:
    """Identity re-reading the feed on every call (no 1 s refresh to wait out)."""
    return await make_identity(revocation_refresh_seconds=0.0)


async def test_disabling_a_user_and_signing_out_everywhere_revoke_the_subject(
    fast: Identity,
) -> None:
    root = await fast.root()
    email = await _user(fast, root)
    login = await fast.login(email)
    name, token = login.user.name, login.token.access_token
    issued = float(_claims(token)["iat"])  # type: ignore[arg-type]
    await fast.stub.LogoutEverywhere(pb.LogoutEverywhereRequest(), metadata=bearer(token))
    first = (await _feed(fast))[("subject", name)]
    assert first >= issued
    fresh = (await fast.login(email)).token.access_token  # a fresh sign-in right after works
    assert float(_claims(fresh)["iat"]) > first  # type: ignore[arg-type]
    await fast.stub.GetUser(pb.GetUserRequest(name=name), metadata=bearer(fresh))
    await fast.stub.DisableUser(pb.DisableUserRequest(name=name), metadata=bearer(root))
    assert (await _feed(fast))[("subject", name)] > first


async def test_an_admin_password_reset_revokes_the_subject_a_self_change_does_not(
    fast: Identity,
) -> None:
    root = await fast.root()
    login = await fast.login(await _user(fast, root))
    name, token = login.user.name, login.token.access_token
    await fast.stub.ChangeUserPassword(
        pb.ChangeUserPasswordRequest(
            name=name, current_password=PASSWORD, new_password="another fine password"
        ),
        metadata=bearer(token),
    )
    assert ("subject", name) not in await _feed(fast)  # the caller's own sign-in goes on
    await fast.stub.ChangeUserPassword(
        pb.ChangeUserPasswordRequest(name=name, new_password="an admin's new password"),
        metadata=bearer(root),
    )
    assert ("subject", name) in await _feed(fast)


async def test_logout_revokes_the_sign_in_and_identity_refuses_its_access_token(
    fast: Identity,
) -> None:
    root = await fast.root()
    email = await _user(fast, root)
    laptop, phone = (await fast.login(email)), (await fast.login(email))
    name = laptop.user.name
    await fast.stub.Logout(pb.LogoutRequest(refresh_token=laptop.token.refresh_token))
    sid = str(_claims(laptop.token.access_token)["sid"])
    assert ("session", sid) in await _feed(fast)
    await fails(
        fast.stub.GetUser(pb.GetUserRequest(name=name), metadata=bearer(laptop.token.access_token)),
        UA,
        "TOKEN_REVOKED",
    )
    # The other sign-in is another family: untouched.
    await fast.stub.GetUser(pb.GetUserRequest(name=name), metadata=bearer(phone.token.access_token))


async def test_a_reused_refresh_token_revokes_its_sign_in(fast: Identity) -> None:
    root = await fast.root()
    login = await fast.login(await _user(fast, root))
    stolen = login.token.refresh_token
    await fast.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=stolen))
    await fails(
        fast.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=stolen)),
        UA,
        "REFRESH_TOKEN_REUSED",
    )
    sid = str(_claims(login.token.access_token)["sid"])
    assert ("session", sid) in await _feed(fast)


async def test_api_keys_service_accounts_and_organizations(fast: Identity) -> None:
    root = await fast.root()
    org_id = f"rev-{uuid.uuid4().hex[:8]}"
    await fast.stub.CreateOrganization(
        pb.CreateOrganizationRequest(
            organization=organization_pb2.Organization(display_name="R"), organization_id=org_id
        ),
        metadata=bearer(root),
    )
    account = (
        await fast.stub.CreateServiceAccount(
            pb.CreateServiceAccountRequest(
                parent=f"organizations/{org_id}",
                service_account=service_account_pb2.ServiceAccount(
                    display_name="ci", role=role_pb2.ROLE_USER
                ),
            ),
            metadata=bearer(root),
        )
    ).service_account
    keys = [
        await fast.stub.CreateApiKey(
            pb.CreateApiKeyRequest(parent=account.name), metadata=bearer(root)
        )
        for _ in range(2)
    ]
    token = (
        await fast.stub.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=keys[0].plaintext_key))
    ).token.access_token
    await fast.stub.RevokeApiKey(
        pb.RevokeApiKeyRequest(name=keys[0].api_key.name), metadata=bearer(root)
    )
    feed = await _feed(fast)
    assert ("api_key", str(_claims(token)["akid"])) in feed
    assert ("api_key", keys[0].api_key.name.rsplit("/", 1)[1]) in feed
    at = feed[("api_key", str(_claims(token)["akid"]))]
    await fast.stub.RevokeApiKey(  # revoking again changes nothing
        pb.RevokeApiKeyRequest(name=keys[0].api_key.name), metadata=bearer(root)
    )
    assert (await _feed(fast))[("api_key", str(_claims(token)["akid"]))] == at
    account = (
        await fast.stub.GetServiceAccount(
            pb.GetServiceAccountRequest(name=account.name), metadata=bearer(root)
        )
    ).service_account
    await fast.stub.DeleteServiceAccount(
        pb.DeleteServiceAccountRequest(name=account.name, etag=account.etag),
        metadata=bearer(root),
    )
    assert ("subject", account.name) in await _feed(fast)
    await fast.stub.DisableOrganization(
        pb.DisableOrganizationRequest(name=f"organizations/{org_id}"), metadata=bearer(root)
    )
    assert ("organization", f"organizations/{org_id}") in await _feed(fast)


async def test_revoking_a_signing_key_revokes_what_it_signed(fast: Identity) -> None:
    root = await fast.root()
    await fast.stub.RotateSigningKeys(pb.RotateSigningKeysRequest(), metadata=bearer(root))
    assert not [k for k in await _feed(fast) if k[0] == "signing_key"]  # retired: still valid
    root = await fast.root()
    kid = jwt.get_unverified_header(root)["kid"]
    await fast.stub.RotateSigningKeys(
        pb.RotateSigningKeysRequest(revoke_previous=True), metadata=bearer(root)
    )
    assert ("signing_key", kid) in await _feed(fast)


class BrokenFeed:
    """Redis down: every publish fails."""

    def __init__(self) -> None:
        self.attempts: list[Revocation] = []

    async def publish(self, revocation: Revocation) -> None:
        self.attempts.append(revocation)
        raise ConnectionError("redis is down")

    async def snapshot(self) -> Mapping[tuple[str, str], float]:
        raise ConnectionError("redis is down")


async def test_a_feed_that_is_down_does_not_fail_the_change(
    make_identity: IdentityFactory, caplog: pytest.LogCaptureFixture
) -> None:
    feed = BrokenFeed()
    identity = await make_identity(revocations=feed)
    root = await identity.root()
    login = await identity.login(await _user(identity, root))
    name, token = login.user.name, login.token.access_token
    await identity.stub.DisableUser(pb.DisableUserRequest(name=name), metadata=bearer(root))
    assert [(r.kind, r.id) for r in feed.attempts] == [("subject", name)]
    assert "could not be published" in caplog.text
    # Identity's own check (the generation) still refuses the token.
    await fails(
        identity.stub.GetUser(pb.GetUserRequest(name=name), metadata=bearer(token)),
        UA,
        "TOKEN_REVOKED",
    )
    # ... and callers still get through while the feed cannot be read.
    got = await identity.stub.GetUser(
        pb.GetUserRequest(name=name), metadata=bearer(await identity.root())
    )
    assert got.user.state
