"""Sign-in and tokens on a real server: refresh rotation and theft detection, sign-out,
disabling, throttling, API keys, and forged tokens."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2

from corral.identity.v1 import (
    api_key_pb2,
    organization_pb2,
    role_pb2,
    service_account_pb2,
    user_pb2,
)
from corral.identity.v1 import identity_service_pb2 as pb
from corral.libs.auth import StaticJwksSource, TokenVerifier
from tests.identity.conftest import (
    ADMIN_EMAIL,
    PASSWORD,
    Identity,
    IdentityFactory,
    bearer,
    detail_of,
    error_info,
    fails,
)
from tests.identity.world import create_user
from tests.support.grpc_tools import error_reason

UA = grpc.StatusCode.UNAUTHENTICATED


async def _user(identity: Identity, role: int = role_pb2.ROLE_USER) -> tuple[str, str]:
    user = await create_user(identity, await identity.root(), "organizations/default", role, "u")
    return user.name, user.email


async def test_access_token_passes_the_shared_verifier(identity: Identity) -> None:
    """What every other service does with the token: the kit's TokenVerifier, JWKS from gRPC."""
    reply = await identity.login(ADMIN_EMAIL, "correct horse battery staple")
    jwks = await identity.stub.GetJwks(pb.GetJwksRequest())
    document = {
        "keys": [
            {f.name: v for f, v in key.ListFields()}  # proto field names are the JWK members
            for key in jwks.keys
        ]
    }
    verifier = TokenVerifier(
        StaticJwksSource(document),
        issuer=identity.settings.jwt_issuer,
        audience=identity.settings.jwt_audience,
    )
    caller = await verifier.verify(reply.token.access_token)
    assert caller.subject == reply.user.name
    assert caller.organization == "organizations/default"
    assert caller.is_superuser
    assert "admin" in caller.roles
    claims = jwt.decode(reply.token.access_token, options={"verify_signature": False})
    assert {"iss", "aud", "sub", "org", "roles", "exp", "iat", "jti", "typ"} <= set(claims)
    assert claims["typ"] == "access"
    assert 890 <= claims["exp"] - claims["iat"] <= 900
    assert reply.token.refresh_token
    assert reply.token.refresh_token != reply.token.access_token


async def test_refresh_rotates_and_reuse_revokes_the_family(identity: Identity) -> None:
    _, email = await _user(identity)
    first = (await identity.login(email)).token
    second = (
        await identity.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=first.refresh_token))
    ).token
    assert second.refresh_token != first.refresh_token
    third = (
        await identity.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=second.refresh_token))
    ).token
    # The first token comes back (stolen?): refused, and the whole family is signed out ...
    await fails(
        identity.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=first.refresh_token)),
        UA,
        "REFRESH_TOKEN_REUSED",
    )
    # ... including the newest refresh token, which was never used.
    await fails(
        identity.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=third.refresh_token)),
        UA,
        "TOKEN_REVOKED",
    )
    await fails(
        identity.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token="crt_made-up")),
        UA,
        "INVALID_TOKEN",
    )
    # Another sign-in is a new family, unaffected.
    fresh = (await identity.login(email)).token
    await identity.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=fresh.refresh_token))


async def test_racing_refreshes_of_one_token_let_one_win(identity: Identity) -> None:
    _, email = await _user(identity)
    token = (await identity.login(email)).token.refresh_token
    results = await asyncio.gather(
        *(
            identity.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=token))
            for _ in range(5)
        ),
        return_exceptions=True,
    )
    assert sum(not isinstance(r, BaseException) for r in results) <= 1


