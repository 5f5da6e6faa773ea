"""Repositories of principals: organizations, users, service accounts and their API keys."""

from __future__ import annotations

import sqlalchemy as sa

from corral.libs.listing import Condition
from corral.services.identity import rows
from corral.services.identity.domain import (
    ApiKey,
    ApiKeyState,
    Organization,
    Role,
    ServiceAccount,
    State,
    User,
)
from corral.services.identity.queries import ListQuery
from corral.services.identity.sql import DuplicateKey, Repo
from corral.services.identity.tables import api_keys, organizations, service_accounts, users


class Organizations(Repo):
    async def get(self, org_id: str) -> Organization | None:
        row = await self._one(sa.select(organizations).where(organizations.c.id == org_id))
        return rows.organization(row) if row else None

    async def any(self) -> bool:
        return await self._one(sa.select(organizations.c.id).limit(1)) is not None

    async def add(self, org: Organization) -> None:
        await self._insert(organizations, rows.organization_values(org))

    async def save(self, org: Organization, expected_version: int) -> bool:
        result = await self.c.execute(
            organizations.update()
            .where(organizations.c.id == org.id, organizations.c.version == expected_version)
            .values(**rows.organization_values(org))
        )
        return bool(result.rowcount)

    async def list(self, query: ListQuery, only: str | None) -> tuple[list[Organization], str, int]:
        filters = [] if only is None else [organizations.c.id == only]
        return await self._page(organizations, filters, query, rows.organization)


class Users(Repo):
    async def get(self, org_id: str, user_id: str) -> User | None:
        row = await self._one(
            sa.select(users).where(users.c.id == user_id, users.c.organization_id == org_id)
        )
        return rows.user(row) if row else None

    async def by_email(self, email: str) -> User | None:
        row = await self._one(sa.select(users).where(users.c.email == email))
        return rows.user(row) if row else None

    async def add(self, user: User) -> None:
        await self._insert(users, rows.user_values(user))

    async def save(self, user: User, expected_version: int) -> bool:
        """Write the user's editable fields if nobody else wrote since ``expected_version``.

        ``token_generation`` and ``last_login_time`` are never written here (only by the
        targeted updates below), so a stale copy can never undo a sign-out.
        """
        values = rows.user_values(user)
        del values["token_generation"], values["last_login_time"]
        query = users.update().where(users.c.id == user.id, users.c.version == expected_version)
        try:
            result = await self.c.execute(query.values(**values))
        except sa.exc.IntegrityError as exc:
            raise DuplicateKey(str(exc.orig)) from exc
        return bool(result.rowcount)

    async def bump_generation(self, user_id: str) -> None:
        await self.c.execute(
            users.update()
            .where(users.c.id == user_id)
            .values(token_generation=users.c.token_generation + 1)
        )

    async def touch_login(self, user_id: str, at: float) -> None:
        await self.c.execute(users.update().where(users.c.id == user_id).values(last_login_time=at))

    async def sign_out_organization(self, org_id: str) -> None:
        """Every access token of the organization's users stops working."""
        await self.c.execute(
            users.update()
            .where(users.c.organization_id == org_id)
            .values(token_generation=users.c.token_generation + 1)
        )
        await self.c.execute(
            service_accounts.update()
            .where(service_accounts.c.organization_id == org_id)
            .values(token_generation=service_accounts.c.token_generation + 1)
        )

    async def active_admins(self, org_id: str) -> list[str]:
        found = await self.c.execute(
            sa.select(users.c.id).where(
                users.c.organization_id == org_id,
                users.c.role == Role.ADMIN.value,
                users.c.state == State.ACTIVE.value,
            )
        )
        return [r[0] for r in found]

    async def list(self, org_id: str, query: ListQuery) -> tuple[list[User], str, int]:
        return await self._page(users, [users.c.organization_id == org_id], query, rows.user)


