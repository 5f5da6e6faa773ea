"""Organizations and users: bootstrap, create (idempotent), read, list, update, enable/disable,
passwords. Who may do what is the domain's :class:`Principal` policy."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from corral.libs import listing
from corral.libs.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)
from corral.libs.etags import check_etag, mismatch
from corral.libs.idempotency import CreateRequest
from corral.libs.names import new_id
from corral.services.identity import tokens
from corral.services.identity.base import (
    SYSTEM_CONTEXT,
    Clock,
    Config,
    Context,
    ListResult,
    UnitOfWorkFactory,
    UseCases,
    found,
)
from corral.services.identity.domain import (
    MIN_PASSWORD_LENGTH,
    ORGANIZATION,
    ORGANIZATION_ID,
    USER,
    Organization,
    Outcome,
    Role,
    State,
    User,
    ensure_not_last_admin,
)
from corral.services.identity.queries import ListRequest, ListSpec
from corral.services.identity.repository import DuplicateKey, IdentityUnitOfWork
from corral.services.identity.revocations import NO_FEED, RevocationFeed

DEFAULT_ORGANIZATION = "default"
STATE = listing.FieldSpec("state", listing.enum_value({"ACTIVE": "active", "DISABLED": "disabled"}))
ROLE = listing.FieldSpec(
    "role", listing.enum_value({"ADMIN": "admin", "USER": "user", "VIEWER": "viewer"})
)
CREATE_TIME = listing.FieldSpec("create_time", listing.parse_time)
DISPLAY_NAME = listing.FieldSpec("display_name")
BY_NAME_OR_AGE = {"create_time": "create_time", "display_name": "display_name"}
USERS = ListSpec(
    {
        "email": listing.FieldSpec("email", str.lower),
        "display_name": DISPLAY_NAME,
        "role": ROLE,
        "state": STATE,
        "create_time": CREATE_TIME,
    },
    {**BY_NAME_OR_AGE, "email": "email"},
    "create_time",
)
ORGANIZATIONS = ListSpec(
    {"state": STATE, "display_name": DISPLAY_NAME, "create_time": CREATE_TIME},
    BY_NAME_OR_AGE,
    "create_time",
)


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


def changed_concurrently(what: str) -> Aborted:
    """A change that sent no etag lost a race: re-read and retry."""
    return Aborted(f"the {what} changed concurrently; retry", reason="ABORTED")


async def active_organization(uow: IdentityUnitOfWork, org_id: str) -> Organization:
    """The organization, which must exist (NOT_FOUND) and be active (FAILED_PRECONDITION)."""
    org = found(await uow.organizations.get(org_id), ORGANIZATION.format(org_id))
    if org.state is not State.ACTIVE:
        raise FailedPrecondition("the organization is disabled", reason="ORGANIZATION_DISABLED")
    return org


async def get_user(uow: IdentityUnitOfWork, org_id: str, user_id: str) -> User:
    return found(await uow.users.get(org_id, user_id), USER.format(org_id, user_id))


class Accounts(UseCases):
    def __init__(
        self,
        uow: UnitOfWorkFactory,
        config: Config,
        clock: Clock,
        passwords: tokens.Passwords,
        revocations: RevocationFeed = NO_FEED,
    ) -> None:
        super().__init__(uow, config, clock, revocations)
        self._passwords = passwords

    async def _hash(self, password: str) -> str:
        return await asyncio.to_thread(self._passwords.hash, password)

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
        password_hash = await self._hash(password)
        at = self._clock()
        user = User(
            id=new_id(),
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
            await self._audit(uow, SYSTEM_CONTEXT, DEFAULT_ORGANIZATION, "bootstrap", user.name)
            await uow.commit()
        return generated

    # ---- organizations ----

    async def get_organization(self, ctx: Context, org_id: str) -> Organization:
        ctx.require().see_org(org_id)
        async with self._uow() as uow:
            org = await uow.organizations.get(org_id)
        return found(org, ORGANIZATION.format(org_id))

    async def list_organizations(
        self, ctx: Context, request: ListRequest
    ) -> ListResult[Organization]:
        principal = ctx.require()
        query = ORGANIZATIONS.query(request, principal.subject)
        only = None if principal.superuser else principal.organization_id
        async with self._uow() as uow:
            return ListResult(*await uow.organizations.list(query, only))

    async def create_organization(
        self,
        ctx: Context,
        requested: str,
        display_name: str,
        admin: User | None,
        admin_password: str,
        request_id: str,
    ) -> tuple[Organization, User | None]:
        """A new organization (``requested`` id, or a generated one), with its first admin
        when ``admin`` is given. The password is not part of the request's fingerprint: a fast
        digest of it would undo argon2."""
        ctx.require().require_superuser()
        payload = {
            "organization_id": requested,
            "display_name": display_name,
            "admin": [admin.email, admin.display_name] if admin else None,
        }

        async def replay(name: str) -> tuple[Organization, User | None]:
            (oid,) = ORGANIZATION.parse_field(name, "name")
            async with self._uow() as uow:
                org = found(await uow.organizations.get(oid), name)
                first = await uow.users.active_admins(oid)
                user = await uow.users.get(oid, first[0]) if first and admin else None
            return org, user

        async def create(request: CreateRequest) -> tuple[Organization, User | None]:
            org_id = requested or f"org-{new_id()[:12]}"
            if not ORGANIZATION_ID.match(org_id):
                raise InvalidArgument(
                    "organization_id is not a valid organization id",
                    violations=[
                        FieldViolation(
                            "organization_id",
                            "3-63 characters of [a-z0-9-], starting with a letter",
                        )
                    ],
                )
            if admin is not None:
                check_password(admin_password, "initial_admin.password")
            at = self._clock()
            org = Organization(org_id, display_name, create_time=at, update_time=at)
            user = None
            password_hash = await self._hash(admin_password) if admin else ""
            async with self._uow() as uow:
                if await uow.organizations.get(org_id) is not None:
                    raise AlreadyExists(
                        f"{org.name} already exists", reason="ORGANIZATION_ID_TAKEN"
                    )
                try:
                    await uow.organizations.add(org)
                    if admin is not None:
                        user = replace(
                            admin,
                            id=new_id(),
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
                except DuplicateKey as exc:  # a concurrent twin (replayed) or another request
                    raise AlreadyExists(
                        f"{org.name} already exists", reason="ORGANIZATION_ID_TAKEN"
                    ) from exc
                await request.remember(uow.idempotency, org.name, at)
                await self._audit(uow, ctx, org_id, "organizations.create", org.name)
                await uow.commit()
            return org, user

        return await self._create_once(
            ctx, "CreateOrganization", request_id, payload, create, replay
        )

    async def update_organization(
        self, ctx: Context, org_id: str, changes: Mapping[str, str], etag: str
    ) -> Organization:
        ctx.require().require_admin(org_id)
        async with self._uow() as uow:
            org = found(await uow.organizations.get(org_id), ORGANIZATION.format(org_id))
            check_etag(etag, org.etag, "organization")
            expected = org.version
            if "display_name" in changes:
                org.display_name = changes["display_name"]
            org.version += 1
            org.update_time = self._clock()
            if not await uow.organizations.save(org, expected):
                raise mismatch("organization")
            fields = ",".join(changes)
            await self._audit(uow, ctx, org_id, "organizations.update", org.name, fields=fields)
            await uow.commit()
        return org

    async def set_organization_state(
        self, ctx: Context, org_id: str, state: State, reason: str = ""
    ) -> Organization:
        ctx.require().require_superuser(org_id)
        async with self._uow() as uow:
            org = found(await uow.organizations.get(org_id), ORGANIZATION.format(org_id))
            if org.state is state:
                return org
            expected, at = org.version, self._clock()
            org.state, org.version, org.update_time = state, org.version + 1, at
            if not await uow.organizations.save(org, expected):
                raise changed_concurrently("organization")
            if state is State.DISABLED:
                await uow.refresh_tokens.revoke_org(org_id, at)
                await uow.api_keys.revoke(at, organization_id=org_id)
                await uow.users.sign_out_organization(org_id)
            action = "organizations.disable" if state is State.DISABLED else "organizations.enable"
            await self._audit(uow, ctx, org_id, action, org.name, reason=reason)
            await uow.commit()
        if state is State.DISABLED:
            await self._revoke("organization", org.name)
        return org

    # ---- users ----

    async def get_user(self, ctx: Context, org_id: str, user_id: str) -> User:
        ctx.require().require_self_or_admin(org_id, USER.format(org_id, user_id))
        async with self._uow() as uow:
            return await get_user(uow, org_id, user_id)

    async def list_users(self, ctx: Context, org_id: str, request: ListRequest) -> ListResult[User]:
        ctx.require().require_admin(org_id)
        query = USERS.query(request, org_id)
        async with self._uow() as uow:
            found(await uow.organizations.get(org_id), ORGANIZATION.format(org_id))
            return ListResult(*await uow.users.list(org_id, query))

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
        """A new user. The password is not part of the request's fingerprint (see
        :meth:`create_organization`)."""
        ctx.require().require_admin(org_id)
        email = normalize_email(email)
        payload = {"organization": org_id, "email": email, "name": display_name, "role": role}

        async def create(request: CreateRequest) -> User:
            check_password(password, "user.password")
            at = self._clock()
            user = User(
                id=new_id(),
                organization_id=org_id,
                email=email,
                display_name=display_name,
                role=role,
                password_hash=await self._hash(password),
                superuser=superuser,
                create_time=at,
                update_time=at,
            )
            async with self._uow() as uow:
                await active_organization(uow, org_id)
                if await uow.users.by_email(email) is not None:
                    raise AlreadyExists("the email is taken", reason="EMAIL_TAKEN")
                try:
                    await uow.users.add(user)
                except DuplicateKey as exc:
                    raise AlreadyExists("the email is taken", reason="EMAIL_TAKEN") from exc
                await request.remember(uow.idempotency, user.name, at)
                await self._audit(uow, ctx, org_id, "users.create", user.name, role=role.value)
                await uow.commit()
            return user

        replay = self._reread(USER, get_user)
        return await self._create_once(ctx, "CreateUser", request_id, payload, create, replay)

    async def update_user(
        self, ctx: Context, org_id: str, user_id: str, changes: Mapping[str, Any], etag: str
    ) -> User:
        principal = ctx.require()
        principal.require_self_or_admin(org_id, USER.format(org_id, user_id))
        if "role" in changes and not principal.is_admin_of(org_id):
            raise PermissionDenied("only admins may change roles", reason="ROLE_INSUFFICIENT")
        async with self._uow() as uow:
            user = await get_user(uow, org_id, user_id)
            principal.require_manage_user(user)
            check_etag(etag, user.etag, "user")
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
                raise mismatch("user")
            await self._audit_update(
                uow, ctx, org_id, "users", user.name, changes, (old_role, user.role)
            )
            await uow.commit()
        return user

    async def change_password(
        self, ctx: Context, org_id: str, user_id: str, current: str, new: str
    ) -> None:
        principal = ctx.require()
        target = USER.format(org_id, user_id)
        principal.require_self_or_admin(org_id, target)
        check_password(new, "new_password")
        async with self._uow() as uow:
            user = await get_user(uow, org_id, user_id)
        principal.require_manage_user(user)
        is_self = principal.subject == target
        if is_self and not await asyncio.to_thread(
            self._passwords.verify, user.password_hash, current
        ):
            await self._audit_apart(
                ctx, org_id, "users.change_password", target, Outcome.DENIED, 16
            )
            raise Unauthenticated("the current password is wrong", reason="INVALID_CREDENTIALS")
        new_hash = await self._hash(new)
        async with self._uow() as uow:
            user = await get_user(uow, org_id, user_id)
            expected = user.version
            user.password_hash = new_hash
            user.update_time = self._clock()
            user.version += 1
            if not await uow.users.save(user, expected):
                raise changed_concurrently("user")
            at = self._clock()
            if not is_self:  # an admin reset: the account may be compromised, sign it out
                await uow.users.bump_generation(user.id)
            await uow.refresh_tokens.revoke_user(
                user.id, at, keep_family=ctx.family_id if is_self else ""
            )
            await self._audit(uow, ctx, org_id, "users.change_password", target)
            await uow.commit()
        if not is_self:
            await self._revoke("subject", target)

    async def set_user_state(
        self, ctx: Context, org_id: str, user_id: str, state: State, reason: str = ""
    ) -> User:
        principal = ctx.require()
        principal.require_admin(org_id)
        async with self._uow() as uow:
            user = await get_user(uow, org_id, user_id)
            principal.require_manage_user(user)
            if user.state is state:
                return user
            if state is State.DISABLED and user.role is Role.ADMIN:
                admins = await uow.users.active_admins(org_id)
                ensure_not_last_admin(len([a for a in admins if a != user.id]))
            at, expected = self._clock(), user.version
            user.state, user.update_time, user.version = state, at, user.version + 1
            if not await uow.users.save(user, expected):
                raise changed_concurrently("user")
            if state is State.DISABLED:
                await uow.users.bump_generation(user.id)  # every access token so far stops working
                await uow.refresh_tokens.revoke_user(user.id, at)
            action = "users.disable" if state is State.DISABLED else "users.enable"
            await self._audit(uow, ctx, org_id, action, user.name, reason=reason)
            await uow.commit()
        if state is State.DISABLED:
            await self._revoke("subject", user.name)
        return user