async def test_logout_and_logout_everywhere(identity: Identity) -> None:
    name, email = await _user(identity)
    laptop, phone = (await identity.login(email)).token, (await identity.login(email)).token
    await identity.stub.Logout(pb.LogoutRequest(refresh_token=laptop.refresh_token))
    await identity.stub.Logout(pb.LogoutRequest(refresh_token=laptop.refresh_token))  # idempotent
    await fails(
        identity.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=laptop.refresh_token)),
        UA,
        "TOKEN_REVOKED",
    )
    phone = (
        await identity.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=phone.refresh_token))
    ).token
    reply = await identity.stub.LogoutEverywhere(
        pb.LogoutEverywhereRequest(), metadata=bearer(phone.access_token)
    )
    assert reply.revoked_token_families == 1
    await fails(
        identity.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=phone.refresh_token)),
        UA,
        "TOKEN_REVOKED",
    )
    # Access tokens issued before "everywhere" stop working too.
    await fails(
        identity.stub.GetUser(pb.GetUserRequest(name=name), metadata=bearer(phone.access_token)),
        UA,
        "TOKEN_REVOKED",
    )


async def test_disabling_a_user_stops_their_tokens_at_once(identity: Identity) -> None:
    name, email = await _user(identity)
    grant = (await identity.login(email)).token
    await identity.stub.GetUser(pb.GetUserRequest(name=name), metadata=bearer(grant.access_token))
    await identity.stub.DisableUser(
        pb.DisableUserRequest(name=name), metadata=bearer(await identity.root())
    )
    await fails(
        identity.stub.GetUser(pb.GetUserRequest(name=name), metadata=bearer(grant.access_token)),
        UA,
        "TOKEN_REVOKED",
    )
    await fails(
        identity.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=grant.refresh_token)),
        UA,
        "TOKEN_REVOKED",
    )
    await fails(identity.login(email), grpc.StatusCode.PERMISSION_DENIED, "PRINCIPAL_DISABLED")
    # Re-enabling lets them sign in again, but the old access token stays dead.
    await identity.stub.EnableUser(
        pb.EnableUserRequest(name=name), metadata=bearer(await identity.root())
    )
    await identity.login(email)
    await fails(
        identity.stub.GetUser(pb.GetUserRequest(name=name), metadata=bearer(grant.access_token)),
        UA,
        "TOKEN_REVOKED",
    )


async def test_login_throttling_per_account_and_per_source(make_identity: IdentityFactory) -> None:
    identity = await make_identity(
        identity_login_max_failures=3, identity_login_max_failures_per_source=6
    )
    (_, email), (_, other) = await _user(identity), await _user(identity)
    for _ in range(3):
        await fails(identity.login(email, "wrong password!!"), UA, "INVALID_CREDENTIALS")
    error = await fails(
        identity.login(email), grpc.StatusCode.RESOURCE_EXHAUSTED, "LOGIN_THROTTLED"
    )  # even the right password is refused now
    retry = detail_of(error, error_details_pb2.RetryInfo)
    assert retry is not None
    assert retry.retry_delay.seconds > 0
    # Unknown accounts count against the source address: guessing across accounts is bounded.
    for i in range(3):
        await fails(
            identity.login(f"nobody{i}@x.test", "guess guess guess"), UA, "INVALID_CREDENTIALS"
        )
    await fails(identity.login(other), grpc.StatusCode.RESOURCE_EXHAUSTED, "LOGIN_THROTTLED")


async def test_login_throttling_holds_across_replicas(make_identity: IdentityFactory) -> None:
    """Two identity instances on one database share the failure counts."""
    first = await make_identity(identity_login_max_failures=2)
    second = await make_identity(identity_login_max_failures=2)
    _, email = await _user(first)
    await fails(first.login(email, "wrong password!!"), UA, "INVALID_CREDENTIALS")
    await fails(second.login(email, "wrong password!!"), UA, "INVALID_CREDENTIALS")
    for replica in (first, second):
        await fails(replica.login(email), grpc.StatusCode.RESOURCE_EXHAUSTED, "LOGIN_THROTTLED")


