"""Service accounts and their API keys: create (idempotent), read, list, update, delete, revoke.

An API key's plaintext is shown once, in the create's response; only its digest is kept.
Internal service accounts (Corral's own services, ``corral admin create-service-account
--internal``) are hidden from everyone but superusers and themselves, and only superusers
(``corral admin`` among them) manage them (:meth:`Principal.require_manage_service_account`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from corral.libs import listing
from corral.libs.errors import Aborted, InvalidArgument, NotFound, PermissionDenied
from corral.libs.etags import check_etag, mismatch
from corral.libs.idempotency import CreateRequest
from corral.libs.names import new_id
from corral.services.identity import tokens
from corral.services.identity.accounts import (
    BY_NAME_OR_AGE,
    CREATE_TIME,
    DISPLAY_NAME,
    ROLE,
    active_organization,
)
from corral.services.identity.base import Context, ListResult, UseCases, found
from corral.services.identity.domain import (
    API_KEY,
    SERVICE_ACCOUNT,
    ApiKey,
    ApiKeyState,
    Principal,
    Role,
    ServiceAccount,
)
from corral.services.identity.queries import ListRequest, ListSpec
from corral.services.identity.repository import DuplicateKey, IdentityUnitOfWork

SERVICE_ACCOUNTS = ListSpec(
    {"display_name": DISPLAY_NAME, "role": ROLE, "create_time": CREATE_TIME},
    BY_NAME_OR_AGE,
    "create_time",
)
API_KEYS = ListSpec(
    {
        "state": listing.FieldSpec(
            "state", listing.enum_value({s.name: s.value for s in ApiKeyState})
        ),
        "expire_time": listing.FieldSpec("expire_time", listing.parse_time),
        "create_time": CREATE_TIME,
    },
    {"create_time": "create_time"},
    "create_time desc",
)


async def get_account(uow: IdentityUnitOfWork, org_id: str, sa_id: str) -> ServiceAccount:
    return found(
        await uow.service_accounts.get(org_id, sa_id), SERVICE_ACCOUNT.format(org_id, sa_id)
    )


async def visible_account(
    uow: IdentityUnitOfWork, principal: Principal, org_id: str, sa_id: str
) -> ServiceAccount:
    """The account, or NOT_FOUND if it is missing or hidden from ``principal``."""
    account = await get_account(uow, org_id, sa_id)
    if not principal.sees_service_account(account):
        raise NotFound(f"{account.name} was not found", reason="NOT_FOUND")
    return account


async def managed_account(
    uow: IdentityUnitOfWork, principal: Principal, org_id: str, sa_id: str
) -> ServiceAccount:
    """The account, if ``principal`` may change it or its keys."""
    account = await get_account(uow, org_id, sa_id)
    principal.require_manage_service_account(account)
    return account


async def get_key(uow: IdentityUnitOfWork, org_id: str, sa_id: str, key_id: str) -> ApiKey:
    return found(
        await uow.api_keys.get(org_id, sa_id, key_id), API_KEY.format(org_id, sa_id, key_id)
    )


class ServiceAccounts(UseCases):
    # ---- service accounts ----

    async def get_service_account(self, ctx: Context, org_id: str, sa_id: str) -> ServiceAccount:
        principal = ctx.require()
        principal.require_self_or_admin(org_id, SERVICE_ACCOUNT.format(org_id, sa_id))
        async with self._uow() as uow:
            return await visible_account(uow, principal, org_id, sa_id)

    async def list_service_accounts(
        self, ctx: Context, org_id: str, request: ListRequest
    ) -> ListResult[ServiceAccount]:
        principal = ctx.require()
        principal.require_admin(org_id)
        query = SERVICE_ACCOUNTS.query(request, org_id, principal.superuser)
        async with self._uow() as uow:
            page = await uow.service_accounts.list(org_id, query, principal.superuser)
            return ListResult(*page)

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
        principal = ctx.require()
        principal.require_admin(org_id)
        if internal and not principal.superuser:
            raise PermissionDenied(
                "only a superuser may create an internal service account",
                reason="SUPERUSER_REQUIRED",
            )
        payload = {"organization": org_id, "name": display_name, "about": description, "role": role}

        async def create(request: CreateRequest) -> ServiceAccount:
            at = self._clock()
            account = ServiceAccount(
                id=new_id(),
                organization_id=org_id,
                display_name=display_name,
                description=description,
                role=role,
                internal=internal,
                create_time=at,
                update_time=at,
            )
            async with self._uow() as uow:
                await active_organization(uow, org_id)
                await uow.service_accounts.add(account)
                await request.remember(uow.idempotency, account.name, at)
                await self._audit(
                    uow, ctx, org_id, "service_accounts.create", account.name, role=role.value
                )
                await uow.commit()
            return account

        replay = self._reread(SERVICE_ACCOUNT, get_account)
        method = "CreateServiceAccount"
        return await self._create_once(ctx, method, request_id, payload, create, replay)

    async def update_service_account(
        self, ctx: Context, org_id: str, sa_id: str, changes: Mapping[str, Any], etag: str
    ) -> ServiceAccount:
        principal = ctx.require()
        principal.require_admin(org_id)
        async with self._uow() as uow:
            account = await managed_account(uow, principal, org_id, sa_id)
            check_etag(etag, account.etag, "service account")
            expected, old_role = account.version, account.role
            for name in ("display_name", "description", "role"):
                if name in changes:
                    setattr(account, name, changes[name])
            account.version += 1
            account.update_time = self._clock()
            if not await uow.service_accounts.save(account, expected):
                raise mismatch("service account")
            await self._audit_update(
                uow,
                ctx,
                org_id,
                "service_accounts",
                account.name,
                changes,
                (old_role, account.role),
            )
            await uow.commit()
        return account

    async def delete_service_account(
        self, ctx: Context, org_id: str, sa_id: str, etag: str
    ) -> None:
        principal = ctx.require()
        principal.require_admin(org_id)
        async with self._uow() as uow:
            account = await managed_account(uow, principal, org_id, sa_id)
            check_etag(etag, account.etag, "service account")
            at = self._clock()
            expected = account.version
            account.deleted = True
            account.version += 1
            account.update_time = at
            if not await uow.service_accounts.save(account, expected):
                raise mismatch("service account")
            await uow.service_accounts.bump_generation(account.id)
            await uow.api_keys.revoke(at, service_account_id=sa_id)
            await self._audit(uow, ctx, org_id, "service_accounts.delete", account.name)
            await uow.commit()
        await self._revoke("subject", account.name)

    # ---- API keys ----

    async def get_api_key(self, ctx: Context, org_id: str, sa_id: str, key_id: str) -> ApiKey:
        principal = ctx.require()
        principal.require_admin(org_id)
        async with self._uow() as uow:
            await managed_account(uow, principal, org_id, sa_id)
            return await get_key(uow, org_id, sa_id, key_id)

    async def list_api_keys(
        self, ctx: Context, org_id: str, sa_id: str, request: ListRequest
    ) -> ListResult[ApiKey]:
        """Newest first."""
        principal = ctx.require()
        principal.require_admin(org_id)
        query = API_KEYS.query(request, org_id, sa_id)
        async with self._uow() as uow:
            await managed_account(uow, principal, org_id, sa_id)
            return ListResult(*await uow.api_keys.list(org_id, sa_id, query, self._clock()))

    async def create_api_key(
        self,
        ctx: Context,
        org_id: str,
        sa_id: str,
        display_name: str,
        expire_time: float | None,
        request_id: str,
    ) -> tuple[ApiKey, str]:
        """A new key and its plaintext; a replay answers with the key but no plaintext."""
        principal = ctx.require()
        principal.require_admin(org_id)
        async with self._uow() as uow:  # before a replay too: it would show the key
            await managed_account(uow, principal, org_id, sa_id)
        at = self._clock()
        if expire_time is not None and expire_time <= at:
            raise InvalidArgument("expire_time must be in the future", violations=[])
        parent = SERVICE_ACCOUNT.format(org_id, sa_id)
        payload = {"parent": parent, "name": display_name, "expire_time": expire_time}

        async def replay(name: str) -> tuple[ApiKey, str]:
            async with self._uow() as uow:
                return await get_key(uow, *API_KEY.parse_field(name, "name")), ""

        async def create(request: CreateRequest) -> tuple[ApiKey, str]:
            plaintext, lookup = tokens.new_api_key()
            key = ApiKey(
                id=new_id(),
                organization_id=org_id,
                service_account_id=sa_id,
                display_name=display_name,
                lookup=lookup,
                secret_hash=tokens.digest(plaintext),
                expire_time=expire_time,
                create_time=at,
            )
            async with self._uow() as uow:
                await managed_account(uow, principal, org_id, sa_id)
                try:
                    await uow.api_keys.add(key)
                except DuplicateKey as exc:
                    raise Aborted("a concurrent request won; retry", reason="CONFLICT") from exc
                await request.remember(uow.idempotency, key.name, at)
                await self._audit(uow, ctx, org_id, "api_keys.create", key.name)
                await uow.commit()
            return key, plaintext

        return await self._create_once(ctx, "CreateApiKey", request_id, payload, create, replay)

    async def revoke_api_key(self, ctx: Context, org_id: str, sa_id: str, key_id: str) -> ApiKey:
        principal = ctx.require()
        principal.require_admin(org_id)
        async with self._uow() as uow:
            await managed_account(uow, principal, org_id, sa_id)
            key = await get_key(uow, org_id, sa_id, key_id)
            if key.revoke_time is not None:
                return key
            key.revoke_time = self._clock()
            await uow.api_keys.revoke(key.revoke_time, key_id=key.id)
            await self._audit(uow, ctx, org_id, "api_keys.revoke", key.name)
            await uow.commit()
        await self._revoke("api_key", key.id)
        return key