class ServiceAccounts(Repo):
    async def get(self, org_id: str, sa_id: str) -> ServiceAccount | None:
        row = await self._one(
            sa.select(service_accounts).where(
                service_accounts.c.id == sa_id,
                service_accounts.c.organization_id == org_id,
                service_accounts.c.deleted.is_(False),
            )
        )
        return rows.service_account(row) if row else None

    async def add(self, account: ServiceAccount) -> None:
        await self._insert(service_accounts, rows.service_account_values(account))

    async def save(self, account: ServiceAccount, expected_version: int) -> bool:
        values = rows.service_account_values(account)
        del values["token_generation"]  # only bump_generation changes it
        result = await self.c.execute(
            service_accounts.update()
            .where(
                service_accounts.c.id == account.id,
                service_accounts.c.version == expected_version,
            )
            .values(**values)
        )
        return bool(result.rowcount)

    async def bump_generation(self, sa_id: str) -> None:
        await self.c.execute(
            service_accounts.update()
            .where(service_accounts.c.id == sa_id)
            .values(token_generation=service_accounts.c.token_generation + 1)
        )

    async def list(
        self, org_id: str, query: ListQuery, with_internal: bool
    ) -> tuple[list[ServiceAccount], str, int]:
        """The organization's accounts; internal ones (Corral's services) only if
        ``with_internal``."""
        filters = [
            service_accounts.c.organization_id == org_id,
            service_accounts.c.deleted.is_(False),
        ]
        if not with_internal:
            filters.append(service_accounts.c.internal.is_(False))
        return await self._page(service_accounts, filters, query, rows.service_account)


class ApiKeys(Repo):
    async def get(self, org_id: str, sa_id: str, key_id: str) -> ApiKey | None:
        row = await self._one(
            sa.select(api_keys).where(
                api_keys.c.id == key_id,
                api_keys.c.service_account_id == sa_id,
                api_keys.c.organization_id == org_id,
            )
        )
        return rows.api_key(row) if row else None

    async def by_id(self, key_id: str) -> ApiKey | None:
        row = await self._one(sa.select(api_keys).where(api_keys.c.id == key_id))
        return rows.api_key(row) if row else None

    async def by_lookup(self, lookup: str) -> ApiKey | None:
        row = await self._one(sa.select(api_keys).where(api_keys.c.lookup == lookup))
        return rows.api_key(row) if row else None

    async def add(self, key: ApiKey) -> None:
        await self._insert(api_keys, rows.api_key_values(key))

    async def revoke(self, at: float, *, key_id: str | None = None, **scope: str) -> int:
        query = api_keys.update().where(api_keys.c.revoke_time.is_(None))
        if key_id is not None:
            query = query.where(api_keys.c.id == key_id)
        for column, value in scope.items():
            query = query.where(api_keys.c[column] == value)
        return int((await self.c.execute(query.values(revoke_time=at))).rowcount)

    async def touch(self, key_id: str, at: float) -> None:
        await self.c.execute(
            api_keys.update()
            .where(
                api_keys.c.id == key_id,
                sa.or_(api_keys.c.last_use_time.is_(None), api_keys.c.last_use_time < at - 60),
            )
            .values(last_use_time=at)
        )

    async def list(
        self, org_id: str, sa_id: str, query: ListQuery, at: float
    ) -> tuple[list[ApiKey], str, int]:
        """``state`` is derived (revoked, expired by ``at``, else active), so filter on it here."""

        def state(condition: Condition) -> sa.ColumnElement[bool] | None:
            if condition.column != "state":
                return None
            clause = _key_state(ApiKeyState(condition.value), at)
            return clause if condition.op == "=" else sa.not_(clause)

        filters = [api_keys.c.organization_id == org_id, api_keys.c.service_account_id == sa_id]
        return await self._page(api_keys, filters, query, rows.api_key, special=state)


def _key_state(state: ApiKeyState, at: float) -> sa.ColumnElement[bool]:
    revoked, expires = api_keys.c.revoke_time, api_keys.c.expire_time
    if state is ApiKeyState.REVOKED:
        return revoked.is_not(None)
    if state is ApiKeyState.EXPIRED:
        return sa.and_(revoked.is_(None), expires <= at)
    return sa.and_(revoked.is_(None), sa.or_(expires.is_(None), expires > at))