async def test_a_successful_login_clears_the_account_failures(
    make_identity: IdentityFactory,
) -> None:
    identity = await make_identity(identity_login_max_failures=2)
    _, email = await _user(identity)
    await fails(identity.login(email, "wrong password!!"), UA, "INVALID_CREDENTIALS")
    await identity.login(email)
    await fails(identity.login(email, "wrong password!!"), UA, "INVALID_CREDENTIALS")
    await identity.login(email)  # one failure since the last success: under the budget


async def test_api_key_exchange_and_revocation(identity: Identity) -> None:
    root = await identity.root()
    account = (
        await identity.stub.CreateServiceAccount(
            pb.CreateServiceAccountRequest(
                parent="organizations/default",
                service_account=service_account_pb2.ServiceAccount(
                    display_name="ci", role=role_pb2.ROLE_USER
                ),
            ),
            metadata=bearer(root),
        )
    ).service_account
    request_id = str(uuid.uuid4())
    created = await identity.stub.CreateApiKey(
        pb.CreateApiKeyRequest(parent=account.name, request_id=request_id), metadata=bearer(root)
    )
    plaintext = created.plaintext_key
    assert plaintext.startswith("crl_")
    assert len(plaintext) == 47
    assert plaintext.startswith(created.api_key.key_prefix)
    assert len(created.api_key.key_prefix) < 16
    retry = await identity.stub.CreateApiKey(
        pb.CreateApiKeyRequest(parent=account.name, request_id=request_id), metadata=bearer(root)
    )
    assert retry.api_key.name == created.api_key.name
    assert retry.plaintext_key == ""

    exchanged = await identity.stub.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=plaintext))
    assert exchanged.service_account == account.name
    assert exchanged.token.refresh_token == ""
    token = exchanged.token.access_token
    got = await identity.stub.GetServiceAccount(
        pb.GetServiceAccountRequest(name=account.name), metadata=bearer(token)
    )
    assert got.service_account.name == account.name

    tampered = plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")
    await fails(
        identity.stub.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=tampered)),
        UA,
        "INVALID_CREDENTIALS",
    )
    revoked = await identity.stub.RevokeApiKey(
        pb.RevokeApiKeyRequest(name=created.api_key.name), metadata=bearer(root)
    )
    assert revoked.api_key.state == api_key_pb2.ApiKey.STATE_REVOKED
    await fails(
        identity.stub.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=plaintext)),
        UA,
        "API_KEY_REVOKED",
    )
    # Tokens already exchanged with it stop working on identity at once.
    await fails(
        identity.stub.GetServiceAccount(
            pb.GetServiceAccountRequest(name=account.name), metadata=bearer(token)
        ),
        UA,
        "TOKEN_REVOKED",
    )


async def test_expired_api_key_is_refused(identity: Identity) -> None:
    root = await identity.root()
    account = (
        await identity.stub.CreateServiceAccount(
            pb.CreateServiceAccountRequest(
                parent="organizations/default",
                service_account=service_account_pb2.ServiceAccount(
                    display_name="ci", role=role_pb2.ROLE_VIEWER
                ),
            ),
            metadata=bearer(root),
        )
    ).service_account
    soon = timestamp_pb2.Timestamp()
    soon.FromNanoseconds(int((identity.clock() + 1.0) * 1e9))
    created = await identity.stub.CreateApiKey(
        pb.CreateApiKeyRequest(parent=account.name, api_key=api_key_pb2.ApiKey(expire_time=soon)),
        metadata=bearer(root),
    )
    await identity.stub.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=created.plaintext_key))
    identity.clock.advance(2)
    await fails(
        identity.stub.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=created.plaintext_key)),
        UA,
        "API_KEY_EXPIRED",
    )


