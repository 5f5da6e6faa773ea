"""Service accounts and their API keys: create (idempotent), read, list, update, delete, revoke.

An API key's plaintext is shown once, in the create's response; only its digest is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from corral.libs import listing
from corral.libs.errors import Aborted, InvalidArgument
from corral.libs.etags import check_etag, mismatch
from corral.libs.names import new_id
from corral.services.identity import tokens
from corral.services.identity.accounts import CREATE_TIME, ROLE, active_organization
from corral.services.identity.base import Context, ListResult, UseCases, found
from corral.services.identity.domain import (
    API_KEY,
    SERVICE_ACCOUNT,
    ApiKey,
    ApiKeyState,
    Role,
    ServiceAccount,
)
from corral.services.identity.repository import DuplicateKey, IdentityUnitOfWork

SA_FILTER = {
    "display_name": listing.FieldSpec("display_name"),
    "role": ROLE,
    "create_time": CREATE_TIME,
}
KEY_FILTER = {
    "state": listing.FieldSpec("state", listing.enum_value({s.name: s.value for s in ApiKeyState})),
    "expire_time": listing.FieldSpec("expire_time", listing.parse_time),
    "create_time": CREATE_TIME,
}


async def get_account(uow: IdentityUnitOfWork, org_id: str, sa_id: str) -> ServiceAccount:
    return found(
        await uow.service_accounts.get(org_id, sa_id), SERVICE_ACCOUNT.format(org_id, sa_id)
    )


async def get_key(uow: IdentityUnitOfWork, org_id: str, sa_id: str, key_id: str) -> ApiKey:
    return found(
        await uow.api_keys.get(org_id, sa_id, key_id), API_KEY.format(org_id, sa_id, key_id)
    )


class ServiceAccounts(UseCases):
    # ---- service accounts ----

    async def get_service_account(self, ctx: Context, org_id: str, sa_id: str) -> ServiceAccount:
        ctx.require().require_self_or_admin(org_id, SERVICE_ACCOUNT.format(org_id, sa_id))
        async with self._uow() as uow:
            return await get_account(uow, org_id, sa_id)

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
            return ListResult(
                *await uow.service_accounts.list(org_id, conditions, sort, desc, page)
            )

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
        payload = {"organization": org_id, "name": display_name, "about": description, "role": role}
        request = self._create_request(ctx, "CreateServiceAccount", request_id, payload)

        async def replay(name: str) -> ServiceAccount:
            async with self._uow() as uow:
                return await get_account(uow, *SERVICE_ACCOUNT.parse_field(name, "name"))

        async def create() -> ServiceAccount:
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
                await self._remember(uow, request, account.name, at)
                await self._audit(
                    uow, ctx, org_id, "service_accounts.create", account.name, role=role.value
                )
                await uow.commit()
            return account

        return await self._create_once(request, create, replay)

    async def update_service_account(
        self, ctx: Context, org_id: str, sa_id: str, changes: Mapping[str, Any], etag: str
    ) -> ServiceAccount:
        ctx.require().require_admin(org_id)
        async with self._uow() as uow:
            account = await get_account(uow, org_id, sa_id)
            check_etag(etag, account.etag, "service account")
            expected, old_role = account.version, account.role
            for name in ("display_name", "description", "role"):
                if name in changes:
                    setattr(account, name, changes[name])
            account.version += 1
            account.update_time = self._clock()
            if not await uow.service_accounts.save(account, expected):
                raise mismatch("service account")
            fields = ",".join(changes)
            await self._audit(
                uow, ctx, org_id, "service_accounts.update", account.name, fields=fields
            )
            if account.role is not old_role:
                await self._audit(
                    uow,
                    ctx,
                    org_id,
                    "service_accounts.role_change",
                    account.name,
                    old_role=old_role.value,
                    new_role=account.role.value,
                )
            await uow.commit()
        return account

    async def delete_service_account(
        self, ctx: Context, org_id: str, sa_id: str, etag: str
    ) -> None:
        ctx.require().require_admin(org_id)
        async with self._uow() as uow:
            account = await get_account(uow, org_id, sa_id)
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

    # ---- API keys ----

    async def get_api_key(self, ctx: Context, org_id: str, sa_id: str, key_id: str) -> ApiKey:
        ctx.require().require_admin(org_id)
        async with self._uow() as uow:
            return await get_key(uow, org_id, sa_id, key_id)

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
            await get_account(uow, org_id, sa_id)
            return ListResult(
                *await uow.api_keys.list(org_id, sa_id, conditions, page, self._clock())
            )

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
        ctx.require().require_admin(org_id)
        at = self._clock()
        if expire_time is not None and expire_time <= at:
            raise InvalidArgument("expire_time must be in the future", violations=[])
        parent = SERVICE_ACCOUNT.format(org_id, sa_id)
        payload = {"parent": parent, "name": display_name, "expire_time": expire_time}
        request = self._create_request(ctx, "CreateApiKey", request_id, payload)

        async def replay(name: str) -> tuple[ApiKey, str]:
            async with self._uow() as uow:
                return await get_key(uow, *API_KEY.parse_field(name, "name")), ""

        async def create() -> tuple[ApiKey, str]:
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
                await get_account(uow, org_id, sa_id)
                try:
                    await uow.api_keys.add(key)
                except DuplicateKey as exc:
                    raise Aborted("a concurrent request won; retry", reason="CONFLICT") from exc
                await self._remember(uow, request, key.name, at)
                await self._audit(uow, ctx, org_id, "api_keys.create", key.name)
                await uow.commit()
            return key, plaintext

        return await self._create_once(request, create, replay)

    async def revoke_api_key(self, ctx: Context, org_id: str, sa_id: str, key_id: str) -> ApiKey:
        ctx.require().require_admin(org_id)
        async with self._uow() as uow:
            key = await get_key(uow, org_id, sa_id, key_id)
            if key.revoke_time is None:
                key.revoke_time = self._clock()
                await uow.api_keys.revoke(key.revoke_time, key_id=key.id)
                await self._audit(uow, ctx, org_id, "api_keys.revoke", key.name)
                await uow.commit()
        return key
