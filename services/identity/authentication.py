"""Sign-in and tokens: password login (throttled), refresh-token rotation with theft detection,
logout, API-key exchange, and identity's own check of a verified bearer token.

A login starts a refresh-token *family*; each refresh uses up its token and issues the next.
A used-up token that comes back means it was stolen: the whole family is signed out.
Access tokens carry a generation (``gen``): bumping a principal's generation kills every access
token issued before, without waiting for them to expire.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from corral.libs.auth.caller import SERVICE_ROLE, Caller
from corral.libs.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from corral.libs.names import new_id
from corral.services.identity import tokens
from corral.services.identity.accounts import get_user, normalize_email
from corral.services.identity.base import (
    PLATFORM,
    Clock,
    Config,
    Context,
    UnitOfWorkFactory,
    UseCases,
)
from corral.services.identity.domain import (
    ORGANIZATION,
    SERVICE_ACCOUNT,
    USER,
    ApiKeyState,
    Outcome,
    RefreshToken,
    State,
    User,
)
from corral.services.identity.repository import IdentityUnitOfWork
from corral.services.identity.revocations import NO_FEED, RevocationFeed
from corral.services.identity.signing import SigningKeys
from corral.services.identity.throttle import ACCOUNT, SOURCE, LoginThrottle


@dataclass(frozen=True)
class TokenGrant:
    access_token: str
    access_expire_time: float
    refresh_token: str = ""
    refresh_expire_time: float | None = None


def _disabled_user() -> PermissionDenied:
    return PermissionDenied("the user is disabled", reason="PRINCIPAL_DISABLED")


def _disabled_organization() -> PermissionDenied:
    return PermissionDenied("the organization is disabled", reason="ORGANIZATION_DISABLED")


class Authentication(UseCases):
    def __init__(
        self,
        uow: UnitOfWorkFactory,
        config: Config,
        clock: Clock,
        passwords: tokens.Passwords,
        throttle: LoginThrottle,
        keys: SigningKeys,
        revocations: RevocationFeed = NO_FEED,
    ) -> None:
        super().__init__(uow, config, clock, revocations)
        self._passwords = passwords
        self._throttle = throttle
        self._keys = keys

    # ---- what goes into tokens ----

    async def _rate_claims(
        self, uow: IdentityUnitOfWork, org_id: str, subject: str | None
    ) -> dict[str, int]:
        """The caller's request-rate quotas, carried in the token so every service's rate
        limiter applies them without asking identity: ``rpm`` (the caller's own, from their
        quota) and ``org_rpm`` (shared by the whole organisation)."""
        org = ORGANIZATION.format(org_id)
        found = await uow.quotas.get_many([org, *([subject] if subject else [])])
        claims: dict[str, int] = {}
        org_limit = found[org].limits.get("requests_per_minute") if org in found else None
        own = found[subject].limits.get("requests_per_minute") if subject in found else None
        if org_limit:
            claims["org_rpm"] = int(org_limit)
        if own:
            claims["rpm"] = int(own)
        return claims

    async def _user_access(
        self, uow: IdentityUnitOfWork, user: User, family_id: str
    ) -> tuple[str, float]:
        return await self._keys.sign(
            uow,
            {
                **await self._rate_claims(uow, user.organization_id, user.name),
                "sub": user.name,
                "org": ORGANIZATION.format(user.organization_id),
                "roles": user.token_roles,
                "role": user.role.value,
                "superuser": user.superuser,
                "sid": family_id,
                "gen": user.token_generation,
            },
        )

    async def _new_refresh(
        self, uow: IdentityUnitOfWork, user: User, family_id: str, at: float
    ) -> tuple[str, float]:
        plaintext = tokens.new_refresh_token()
        expires = at + self.config.refresh_ttl
        await uow.refresh_tokens.add(
            RefreshToken(
                id=new_id(),
                family_id=family_id,
                user_id=user.id,
                organization_id=user.organization_id,
                token_hash=tokens.digest(plaintext),
                expire_time=expires,
                create_time=at,
            )
        )
        return plaintext, expires

    # ---- bearer tokens (identity's own extra check, after the shared verifier) ----

    async def check_access(self, caller: Caller) -> None:
        """Refuse tokens of disabled principals, signed-out generations and revoked API keys."""
        claims = tokens.token_claims(caller.token)
        generation = claims.get("gen")
        revoked = Unauthenticated("the token was revoked", reason="TOKEN_REVOKED")
        async with self._uow() as uow:
            if ids := USER.parse(caller.subject):
                user = await uow.users.get(*ids)
                if user is None or user.state is not State.ACTIVE:
                    raise revoked
                if user.token_generation != generation:
                    raise revoked
            elif ids := SERVICE_ACCOUNT.parse(caller.subject):
                account = await uow.service_accounts.get(*ids)
                if account is None or account.token_generation != generation:
                    raise revoked
                key_id = claims.get("akid")
                key = await uow.api_keys.by_id(str(key_id)) if key_id else None
                if key is None or key.state_at(self._clock()) is ApiKeyState.REVOKED:
                    raise revoked
            else:
                raise Unauthenticated("the token's subject is unknown", reason="INVALID_TOKEN")
            org = await uow.organizations.get(ids[0])
            if org is None or org.state is not State.ACTIVE:
                raise revoked

    # ---- sign-in ----

    async def login(
        self, ctx: Context, email: str, password: str, org_id: str
    ) -> tuple[TokenGrant, User]:
        try:
            signed_in = await self._login(ctx, email, password, org_id)
        except Exception as exc:
            self.metrics.sign_in("password", exc)
            raise
        self.metrics.sign_in("password", None)
        return signed_in

    async def _login(
        self, ctx: Context, email: str, password: str, org_id: str
    ) -> tuple[TokenGrant, User]:
        email = normalize_email(email)
        budgets = [(ACCOUNT, email), *([(SOURCE, ctx.source_ip)] if ctx.source_ip else [])]
        at = self._clock()
        try:
            async with self._uow() as uow:
                for scope, key in budgets:
                    failures, oldest = await uow.login_failures.recent(
                        scope, key, at - self._throttle.window_seconds
                    )
                    self._throttle.check(scope, failures, oldest, at)
                user = await uow.users.by_email(email)
        except ResourceExhausted:
            await self._audit_apart(
                ctx,
                PLATFORM,
                "login",
                "",
                Outcome.DENIED,
                8,
                actor="anonymous",
                email=email,
                reason="LOGIN_THROTTLED",
            )
            raise
        ok = await asyncio.to_thread(
            self._passwords.verify, user.password_hash if user else None, password
        )
        if user is None or not ok or (org_id and user.organization_id != org_id):
            async with self._uow() as uow:
                for scope, key in budgets:
                    await uow.login_failures.add(scope, key, self._clock())
                await uow.commit()
            await self._audit_apart(
                ctx,
                user.organization_id if user else PLATFORM,
                "login",
                user.name if user else "",
                Outcome.DENIED,
                16,
                actor=user.name if user else "anonymous",
                email=email,
                reason="INVALID_CREDENTIALS",
            )
            raise Unauthenticated("the email or password is wrong", reason="INVALID_CREDENTIALS")
        async with self._uow() as uow:
            # Re-read: the account may have changed while the password was being checked.
            user = await get_user(uow, user.organization_id, user.id)
            org = await uow.organizations.get(user.organization_id)
            refusal = None
            if user.state is not State.ACTIVE:
                refusal = _disabled_user()
            elif org is None or org.state is not State.ACTIVE:
                refusal = _disabled_organization()
            if refusal is not None:
                await self._audit(
                    uow,
                    ctx,
                    user.organization_id,
                    "login",
                    user.name,
                    Outcome.DENIED,
                    7,
                    actor=user.name,
                    reason=refusal.reason,
                )
                await uow.commit()
                raise refusal
            at = self._clock()
            family = new_id()
            await uow.refresh_tokens.new_family(family, user, at)
            refresh, refresh_expires = await self._new_refresh(uow, user, family, at)
            access, access_expires = await self._user_access(uow, user, family)
            user.last_login_time = at
            await uow.users.touch_login(user.id, at)
            await uow.login_failures.clear(ACCOUNT, email)
            await self._audit(uow, ctx, user.organization_id, "login", user.name, actor=user.name)
            await uow.commit()
        return TokenGrant(access, access_expires, refresh, refresh_expires), user

    async def refresh(self, ctx: Context, refresh_token: str) -> TokenGrant:
        at = self._clock()
        invalid = Unauthenticated("the refresh token is not valid", reason="INVALID_TOKEN")
        async with self._uow() as uow:
            token = await uow.refresh_tokens.by_hash(tokens.digest(refresh_token))
            if token is None:
                raise invalid
            if token.family_revoked:
                raise Unauthenticated("the refresh token was revoked", reason="TOKEN_REVOKED")
            if token.used_time is not None or not await uow.refresh_tokens.use(token.id, at):
                # Theft detection: a used-up token came back; sign the whole family out.
                await uow.refresh_tokens.revoke_family(token.family_id, at)
                await self._audit(
                    uow,
                    ctx,
                    token.organization_id,
                    "refresh_token.reuse",
                    USER.format(token.organization_id, token.user_id),
                    Outcome.DENIED,
                    16,
                    family=token.family_id,
                )
                await uow.commit()
                await self._revoke("session", token.family_id)
                raise Unauthenticated(
                    "the refresh token was already used; its family is revoked",
                    reason="REFRESH_TOKEN_REUSED",
                )
            if token.expire_time <= at:
                raise Unauthenticated("the refresh token has expired", reason="TOKEN_EXPIRED")
            user = await uow.users.get(token.organization_id, token.user_id)
            org = await uow.organizations.get(token.organization_id)
            if user is None or user.state is not State.ACTIVE:
                raise _disabled_user()
            if org is None or org.state is not State.ACTIVE:
                raise _disabled_organization()
            refresh, refresh_expires = await self._new_refresh(uow, user, token.family_id, at)
            access, access_expires = await self._user_access(uow, user, token.family_id)
            await uow.commit()
        self.metrics.tokens_issued.add(1, {"grant": "refresh_token"})
        return TokenGrant(access, access_expires, refresh, refresh_expires)

    async def logout(self, ctx: Context, refresh_token: str) -> None:
        at = self._clock()
        async with self._uow() as uow:
            token = await uow.refresh_tokens.by_hash(tokens.digest(refresh_token))
            if token is None:
                return
            ended = await uow.refresh_tokens.revoke_family(token.family_id, at)
            if ended:
                user = USER.format(token.organization_id, token.user_id)
                await self._audit(uow, ctx, token.organization_id, "logout", user, actor=user)
            await uow.commit()
        if ended:  # the sign-in's access tokens (``sid``) stop working everywhere too
            await self._revoke("session", token.family_id)

    async def logout_everywhere(self, ctx: Context, user_name: str) -> int:
        principal = ctx.require()
        target = user_name or principal.subject
        ids = USER.parse_field(target, "user")
        principal.require_self_or_admin(ids[0], target)
        async with self._uow() as uow:
            user = await get_user(uow, *ids)
            principal.require_manage_user(user)
            at = self._clock()
            count = await uow.refresh_tokens.revoke_user(user.id, at)
            await uow.users.bump_generation(user.id)
            await self._audit(uow, ctx, ids[0], "logout_everywhere", target, families=str(count))
            await uow.commit()
        await self._revoke("subject", target)
        return count

    async def exchange_api_key(self, ctx: Context, plaintext: str) -> tuple[TokenGrant, str]:
        try:
            exchanged = await self._exchange_api_key(ctx, plaintext)
        except Exception as exc:
            self.metrics.sign_in("api_key", exc)
            raise
        self.metrics.sign_in("api_key", None)
        return exchanged

    async def _exchange_api_key(self, ctx: Context, plaintext: str) -> tuple[TokenGrant, str]:
        invalid = Unauthenticated("the API key is not valid", reason="INVALID_CREDENTIALS")
        lookup = tokens.api_key_lookup(plaintext)
        if lookup is None:
            raise invalid
        at = self._clock()
        async with self._uow() as uow:
            key = await uow.api_keys.by_lookup(lookup)
            if key is None or not tokens.same_digest(key.secret_hash, tokens.digest(plaintext)):
                raise invalid
            account = await uow.service_accounts.get(key.organization_id, key.service_account_id)
            state = key.state_at(at)
            refusal: Unauthenticated | PermissionDenied | None = None
            if state is ApiKeyState.REVOKED or account is None:
                refusal = Unauthenticated("the API key was revoked", reason="API_KEY_REVOKED")
            elif state is ApiKeyState.EXPIRED:
                refusal = Unauthenticated("the API key has expired", reason="API_KEY_EXPIRED")
            org = await uow.organizations.get(key.organization_id)
            if refusal is None and (org is None or org.state is not State.ACTIVE):
                refusal = _disabled_organization()
            if refusal is not None or account is None:
                await self._audit(
                    uow,
                    ctx,
                    key.organization_id,
                    "api_keys.exchange",
                    key.name,
                    Outcome.DENIED,
                    16,
                    actor=key.name,
                    reason=refusal.reason if refusal else "",
                )
                await uow.commit()
                raise refusal or invalid
            access, expires = await self._keys.sign(
                uow,
                {
                    **await self._rate_claims(uow, account.organization_id, None),
                    "sub": account.name,
                    "org": ORGANIZATION.format(account.organization_id),
                    "roles": [account.role.value, *([SERVICE_ROLE] if account.internal else [])],
                    "role": account.role.value,
                    "superuser": False,
                    "gen": account.token_generation,
                    "akid": key.id,
                },
            )
            await uow.api_keys.touch(key.id, at)
            await uow.commit()
        return TokenGrant(access, expires), account.name

    async def prune_login_failures(self) -> None:
        async with self._uow() as uow:
            await uow.login_failures.prune(self._clock() - self._throttle.window_seconds)
            await uow.commit()
