"""Identity's use cases: one async method each; each owns its unit of work.

Callers arrive as a :class:`Context` (who, from where); authorization is decided here with the
domain's :class:`Principal` policy; errors are the kit's categories with stable reasons.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from corral.libs import listing
from corral.libs.auth.caller import Caller
from corral.libs.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaViolation,
    ResourceExhausted,
    Unauthenticated,
    Validator,
)
from corral.services.identity import tokens
from corral.services.identity.domain import (
    LIMIT_FIELDS,
    LIMIT_FOR_KIND,
    MIN_PASSWORD_LENGTH,
    ORGANIZATION_ID,
    SERVICE_ROLE,
    ApiKey,
    ApiKeyState,
    AuditEvent,
    KeyState,
    Organization,
    Outcome,
    Principal,
    Quota,
    RefreshToken,
    Reservation,
    ReservationState,
    Role,
    ServiceAccount,
    SigningKeyRecord,
    State,
    UsageKind,
    User,
    counter_period,
    debited_subjects,
    ensure_not_last_admin,
    month_period,
    now,
    org_name,
    parse_name,
)
from corral.services.identity.repository import DuplicateKey, IdentityUnitOfWork
from corral.services.identity.throttle import ACCOUNT, SOURCE, LoginThrottle

log = logging.getLogger("corral.identity")

DEFAULT_ORGANIZATION = "default"
PLATFORM = "-"  # the "organization" of events that belong to none (key rotation, unknown emails)
T = TypeVar("T")
SYSTEM = Principal(subject="services/identity", organization_id="", role=None, superuser=True)


@dataclass(frozen=True)
class Context:
    """Who is calling and from where (for authorization and the audit log)."""

    principal: Principal | None = None
    source_ip: str = ""
    user_agent: str = ""
    request_id: str = ""
    family_id: str = ""  # the caller's refresh-token family (``sid`` claim), if any

    def require(self) -> Principal:
        if self.principal is None:
            raise Unauthenticated("this method needs a bearer token", reason="TOKEN_MISSING")
        return self.principal


SYSTEM_CONTEXT = Context(principal=SYSTEM, request_id="admin-cli")


@dataclass(frozen=True)
class Config:
    issuer: str
    audience: str
    access_ttl: float = 900.0
    refresh_ttl: float = 30 * 86400.0
    key_retirement: float = 960.0  # how long a retired key stays published


@dataclass(frozen=True)
class TokenGrant:
    access_token: str
    access_expire_time: float
    refresh_token: str = ""
    refresh_expire_time: float | None = None


@dataclass(frozen=True)
class ListResult(Generic[T]):
    items: list[T]
    next_page_token: str
    total_size: int


@dataclass(frozen=True)
class QuotaView:
    quota: Quota
    usage: dict[UsageKind, tuple[int, int]]  # kind -> (used, reserved)
    period_start: float
    period_end: float


@dataclass(frozen=True)
class UsageTotals:
    session_turns: int = 0
    task_runs: int = 0
    tokens: int = 0
    cost_usd_micros: int = 0
    storage_bytes: int = 0


@dataclass(frozen=True)
class UsageReport:
    name: str
    start_time: float
    end_time: float
    totals: UsageTotals
    daily: list[tuple[float, UsageTotals]]
    by_principal: dict[str, UsageTotals]


@dataclass
class Rotation:
    active: SigningKeyRecord
    pending: SigningKeyRecord
    previous: SigningKeyRecord | None


USER_FILTER = {
    "email": listing.FieldSpec("email", str.lower),
    "display_name": listing.FieldSpec("display_name"),
    "role": listing.FieldSpec(
        "role", listing.enum_value({"ADMIN": "admin", "USER": "user", "VIEWER": "viewer"})
    ),
    "state": listing.FieldSpec(
        "state", listing.enum_value({"ACTIVE": "active", "DISABLED": "disabled"})
    ),
    "create_time": listing.FieldSpec("create_time", listing.parse_time),
}
ORG_FILTER = {
    "state": USER_FILTER["state"],
    "display_name": listing.FieldSpec("display_name"),
    "create_time": USER_FILTER["create_time"],
}
SA_FILTER = {
    "display_name": listing.FieldSpec("display_name"),
    "role": USER_FILTER["role"],
    "create_time": USER_FILTER["create_time"],
}
KEY_FILTER = {
    "state": listing.FieldSpec("state", listing.enum_value({s.name: s.value for s in ApiKeyState})),
    "expire_time": listing.FieldSpec("expire_time", listing.parse_time),
    "create_time": USER_FILTER["create_time"],
}
AUDIT_FILTER = {
    "actor": listing.FieldSpec("actor"),
    "action": listing.FieldSpec("action", prefix=True),
    "resource": listing.FieldSpec("resource", prefix=True),
    "outcome": listing.FieldSpec(
        "outcome",
        listing.enum_value({"SUCCEEDED": "succeeded", "DENIED": "denied", "FAILED": "failed"}),
    ),
    "service": listing.FieldSpec("service"),
    "source_ip": listing.FieldSpec("source_ip"),
    "event_time": listing.FieldSpec("event_time", listing.parse_time),
}


def _new_id() -> str:
    return uuid.uuid4().hex


def normalize_email(email: str) -> str:
    return email.strip().lower()


def check_password(password: str, field_path: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH or len(set(password)) < 4:
        description = f"must be at least {MIN_PASSWORD_LENGTH} characters and not repetitive"
        raise InvalidArgument(
            f"the password is too weak: it {description}",
            reason="WEAK_PASSWORD",
            violations=[FieldViolation(field_path, description)],
        )


def _etag_matches(sent: str, current: str) -> None:
    if sent and sent != current:
        raise Aborted("the resource changed since it was read", reason="ETAG_MISMATCH")


def _not_found(what: str) -> NotFound:
    return NotFound(f"{what} was not found", reason="NOT_FOUND")


class IdentityService:
    def __init__(
        self,
        uow: Callable[[], IdentityUnitOfWork],
        config: Config,
        passwords: tokens.Passwords,
        cipher: tokens.KeyCipher,
        throttle: LoginThrottle,
        clock: Callable[[], float] = now,
    ) -> None:
        self._uow = uow
        self.config = config
        self._passwords = passwords
        self._cipher = cipher
        self._throttle = throttle
        self._clock = clock

    # ---- audit ----

    def _event(
        self,
        ctx: Context,
        org_id: str,
        action: str,
        resource: str = "",
        outcome: Outcome = Outcome.SUCCEEDED,
        status_code: int = 0,
        actor: str | None = None,
        **metadata: str,
    ) -> AuditEvent:
        who = actor or (ctx.principal.subject if ctx.principal else "anonymous")
        return AuditEvent(
            organization_id=org_id,
            actor=who,
            action=f"identity.{action}",
            resource=resource,
            outcome=outcome,
            status_code=status_code,
            source_ip=ctx.source_ip,
            user_agent=ctx.user_agent[:256],
            request_id=ctx.request_id,
            metadata=dict(metadata),
            event_time=self._clock(),
            create_time=self._clock(),
        )

    async def _record(self, *events: AuditEvent) -> None:
        """Write events in their own transaction (for refusals, whose main one rolls back)."""
        async with self._uow() as uow:
            await uow.audit.append(events)
            await uow.commit()

    # ---- signing keys ----

    def _new_key(self, state: KeyState, at: float) -> SigningKeyRecord:
        generated = tokens.generate_signing_key()
        return SigningKeyRecord(
            kid=generated.kid,
            algorithm=tokens.ALGORITHM,
            state=state,
            private_key=self._cipher.seal(generated.kid, generated.private_pem),
            public_jwk=generated.public_jwk,
            create_time=at,
            activate_time=at if state is KeyState.ACTIVE else None,
        )

    async def ensure_signing_keys(self) -> None:
        """First start: one active key and one pending (already published) key."""
        async with self._uow() as uow:
            if await uow.signing_keys.in_state(KeyState.ACTIVE):
                return
            at = self._clock()
            try:
                await uow.signing_keys.add(self._new_key(KeyState.ACTIVE, at))
                await uow.signing_keys.add(self._new_key(KeyState.PENDING, at))
            except DuplicateKey:
                return  # another replica created them first
            await uow.commit()

    async def jwks(self) -> list[dict[str, str]]:
        """Public halves of every pending, active and still-published retired key."""
        at = self._clock()
        async with self._uow() as uow:
            keys = await uow.signing_keys.all()
        return [tokens.public_only(k.public_jwk) for k in keys if k.published_at(at)]

    async def list_signing_keys(
        self, ctx: Context, page_size: int, page_token: str, filter_text: str
    ) -> ListResult[SigningKeyRecord]:
        ctx.require().require_superuser()
        spec = {
            "state": listing.FieldSpec(
                "state",
                listing.enum_value({s.name: s.value for s in KeyState}),
            )
        }
        conditions = listing.parse_filter(filter_text, spec)
        page = listing.page_from(page_size, page_token, listing.fingerprint(filter_text))
        async with self._uow() as uow:
            keys = await uow.signing_keys.all()
        keys = [
            k for k in keys if all((k.state.value == c.value) == (c.op == "=") for c in conditions)
        ]
        start = int(page.after[1]) if page.after else 0
        chunk = keys[start : start + page.size]
        more = start + page.size < len(keys)
        token = listing.next_token(page, (0, start + page.size) if more else None)
        return ListResult(chunk, token, len(keys))

    async def rotate_signing_keys(self, ctx: Context, revoke_previous: bool) -> Rotation:
        ctx.require().require_superuser()
        at = self._clock()
        async with self._uow() as uow:
            active = await uow.signing_keys.in_state(KeyState.ACTIVE)
            pending = await uow.signing_keys.in_state(KeyState.PENDING)
            if not active or not pending:
                raise Aborted("the signing keys are being initialised; retry", reason="ABORTED")
            previous, promoted = active[0], pending[0]
            previous_expected = previous.state
            previous.state = KeyState.REVOKED if revoke_previous else KeyState.RETIRED
            previous.retire_time = at
            previous.unpublish_time = at if revoke_previous else at + self.config.key_retirement
            promoted.state, promoted.activate_time = KeyState.ACTIVE, at
            busy = Aborted("another rotation is in progress; retry", reason="ABORTED")
            fresh = self._new_key(KeyState.PENDING, at)
            try:
                if not (
                    await uow.signing_keys.transition(previous, previous_expected)
                    and await uow.signing_keys.transition(promoted, KeyState.PENDING)
                ):
                    raise busy
                await uow.signing_keys.add(fresh)
            except DuplicateKey as exc:
                raise busy from exc
            await uow.signing_keys.wipe_unpublished(at)  # no private key outlives its use
            await uow.audit.append(
                [
                    self._event(
                        ctx,
                        PLATFORM,
                        "signing_keys.rotate",
                        f"signingKeys/{promoted.kid}",
                        previous=previous.kid,
                        previous_state=previous.state.value,
                    )
                ]
            )
            await uow.commit()
        log.info("signing keys rotated", extra={"active": promoted.kid, "pending": fresh.kid})
        return Rotation(active=promoted, pending=fresh, previous=previous)

    async def _sign(self, uow: IdentityUnitOfWork, claims: dict[str, Any]) -> tuple[str, float]:
        active = await uow.signing_keys.in_state(KeyState.ACTIVE)
        if not active:
            raise RuntimeError("no active signing key")
        key = active[0]
        at = self._clock()
        expires = int(at + self.config.access_ttl)
        body = {
            "iss": self.config.issuer,
            "aud": self.config.audience,
            "iat": int(at),
            "exp": expires,
            "jti": _new_id(),
            **claims,
        }
        pem = self._cipher.open(key.kid, key.private_key)
        return tokens.sign_access_token(pem, key.kid, body), float(expires)

    async def _rate_claims(
        self, uow: IdentityUnitOfWork, org_id: str, subject: str | None
    ) -> dict[str, int]:
        """The caller's request-rate quotas, carried in the token so every service's rate
        limiter applies them without asking identity: ``rpm`` (the caller's own, from their
        quota) and ``org_rpm`` (shared by the whole organisation)."""
        org = org_name(org_id)
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
        return await self._sign(
            uow,
            {
                **await self._rate_claims(uow, user.organization_id, user.name),
                "sub": user.name,
                "org": org_name(user.organization_id),
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
                id=_new_id(),
                family_id=family_id,
                user_id=user.id,
                organization_id=user.organization_id,
                token_hash=tokens.digest(plaintext),
                expire_time=expires,
                create_time=at,
            )
        )
        return plaintext, expires

    # ---- authentication of bearer tokens (identity's own extra check) ----

    async def check_access(self, caller: Caller) -> None:
        """Refuse tokens of disabled principals, signed-out generations and revoked API keys."""
        claims = tokens.token_claims(caller.token)
        generation = claims.get("gen")
        revoked = Unauthenticated("the token was revoked", reason="TOKEN_REVOKED")
        async with self._uow() as uow:
            if ids := parse_name("user", caller.subject):
                user = await uow.users.get(*ids)
                if user is None or user.state is not State.ACTIVE:
                    raise revoked
                if user.token_generation != generation:
                    raise revoked
            elif ids := parse_name("service_account", caller.subject):
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

    # ---- bootstrap ----

    async def bootstrap(self, email: str, password: str) -> str | None:
        """On first start: ``organizations/default`` and a superuser admin.

        Returns the generated password when none was given (the caller prints it once).
        """
        generated = None
        if not password:
            generated = password = secrets.token_urlsafe(18)
        email = normalize_email(email or "admin@corral.local")
        async with self._uow() as uow:
            if await uow.organizations.any():
                return None
        password_hash = await asyncio.to_thread(self._passwords.hash, password)
        at = self._clock()
        user = User(
            id=_new_id(),
            organization_id=DEFAULT_ORGANIZATION,
            email=email,
            display_name="Administrator",
            role=Role.ADMIN,
            password_hash=password_hash,
            superuser=True,
            create_time=at,
            update_time=at,
        )
        async with self._uow() as uow:
            try:
                await uow.organizations.add(
                    Organization(DEFAULT_ORGANIZATION, "Default", create_time=at, update_time=at)
                )
                await uow.users.add(user)
            except DuplicateKey:
                return None  # another replica bootstrapped first
            await uow.audit.append(
                [self._event(SYSTEM_CONTEXT, DEFAULT_ORGANIZATION, "bootstrap", user.name)]
            )
            await uow.commit()
        return generated

    # ---- organizations ----

    async def get_organization(self, ctx: Context, org_id: str) -> Organization:
        ctx.require().see_org(org_id)
        async with self._uow() as uow:
            org = await uow.organizations.get(org_id)
        if org is None:
            raise _not_found(org_name(org_id))
        return org

    async def list_organizations(
        self, ctx: Context, page_size: int, page_token: str, filter_text: str, order_by: str
    ) -> ListResult[Organization]:
        principal = ctx.require()
        conditions = listing.parse_filter(filter_text, ORG_FILTER)
        sort, desc = listing.parse_order(
            order_by, {"create_time": "create_time", "display_name": "display_name"}, "create_time"
        )
        page = listing.page_from(
            page_size, page_token, listing.fingerprint(principal.subject, filter_text, order_by)
        )
        only = None if principal.superuser else principal.organization_id
        async with self._uow() as uow:
            orgs, last, total = await uow.organizations.list(conditions, only, sort, desc, page)
        return ListResult(orgs, listing.next_token(page, last), total)

    async def _replay(self, scope: str, request_id: str, fingerprint: str) -> str | None:
        """The resource a previous identical request created, if any."""
        if not request_id:
            return None
        async with self._uow() as uow:
            found = await uow.idempotency.get(scope, request_id)
        if found is None:
            return None
        if found[0] != fingerprint:
            raise InvalidArgument(
                "request_id was already used for a different request",
                reason="REQUEST_ID_REUSED",
            )
        return found[1]

    async def create_organization(
        self,
        ctx: Context,
        org_id: str,
        display_name: str,
        admin: User | None,
        admin_password: str,
        request_id: str,
    ) -> tuple[Organization, User | None]:
        principal = ctx.require()
        principal.require_superuser()
        fingerprint = listing.fingerprint(
            org_id, display_name, admin.email if admin else "", admin_password
        )
        replayed = await self._replay("organizations", request_id, fingerprint)
        if replayed is not None:
            oid = replayed.removeprefix("organizations/")
            async with self._uow() as uow:
                org = await uow.organizations.get(oid)
                first = await uow.users.active_admins(oid)
                user = await uow.users.get(oid, first[0]) if first and admin else None
            if org is None:
                raise _not_found(replayed)
            return org, user
        org_id = org_id or f"org-{uuid.uuid4().hex[:12]}"
        if not ORGANIZATION_ID.match(org_id):
            raise InvalidArgument(
                "organization_id must be 3-63 characters of [a-z0-9-], starting with a letter",
                violations=[],
            )
        if admin is not None:
            check_password(admin_password, "initial_admin.password")
        at = self._clock()
        org = Organization(org_id, display_name, create_time=at, update_time=at)
        user = None
        password_hash = (
            await asyncio.to_thread(self._passwords.hash, admin_password) if admin else ""
        )
        async with self._uow() as uow:
            if await uow.organizations.get(org_id) is not None:
                raise AlreadyExists(f"{org.name} already exists", reason="ORGANIZATION_ID_TAKEN")
            try:
                await uow.organizations.add(org)
                if admin is not None:
                    user = replace(
                        admin,
                        id=_new_id(),
                        organization_id=org_id,
                        email=normalize_email(admin.email),
                        role=Role.ADMIN,
                        password_hash=password_hash,
                        create_time=at,
                        update_time=at,
                    )
                    if await uow.users.by_email(user.email) is not None:
                        raise AlreadyExists("the email is taken", reason="EMAIL_TAKEN")
                    await uow.users.add(user)
                if request_id:
                    await uow.idempotency.add(
                        "organizations", request_id, fingerprint, org.name, at
                    )
            except DuplicateKey as exc:
                raise Aborted("a concurrent request created it; retry", reason="CONFLICT") from exc
            await uow.audit.append([self._event(ctx, org_id, "organizations.create", org.name)])
            await uow.commit()
        return org, user

    async def update_organization(
        self, ctx: Context, org_id: str, changes: Mapping[str, str], etag: str
    ) -> Organization:
        ctx.require().require_admin(org_id)
        async with self._uow() as uow:
            org = await uow.organizations.get(org_id)
            if org is None:
                raise _not_found(org_name(org_id))
            _etag_matches(etag, org.etag)
            expected = org.version
            if "display_name" in changes:
                org.display_name = changes["display_name"]
            org.version += 1
            org.update_time = self._clock()
            if not await uow.organizations.save(org, expected):
                raise Aborted("the organization changed concurrently", reason="ETAG_MISMATCH")
            await uow.audit.append(
                [
                    self._event(
                        ctx, org_id, "organizations.update", org.name, fields=",".join(changes)
                    )
                ]
            )
            await uow.commit()
        return org

    async def set_organization_state(
        self, ctx: Context, org_id: str, state: State, reason: str = ""
    ) -> Organization:
        ctx.require().require_superuser(org_id)
        async with self._uow() as uow:
            org = await uow.organizations.get(org_id)
            if org is None:
                raise _not_found(org_name(org_id))
            if org.state is state:
                return org
            expected, at = org.version, self._clock()
            org.state, org.version, org.update_time = state, org.version + 1, at
            if not await uow.organizations.save(org, expected):
                raise Aborted("the organization changed concurrently", reason="ABORTED")
            if state is State.DISABLED:
                await uow.refresh_tokens.revoke_org(org_id, at)
                await uow.api_keys.revoke(at, organization_id=org_id)
                await uow.users.sign_out_organization(org_id)
            action = "organizations.disable" if state is State.DISABLED else "organizations.enable"
            await uow.audit.append([self._event(ctx, org_id, action, org.name, reason=reason)])
            await uow.commit()
        return org

    # ---- users ----

    async def _get_user(self, uow: IdentityUnitOfWork, org_id: str, user_id: str) -> User:
        user = await uow.users.get(org_id, user_id)
        if user is None:
            raise _not_found(f"organizations/{org_id}/users/{user_id}")
        return user

    async def get_user(self, ctx: Context, org_id: str, user_id: str) -> User:
        ctx.require().require_self_or_admin(org_id, f"organizations/{org_id}/users/{user_id}")
        async with self._uow() as uow:
            return await self._get_user(uow, org_id, user_id)

    async def list_users(
        self,
        ctx: Context,
        org_id: str,
        page_size: int,
        page_token: str,
        filter_text: str,
        order_by: str,
    ) -> ListResult[User]:
        ctx.require().require_admin(org_id)
        conditions = listing.parse_filter(filter_text, USER_FILTER)
        sort, desc = listing.parse_order(
            order_by,
            {"create_time": "create_time", "email": "email", "display_name": "display_name"},
            "create_time",
        )
        page = listing.page_from(
            page_size, page_token, listing.fingerprint(org_id, filter_text, order_by)
        )
        async with self._uow() as uow:
            if await uow.organizations.get(org_id) is None:
                raise _not_found(org_name(org_id))
            found, last, total = await uow.users.list(org_id, conditions, sort, desc, page)
        return ListResult(found, listing.next_token(page, last), total)

    async def create_user(
        self,
        ctx: Context,
        org_id: str,
        email: str,
        display_name: str,
        role: Role,
        password: str,
        request_id: str,
        *,
        superuser: bool = False,  # only ``corral admin`` sets it; the API never does
    ) -> User:
        ctx.require().require_admin(org_id)
        email = normalize_email(email)
        fingerprint = listing.fingerprint(org_id, email, display_name, role, password)
        replayed = await self._replay("users", request_id, fingerprint)
        if replayed is not None:
            ids = parse_name("user", replayed)
            assert ids is not None
            async with self._uow() as uow:
                return await self._get_user(uow, *ids)
        check_password(password, "user.password")
        password_hash = await asyncio.to_thread(self._passwords.hash, password)
        at = self._clock()
        user = User(
            id=_new_id(),
            organization_id=org_id,
            email=email,
            display_name=display_name,
            role=role,
            password_hash=password_hash,
            superuser=superuser,
            create_time=at,
            update_time=at,
        )
        async with self._uow() as uow:
            org = await uow.organizations.get(org_id)
            if org is None:
                raise _not_found(org_name(org_id))
            if org.state is not State.ACTIVE:
                raise FailedPrecondition(
                    "the organization is disabled", reason="ORGANIZATION_DISABLED"
                )
            if await uow.users.by_email(email) is not None:
                raise AlreadyExists("the email is taken", reason="EMAIL_TAKEN")
            try:
                await uow.users.add(user)
                if request_id:
                    await uow.idempotency.add("users", request_id, fingerprint, user.name, at)
            except DuplicateKey as exc:
                raise AlreadyExists("the email is taken", reason="EMAIL_TAKEN") from exc
            await uow.audit.append(
                [self._event(ctx, org_id, "users.create", user.name, role=role.value)]
            )
            await uow.commit()
        return user

    async def update_user(
        self, ctx: Context, org_id: str, user_id: str, changes: Mapping[str, Any], etag: str
    ) -> User:
        principal = ctx.require()
        target = f"organizations/{org_id}/users/{user_id}"
        principal.require_self_or_admin(org_id, target)
        if "role" in changes and not principal.is_admin_of(org_id):
            raise PermissionDenied("only admins may change roles", reason="ROLE_INSUFFICIENT")
        async with self._uow() as uow:
            user = await self._get_user(uow, org_id, user_id)
            _etag_matches(etag, user.etag)
            expected = user.version
            old_role = user.role
            if "display_name" in changes:
                user.display_name = changes["display_name"]
            if "email" in changes:
                user.email = normalize_email(changes["email"])
                other = await uow.users.by_email(user.email)
                if other is not None and other.id != user.id:
                    raise AlreadyExists("the email is taken", reason="EMAIL_TAKEN")
            if "role" in changes:
                user.role = changes["role"]
                if old_role is Role.ADMIN and user.role is not Role.ADMIN:
                    admins = await uow.users.active_admins(org_id)
                    ensure_not_last_admin(len([a for a in admins if a != user.id]))
            user.version += 1
            user.update_time = self._clock()
            try:
                saved = await uow.users.save(user, expected)
            except DuplicateKey as exc:
                raise AlreadyExists("the email is taken", reason="EMAIL_TAKEN") from exc
            if not saved:
                raise Aborted("the user changed concurrently", reason="ETAG_MISMATCH")
            events = [self._event(ctx, org_id, "users.update", user.name, fields=",".join(changes))]
            if user.role is not old_role:
                events.append(
                    self._event(
                        ctx,
                        org_id,
                        "users.role_change",
                        user.name,
                        old_role=old_role.value,
                        new_role=user.role.value,
                    )
                )
            await uow.audit.append(events)
            await uow.commit()
        return user

    async def change_password(
        self, ctx: Context, org_id: str, user_id: str, current: str, new: str
    ) -> None:
        principal = ctx.require()
        target = f"organizations/{org_id}/users/{user_id}"
        principal.require_self_or_admin(org_id, target)
        check_password(new, "new_password")
        async with self._uow() as uow:
            user = await self._get_user(uow, org_id, user_id)
        is_self = principal.subject == target
        if is_self and not await asyncio.to_thread(
            self._passwords.verify, user.password_hash, current
        ):
            await self._record(
                self._event(ctx, org_id, "users.change_password", target, Outcome.DENIED, 16)
            )
            raise Unauthenticated("the current password is wrong", reason="INVALID_CREDENTIALS")
        new_hash = await asyncio.to_thread(self._passwords.hash, new)
        async with self._uow() as uow:
            user = await self._get_user(uow, org_id, user_id)
            expected = user.version
            user.password_hash = new_hash
            user.update_time = self._clock()
            user.version += 1
            if not await uow.users.save(user, expected):
                raise Aborted("the user changed concurrently; retry", reason="ABORTED")
            if not is_self:  # an admin reset: the account may be compromised, sign it out
                await uow.users.bump_generation(user.id)
            await uow.refresh_tokens.revoke_user(
                user.id, self._clock(), keep_family=ctx.family_id if is_self else ""
            )
            await uow.audit.append([self._event(ctx, org_id, "users.change_password", target)])
            await uow.commit()

    async def set_user_state(
        self, ctx: Context, org_id: str, user_id: str, state: State, reason: str = ""
    ) -> User:
        ctx.require().require_admin(org_id)
        async with self._uow() as uow:
            user = await self._get_user(uow, org_id, user_id)
            if user.state is state:
                return user
            if state is State.DISABLED and user.role is Role.ADMIN:
                admins = await uow.users.active_admins(org_id)
                ensure_not_last_admin(len([a for a in admins if a != user.id]))
            at, expected = self._clock(), user.version
            user.state, user.update_time, user.version = state, at, user.version + 1
            if not await uow.users.save(user, expected):
                raise Aborted("the user changed concurrently; retry", reason="ABORTED")
            if state is State.DISABLED:
                await uow.users.bump_generation(user.id)  # every access token so far stops working
                await uow.refresh_tokens.revoke_user(user.id, at)
            action = "users.disable" if state is State.DISABLED else "users.enable"
            await uow.audit.append([self._event(ctx, org_id, action, user.name, reason=reason)])
            await uow.commit()
        return user

    # ---- sign-in and tokens ----

    async def login(
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
            await self._record(
                self._event(
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
            await self._record(
                self._event(
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
            )
            raise Unauthenticated("the email or password is wrong", reason="INVALID_CREDENTIALS")
        async with self._uow() as uow:
            # Re-read: the account may have changed while the password was being checked.
            user = await self._get_user(uow, user.organization_id, user.id)
            org = await uow.organizations.get(user.organization_id)
            refusal = None
            if user.state is not State.ACTIVE:
                refusal = PermissionDenied("the user is disabled", reason="PRINCIPAL_DISABLED")
            elif org is None or org.state is not State.ACTIVE:
                refusal = PermissionDenied(
                    "the organization is disabled", reason="ORGANIZATION_DISABLED"
                )
            if refusal is not None:
                await uow.audit.append(
                    [
                        self._event(
                            ctx,
                            user.organization_id,
                            "login",
                            user.name,
                            Outcome.DENIED,
                            7,
                            actor=user.name,
                            reason=refusal.reason,
                        )
                    ]
                )
                await uow.commit()
                raise refusal
            at = self._clock()
            family = _new_id()
            await uow.refresh_tokens.new_family(family, user, at)
            refresh, refresh_expires = await self._new_refresh(uow, user, family, at)
            access, access_expires = await self._user_access(uow, user, family)
            user.last_login_time = at
            await uow.users.touch_login(user.id, at)
            await uow.login_failures.clear(ACCOUNT, email)
            await uow.audit.append(
                [self._event(ctx, user.organization_id, "login", user.name, actor=user.name)]
            )
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
                await uow.audit.append(
                    [
                        self._event(
                            ctx,
                            token.organization_id,
                            "refresh_token.reuse",
                            f"organizations/{token.organization_id}/users/{token.user_id}",
                            Outcome.DENIED,
                            16,
                            family=token.family_id,
                        )
                    ]
                )
                await uow.commit()
                raise Unauthenticated(
                    "the refresh token was already used; its family is revoked",
                    reason="REFRESH_TOKEN_REUSED",
                )
            if token.expire_time <= at:
                raise Unauthenticated("the refresh token has expired", reason="TOKEN_EXPIRED")
            user = await uow.users.get(token.organization_id, token.user_id)
            org = await uow.organizations.get(token.organization_id)
            if user is None or user.state is not State.ACTIVE:
                raise PermissionDenied("the user is disabled", reason="PRINCIPAL_DISABLED")
            if org is None or org.state is not State.ACTIVE:
                raise PermissionDenied(
                    "the organization is disabled", reason="ORGANIZATION_DISABLED"
                )
            refresh, refresh_expires = await self._new_refresh(uow, user, token.family_id, at)
            access, access_expires = await self._user_access(uow, user, token.family_id)
            await uow.commit()
        return TokenGrant(access, access_expires, refresh, refresh_expires)

    async def logout(self, ctx: Context, refresh_token: str) -> None:
        async with self._uow() as uow:
            token = await uow.refresh_tokens.by_hash(tokens.digest(refresh_token))
            if token is None:
                return
            if await uow.refresh_tokens.revoke_family(token.family_id, self._clock()):
                await uow.audit.append(
                    [
                        self._event(
                            ctx,
                            token.organization_id,
                            "logout",
                            f"organizations/{token.organization_id}/users/{token.user_id}",
                            actor=f"organizations/{token.organization_id}/users/{token.user_id}",
                        )
                    ]
                )
            await uow.commit()

    async def logout_everywhere(self, ctx: Context, user_name: str) -> int:
        principal = ctx.require()
        target = user_name or principal.subject
        ids = parse_name("user", target)
        if ids is None:
            raise InvalidArgument("user must be a user resource name", violations=[])
        principal.require_self_or_admin(ids[0], target)
        async with self._uow() as uow:
            user = await self._get_user(uow, *ids)
            at = self._clock()
            count = await uow.refresh_tokens.revoke_user(user.id, at)
            await uow.users.bump_generation(user.id)
            await uow.audit.append(
                [self._event(ctx, ids[0], "logout_everywhere", target, families=str(count))]
            )
            await uow.commit()
        return count

    async def exchange_api_key(self, ctx: Context, plaintext: str) -> tuple[TokenGrant, str]:
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
            refusal: Exception | None = None
            if state is ApiKeyState.REVOKED or account is None:
                refusal = Unauthenticated("the API key was revoked", reason="API_KEY_REVOKED")
            elif state is ApiKeyState.EXPIRED:
                refusal = Unauthenticated("the API key has expired", reason="API_KEY_EXPIRED")
            org = await uow.organizations.get(key.organization_id)
            if refusal is None and (org is None or org.state is not State.ACTIVE):
                refusal = PermissionDenied(
                    "the organization is disabled", reason="ORGANIZATION_DISABLED"
                )
            if refusal is not None or account is None:
                await uow.audit.append(
                    [
                        self._event(
                            ctx,
                            key.organization_id,
                            "api_keys.exchange",
                            key.name,
                            Outcome.DENIED,
                            16,
                            actor=key.name,
                            reason=getattr(refusal, "reason", ""),
                        )
                    ]
                )
                await uow.commit()
                raise refusal or invalid
            access, expires = await self._sign(
                uow,
                {
                    **await self._rate_claims(uow, account.organization_id, None),
                    "sub": account.name,
                    "org": org_name(account.organization_id),
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

    # ---- service accounts and API keys ----

    async def _get_account(
        self, uow: IdentityUnitOfWork, org_id: str, sa_id: str
    ) -> ServiceAccount:
        account = await uow.service_accounts.get(org_id, sa_id)
        if account is None:
            raise _not_found(f"organizations/{org_id}/serviceAccounts/{sa_id}")
        return account

    async def get_service_account(self, ctx: Context, org_id: str, sa_id: str) -> ServiceAccount:
        ctx.require().require_self_or_admin(
            org_id, f"organizations/{org_id}/serviceAccounts/{sa_id}"
        )
        async with self._uow() as uow:
            return await self._get_account(uow, org_id, sa_id)

    async def list_service_accounts(
        self,
        ctx: Context,
        org_id: str,
        page_size: int,
        page_token: str,
        filter_text: str,
        order_by: str,
    ) -> ListResult[ServiceAccount]:
        ctx.require().require_admin(org_id)
        conditions = listing.parse_filter(filter_text, SA_FILTER)
        sort, desc = listing.parse_order(
            order_by, {"create_time": "create_time", "display_name": "display_name"}, "create_time"
        )
        page = listing.page_from(
            page_size, page_token, listing.fingerprint(org_id, filter_text, order_by)
        )
        async with self._uow() as uow:
            found, last, total = await uow.service_accounts.list(
                org_id, conditions, sort, desc, page
            )
        return ListResult(found, listing.next_token(page, last), total)

    async def create_service_account(
        self,
        ctx: Context,
        org_id: str,
        display_name: str,
        description: str,
        role: Role,
        request_id: str,
        *,
        internal: bool = False,  # only ``corral admin`` sets it; the API never does
    ) -> ServiceAccount:
        ctx.require().require_admin(org_id)
        fingerprint = listing.fingerprint(org_id, display_name, description, role)
        replayed = await self._replay("service_accounts", request_id, fingerprint)
        if replayed is not None:
            ids = parse_name("service_account", replayed)
            assert ids is not None
            async with self._uow() as uow:
                return await self._get_account(uow, *ids)
        at = self._clock()
        account = ServiceAccount(
            id=_new_id(),
            organization_id=org_id,
            display_name=display_name,
            description=description,
            role=role,
            internal=internal,
            create_time=at,
            update_time=at,
        )
        async with self._uow() as uow:
            org = await uow.organizations.get(org_id)
            if org is None:
                raise _not_found(org_name(org_id))
            if org.state is not State.ACTIVE:
                raise FailedPrecondition(
                    "the organization is disabled", reason="ORGANIZATION_DISABLED"
                )
            await uow.service_accounts.add(account)
            if request_id:
                try:
                    await uow.idempotency.add(
                        "service_accounts", request_id, fingerprint, account.name, at
                    )
                except DuplicateKey as exc:
                    raise Aborted("a concurrent retry won; retry", reason="CONFLICT") from exc
            await uow.audit.append(
                [self._event(ctx, org_id, "service_accounts.create", account.name, role=role.value)]
            )
            await uow.commit()
        return account

    async def update_service_account(
        self, ctx: Context, org_id: str, sa_id: str, changes: Mapping[str, Any], etag: str
    ) -> ServiceAccount:
        ctx.require().require_admin(org_id)
        async with self._uow() as uow:
            account = await self._get_account(uow, org_id, sa_id)
            _etag_matches(etag, account.etag)
            expected, old_role = account.version, account.role
            for name in ("display_name", "description", "role"):
                if name in changes:
                    setattr(account, name, changes[name])
            account.version += 1
            account.update_time = self._clock()
            if not await uow.service_accounts.save(account, expected):
                raise Aborted("the service account changed concurrently", reason="ETAG_MISMATCH")
            events = [
                self._event(
                    ctx, org_id, "service_accounts.update", account.name, fields=",".join(changes)
                )
            ]
            if account.role is not old_role:
                events.append(
                    self._event(
                        ctx,
                        org_id,
                        "service_accounts.role_change",
                        account.name,
                        old_role=old_role.value,
                        new_role=account.role.value,
                    )
                )
            await uow.audit.append(events)
            await uow.commit()
        return account

    async def delete_service_account(
        self, ctx: Context, org_id: str, sa_id: str, etag: str
    ) -> None:
        ctx.require().require_admin(org_id)
        async with self._uow() as uow:
            account = await self._get_account(uow, org_id, sa_id)
            _etag_matches(etag, account.etag)
            at = self._clock()
            expected = account.version
            account.deleted = True
            account.version += 1
            account.update_time = at
            if not await uow.service_accounts.save(account, expected):
                raise Aborted("the service account changed concurrently", reason="ETAG_MISMATCH")
            await uow.service_accounts.bump_generation(account.id)
            await uow.api_keys.revoke(at, service_account_id=sa_id)
            await uow.audit.append(
                [self._event(ctx, org_id, "service_accounts.delete", account.name)]
            )
            await uow.commit()

    async def _get_key(
        self, uow: IdentityUnitOfWork, org_id: str, sa_id: str, key_id: str
    ) -> ApiKey:
        key = await uow.api_keys.get(org_id, sa_id, key_id)
        if key is None:
            raise _not_found(f"organizations/{org_id}/serviceAccounts/{sa_id}/keys/{key_id}")
        return key

    async def get_api_key(self, ctx: Context, org_id: str, sa_id: str, key_id: str) -> ApiKey:
        ctx.require().require_admin(org_id)
        async with self._uow() as uow:
            return await self._get_key(uow, org_id, sa_id, key_id)

    async def list_api_keys(
        self,
        ctx: Context,
        org_id: str,
        sa_id: str,
        page_size: int,
        page_token: str,
        filter_text: str,
    ) -> ListResult[ApiKey]:
        ctx.require().require_admin(org_id)
        conditions = listing.parse_filter(filter_text, KEY_FILTER)
        page = listing.page_from(
            page_size, page_token, listing.fingerprint(org_id, sa_id, filter_text)
        )
        async with self._uow() as uow:
            await self._get_account(uow, org_id, sa_id)
            found, last, total = await uow.api_keys.list(
                org_id, sa_id, conditions, page, self._clock()
            )
        return ListResult(found, listing.next_token(page, last), total)

    async def create_api_key(
        self,
        ctx: Context,
        org_id: str,
        sa_id: str,
        display_name: str,
        expire_time: float | None,
        request_id: str,
    ) -> tuple[ApiKey, str]:
        ctx.require().require_admin(org_id)
        at = self._clock()
        if expire_time is not None and expire_time <= at:
            raise InvalidArgument("expire_time must be in the future", violations=[])
        fingerprint = listing.fingerprint(org_id, sa_id, display_name, expire_time)
        replayed = await self._replay("api_keys", request_id, fingerprint)
        if replayed is not None:
            ids = parse_name("api_key", replayed)
            assert ids is not None
            async with self._uow() as uow:
                return await self._get_key(uow, *ids), ""
        plaintext, lookup = tokens.new_api_key()
        key = ApiKey(
            id=_new_id(),
            organization_id=org_id,
            service_account_id=sa_id,
            display_name=display_name,
            lookup=lookup,
            secret_hash=tokens.digest(plaintext),
            expire_time=expire_time,
            create_time=at,
        )
        async with self._uow() as uow:
            await self._get_account(uow, org_id, sa_id)
            try:
                await uow.api_keys.add(key)
                if request_id:
                    await uow.idempotency.add("api_keys", request_id, fingerprint, key.name, at)
            except DuplicateKey as exc:
                raise Aborted("a concurrent request won; retry", reason="CONFLICT") from exc
            await uow.audit.append([self._event(ctx, org_id, "api_keys.create", key.name)])
            await uow.commit()
        return key, plaintext

    async def revoke_api_key(self, ctx: Context, org_id: str, sa_id: str, key_id: str) -> ApiKey:
        ctx.require().require_admin(org_id)
        async with self._uow() as uow:
            key = await self._get_key(uow, org_id, sa_id, key_id)
            if key.revoke_time is None:
                key.revoke_time = self._clock()
                await uow.api_keys.revoke(key.revoke_time, key_id=key.id)
                await uow.audit.append([self._event(ctx, org_id, "api_keys.revoke", key.name)])
                await uow.commit()
        return key

    # ---- quotas and the usage ledger ----

    async def _check_subject(self, uow: IdentityUnitOfWork, org_id: str, subject: str) -> None:
        """``subject`` must be the organization, or a live user/service account in it."""
        if subject == org_name(org_id):
            return
        if (ids := parse_name("user", subject)) and ids[0] == org_id:
            user = await uow.users.get(*ids)
            if user is None:
                raise _not_found(subject)
            if user.state is not State.ACTIVE:
                raise FailedPrecondition("the user is disabled", reason="PRINCIPAL_DISABLED")
            return
        if (ids := parse_name("service_account", subject)) and ids[0] == org_id:
            if await uow.service_accounts.get(*ids) is None:
                raise _not_found(subject)
            return
        raise _not_found(subject)

    async def get_quota(self, ctx: Context, subject: str) -> QuotaView:
        principal = ctx.require()
        org_id = subject.split("/")[1]
        if subject != org_name(org_id):
            principal.require_self_or_admin(org_id, subject)
        else:
            principal.see_org(org_id)
        at = self._clock()
        _, start, end = month_period(at)
        async with self._uow() as uow:
            if await uow.organizations.get(org_id) is None:
                raise _not_found(org_name(org_id))
            if subject != org_name(org_id):
                await self._check_subject(uow, org_id, subject)
            quota = await uow.quotas.get(subject) or Quota(
                subject, org_id, dict.fromkeys(LIMIT_FIELDS), update_time=at, version=0
            )
            usage = await uow.quotas.usage(subject, {k: counter_period(k, at) for k in UsageKind})
        return QuotaView(quota, usage, start, end)

    async def update_quota(
        self, ctx: Context, subject: str, changes: Mapping[str, int | None], etag: str
    ) -> QuotaView:
        principal = ctx.require()
        org_id = subject.split("/")[1]
        if subject == org_name(org_id):
            principal.require_superuser(org_id)
        else:
            principal.require_admin(org_id)
        async with self._uow() as uow:
            if await uow.organizations.get(org_id) is None:
                raise _not_found(org_name(org_id))
            if subject != org_name(org_id):
                await self._check_subject(uow, org_id, subject)
            at = self._clock()
            quota = await uow.quotas.get(subject)
            if quota is None:
                quota = Quota(
                    subject, org_id, dict.fromkeys(LIMIT_FIELDS), update_time=at, version=0
                )
                _etag_matches(etag, quota.etag)
                quota.limits.update(changes)
                quota.version = 1
                try:
                    await uow.quotas.add(quota)
                except DuplicateKey as exc:
                    raise Aborted("the quota changed concurrently", reason="ETAG_MISMATCH") from exc
            else:
                _etag_matches(etag, quota.etag)
                expected = quota.version
                quota.limits.update(changes)
                quota.version += 1
                quota.update_time = at
                if not await uow.quotas.save(quota, expected):
                    raise Aborted("the quota changed concurrently", reason="ETAG_MISMATCH")
            event = self._event(ctx, org_id, "quotas.update", quota.name)
            event.metadata.update({k: "" if v is None else str(v) for k, v in changes.items()})
            await uow.audit.append([event])
            await uow.commit()
        return await self.get_quota(ctx, subject)

    async def reserve(
        self,
        ctx: Context,
        org_id: str,
        subject: str,
        amounts: Mapping[UsageKind, int],
        reference: str,
        ttl: float,
        request_id: str,
    ) -> Reservation:
        ctx.require().require_service()
        violations: list[QuotaViolation] = []
        raced = False
        for attempt in range(2):
            # Over a limit: give back expired holds (outside any transaction) and try once more.
            if attempt and not await self.expire_reservations():
                break
            async with self._uow() as uow:
                existing = await uow.reservations.by_request(request_id)
                if existing is not None:
                    if existing.organization_id != org_id or existing.subject != subject:
                        raise InvalidArgument(
                            "request_id was already used for a different request",
                            reason="REQUEST_ID_REUSED",
                        )
                    return existing
                org = await uow.organizations.get(org_id)
                if org is None:
                    raise _not_found(org_name(org_id))
                if org.state is not State.ACTIVE:
                    raise FailedPrecondition(
                        "the organization is disabled", reason="ORGANIZATION_DISABLED"
                    )
                await self._check_subject(uow, org_id, subject)
                subjects = sorted(debited_subjects(org_id, subject))
                limits = await uow.quotas.get_many(subjects)
                at = self._clock()
                violations = []
                for who in subjects:  # a fixed order: racing holders never deadlock
                    for kind in sorted(amounts):
                        amount = amounts[kind]
                        if amount <= 0:
                            continue
                        limit_name = LIMIT_FOR_KIND[kind]
                        quota = limits.get(who)
                        limit = quota.limits[limit_name] if quota else None
                        if not await uow.quotas.hold(
                            who, kind, counter_period(kind, at), amount, limit
                        ):
                            violations.append(
                                QuotaViolation(
                                    who, limit_name, f"holding {amount} more would exceed {limit}"
                                )
                            )
                if violations:
                    continue  # rolls the holds back
                reservation = Reservation(
                    id=_new_id(),
                    organization_id=org_id,
                    subject=subject,
                    amounts=dict(amounts),
                    reference=reference,
                    request_id=request_id,
                    period=month_period(at)[0],
                    expire_time=at + ttl,
                    create_time=at,
                )
                try:
                    await uow.reservations.add(reservation)
                except DuplicateKey:
                    raced = True  # a concurrent retry of this request won: answer with its hold
                    break
                await uow.commit()
                return reservation
        if raced:
            async with self._uow() as uow:
                existing = await uow.reservations.by_request(request_id)
            if existing is not None:
                return existing
        raise ResourceExhausted(
            "a quota limit would be exceeded", reason="QUOTA_EXCEEDED", violations=violations
        )

    async def _give_back(
        self, uow: IdentityUnitOfWork, r: Reservation, *, reserved: bool, settled_gauges: bool
    ) -> None:
        for who in debited_subjects(r.organization_id, r.subject):
            if reserved:
                for kind, amount in r.amounts.items():
                    period = "" if kind.is_gauge else r.period
                    await uow.quotas.adjust(who, kind, period, reserved=-amount)
            if settled_gauges:
                for kind, amount in r.settled_amounts.items():
                    if kind.is_gauge:
                        await uow.quotas.adjust(who, kind, "", used=-amount)

    async def _get_reservation(
        self, uow: IdentityUnitOfWork, org_id: str, reservation_id: str
    ) -> Reservation:
        r = await uow.reservations.get(org_id, reservation_id)
        if r is None:
            raise _not_found(f"organizations/{org_id}/usageReservations/{reservation_id}")
        return r

    async def settle(
        self, ctx: Context, org_id: str, reservation_id: str, actual: Mapping[UsageKind, int]
    ) -> Reservation:
        ctx.require().require_service()
        async with self._uow() as uow:
            r = await self._get_reservation(uow, org_id, reservation_id)
            at = self._clock()
            settled = {k: actual.get(k, v if k.is_gauge else 0) for k, v in r.amounts.items()}
            settled.update(actual)
            if r.state is ReservationState.SETTLED:
                if r.settled_amounts == settled:
                    return r
                raise FailedPrecondition(
                    "the reservation was settled with other amounts", reason="ALREADY_SETTLED"
                )
            if r.state is ReservationState.RELEASED:
                raise FailedPrecondition(
                    "the reservation was released", reason="RESERVATION_RELEASED"
                )
            if r.state is ReservationState.EXPIRED or r.expire_time <= at:
                if r.state is ReservationState.RESERVED:
                    await self._expire(uow, r, at)
                    await uow.commit()
                raise FailedPrecondition(
                    "the reservation expired before it was settled", reason="RESERVATION_EXPIRED"
                )
            r.state, r.settled_amounts, r.settle_time = ReservationState.SETTLED, settled, at
            if not await uow.reservations.transition(r, ReservationState.RESERVED):
                raise Aborted("the reservation changed concurrently; retry", reason="ABORTED")
            for who in debited_subjects(org_id, r.subject):
                for kind in set(r.amounts) | set(settled):
                    period = "" if kind.is_gauge else r.period
                    await uow.quotas.adjust(
                        who, kind, period, reserved=-r.amounts.get(kind, 0), used=settled[kind]
                    )
            for kind, amount in settled.items():
                if amount:
                    await uow.reservations.record(org_id, r.subject, kind, amount, at)
            await uow.commit()
        return r

    async def release(self, ctx: Context, org_id: str, reservation_id: str) -> Reservation:
        ctx.require().require_service()
        async with self._uow() as uow:
            r = await self._get_reservation(uow, org_id, reservation_id)
            at = self._clock()
            if r.state in (ReservationState.RELEASED, ReservationState.EXPIRED):
                return r
            if r.state is ReservationState.RESERVED and r.expire_time <= at:
                await self._expire(uow, r, at)
                await uow.commit()
                return r
            was = r.state
            r.state, r.end_time = ReservationState.RELEASED, at
            if not await uow.reservations.transition(r, was):
                raise Aborted("the reservation changed concurrently; retry", reason="ABORTED")
            await self._give_back(
                uow,
                r,
                reserved=was is ReservationState.RESERVED,
                settled_gauges=was is ReservationState.SETTLED,
            )
            await uow.commit()
        return r

    async def _expire(self, uow: IdentityUnitOfWork, r: Reservation, at: float) -> bool:
        r.state, r.end_time = ReservationState.EXPIRED, at
        if not await uow.reservations.transition(r, ReservationState.RESERVED):
            return False
        await self._give_back(uow, r, reserved=True, settled_gauges=False)
        return True

    async def prune_login_failures(self) -> None:
        async with self._uow() as uow:
            await uow.login_failures.prune(self._clock() - self._throttle.window_seconds)
            await uow.commit()

    async def expire_reservations(self) -> int:
        """Give back what reservations nobody settled or released in time still hold."""
        count = 0
        async with self._uow() as uow:
            at = self._clock()
            for r in await uow.reservations.expired(at):
                count += await self._expire(uow, r, at)
            await uow.commit()
        return count

    async def usage_report(
        self, ctx: Context, subject: str, start: float | None, end: float | None
    ) -> UsageReport:
        principal = ctx.require()
        org_id = subject.split("/")[1]
        is_org = subject == org_name(org_id)
        if is_org:
            principal.require_admin(org_id)
        else:
            principal.require_self_or_admin(org_id, subject)
        at = self._clock()
        start = month_period(at)[1] if start is None else start
        end = at if end is None else end
        check = Validator()
        check.check(end > start, "end_time", "must be after start_time")
        check.check(end - start <= 366 * 86400, "end_time", "the range must not exceed 366 days")
        check.raise_if_any()
        async with self._uow() as uow:
            if await uow.organizations.get(org_id) is None:
                raise _not_found(org_name(org_id))
            if not is_org:
                await self._check_subject(uow, org_id, subject)
            entries = await uow.reservations.entries(
                org_id, None if is_org else subject, start, end
            )
            storage = await uow.quotas.usage(subject, {UsageKind.STORAGE_BYTES: ""})
        stored = storage.get(UsageKind.STORAGE_BYTES, (0, 0))[0]
        field_of = {
            UsageKind.SESSIONS: "session_turns",
            UsageKind.RUNS: "task_runs",
            UsageKind.TOKENS: "tokens",
            UsageKind.COST_USD_MICROS: "cost_usd_micros",
        }
        totals: dict[str, int] = {}
        daily: dict[float, dict[str, int]] = {}
        by_principal: dict[str, dict[str, int]] = {}
        for who, kind, amount, when in entries:
            name = field_of.get(kind)
            if name is None:
                continue
            day = when - when % 86400
            for bucket in (totals, daily.setdefault(day, {}), by_principal.setdefault(who, {})):
                bucket[name] = bucket.get(name, 0) + amount
        return UsageReport(
            name=f"{subject}/usageReport",
            start_time=start,
            end_time=end,
            totals=UsageTotals(**totals, storage_bytes=stored),
            daily=[(day, UsageTotals(**values)) for day, values in sorted(daily.items())],
            by_principal=(
                {who: UsageTotals(**values) for who, values in by_principal.items()}
                if is_org
                else {}
            ),
        )

    # ---- audit log ----

    async def list_audit_events(
        self,
        ctx: Context,
        org_id: str | None,
        page_size: int,
        page_token: str,
        filter_text: str,
        order_by: str,
    ) -> ListResult[AuditEvent]:
        principal = ctx.require()
        if org_id is None:
            principal.require_superuser()
        else:
            principal.require_admin(org_id)
        conditions = listing.parse_filter(filter_text, AUDIT_FILTER)
        _, desc = listing.parse_order(
            order_by or "event_time desc", {"event_time": "event_time"}, "event_time desc"
        )
        page = listing.page_from(
            page_size,
            page_token,
            listing.fingerprint(org_id, filter_text, order_by),
            default=100,
        )
        async with self._uow() as uow:
            found, last, total = await uow.audit.list(org_id, conditions, desc, page)
        return ListResult(found, listing.next_token(page, last), total)

    async def write_audit_events(
        self, ctx: Context, org_id: str | None, events: Sequence[AuditEvent], request_id: str
    ) -> int:
        ctx.require().require_service()
        if org_id is not None and any(e.organization_id != org_id for e in events):
            raise InvalidArgument(
                "every event must belong to the parent organization", violations=[]
            )
        at = self._clock()
        async with self._uow() as uow:
            if not await uow.audit.claim_batch(request_id, len(events), at):
                return 0
            await uow.audit.append([replace(e, create_time=at) for e in events])
            await uow.commit()
        return len(events)