async def test_forged_tokens_are_refused(identity: Identity) -> None:
    reply = await identity.login(ADMIN_EMAIL, "correct horse battery staple")
    real = reply.token.access_token
    header = jwt.get_unverified_header(real)
    claims = jwt.decode(real, options={"verify_signature": False})
    jwks = await identity.stub.GetJwks(pb.GetJwksRequest())
    public = next(k for k in jwks.keys if k.kid == header["kid"])
    stranger = ec.generate_private_key(ec.SECP256R1())
    forgeries = {
        "unsigned (alg none)": jwt.encode(
            claims, None, algorithm="none", headers={"kid": header["kid"]}
        ),
        "HS256 keyed with the public key": jwt.encode(
            claims, f"{public.x}{public.y}", algorithm="HS256", headers={"kid": header["kid"]}
        ),
        "signed by a stranger under the real kid": jwt.encode(
            claims, stranger, algorithm="ES256", headers={"kid": header["kid"]}
        ),
        "unknown kid": jwt.encode(claims, stranger, algorithm="ES256", headers={"kid": "nope"}),
        "tampered payload": real.split(".")[0]
        + "."
        + jwt.utils.base64url_encode(b'{"sub":"organizations/default/users/x"}').decode()
        + "."
        + real.split(".")[2],
    }
    for label, token in forgeries.items():
        error = await fails(
            identity.stub.ListOrganizations(pb.ListOrganizationsRequest(), metadata=bearer(token)),
            UA,
        )
        assert error_info(error).reason, label
    await identity.stub.ListOrganizations(pb.ListOrganizationsRequest(), metadata=bearer(real))


async def test_disabling_an_organization_signs_everyone_out(identity: Identity) -> None:
    root = await identity.root()
    created = await identity.stub.CreateOrganization(
        pb.CreateOrganizationRequest(
            organization=organization_pb2.Organization(display_name="Doomed"),
            organization_id="doomed",
            initial_admin=user_pb2.User(email="boss@doomed.test", password=PASSWORD),
        ),
        metadata=bearer(root),
    )
    account = (
        await identity.stub.CreateServiceAccount(
            pb.CreateServiceAccountRequest(
                parent="organizations/doomed",
                service_account=service_account_pb2.ServiceAccount(
                    display_name="ci", role=role_pb2.ROLE_USER
                ),
            ),
            metadata=bearer(root),
        )
    ).service_account
    key = await identity.stub.CreateApiKey(
        pb.CreateApiKeyRequest(parent=account.name), metadata=bearer(root)
    )
    grant = (await identity.login("boss@doomed.test")).token
    await identity.stub.DisableOrganization(
        pb.DisableOrganizationRequest(name="organizations/doomed", reason="unpaid"),
        metadata=bearer(root),
    )
    get_org = pb.GetOrganizationRequest(name="organizations/doomed")
    await fails(identity.stub.GetOrganization(get_org, metadata=bearer(grant.access_token)), UA)
    await fails(
        identity.login("boss@doomed.test"),
        grpc.StatusCode.PERMISSION_DENIED,
        "ORGANIZATION_DISABLED",
    )
    await fails(
        identity.stub.RefreshToken(pb.RefreshTokenRequest(refresh_token=grant.refresh_token)),
        UA,
        "TOKEN_REVOKED",
    )
    await fails(
        identity.stub.ExchangeApiKey(pb.ExchangeApiKeyRequest(api_key=key.plaintext_key)),
        UA,
        "API_KEY_REVOKED",
    )
    # Enabling it again lets people sign in anew; what was revoked stays revoked.
    await identity.stub.EnableOrganization(
        pb.EnableOrganizationRequest(name="organizations/doomed"), metadata=bearer(root)
    )
    await fails(identity.stub.GetOrganization(get_org, metadata=bearer(grant.access_token)), UA)
    fresh = (await identity.login("boss@doomed.test")).token
    reply = await identity.stub.GetOrganization(get_org, metadata=bearer(fresh.access_token))
    assert reply.organization.name == created.organization.name


async def test_a_nul_in_a_sign_in_is_invalid_argument_on_every_database(
    identity: Identity,
) -> None:
    """Found by the fuzz test: on PostgreSQL a NUL in the email reached the database and came
    back INTERNAL. The kit refuses it before any handler runs."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await identity.stub.Login(pb.LoginRequest(email="\x00", password="x"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(caught.value) == "INVALID_ARGUMENT"
