"""Identity's tables (SQLAlchemy Core, one ``metadata``) and the repositories on its unit of work.

Times are epoch seconds (double precision) so SQLite and PostgreSQL behave alike.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from corral.libs.db import UnitOfWork
from corral.libs.listing import Condition, Page
from corral.services.identity.domain import (
    LIMIT_FIELDS,
    ApiKey,
    ApiKeyState,
    AuditEvent,
    KeyState,
    Organization,
    Outcome,
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
)

metadata = sa.MetaData()
Time = sa.Double
SerialId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

organizations = sa.Table(
    "organizations",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("display_name", sa.String(200), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("create_time", Time, nullable=False),
    sa.Column("update_time", Time, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("organization_id", sa.String(64), sa.ForeignKey("organizations.id"), nullable=False),
    sa.Column("email", sa.String(320), nullable=False, unique=True),
    sa.Column("display_name", sa.String(200), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("superuser", sa.Boolean, nullable=False),
    sa.Column("password_hash", sa.Text, nullable=False),
    sa.Column("token_generation", sa.Integer, nullable=False),
    sa.Column("create_time", Time, nullable=False),
    sa.Column("update_time", Time, nullable=False),
    sa.Column("last_login_time", Time),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Index("users_by_org", "organization_id", "create_time"),
)

service_accounts = sa.Table(
    "service_accounts",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("organization_id", sa.String(64), sa.ForeignKey("organizations.id"), nullable=False),
    sa.Column("display_name", sa.String(200), nullable=False),
    sa.Column("description", sa.String(1000), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("internal", sa.Boolean, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False),
    sa.Column("token_generation", sa.Integer, nullable=False),
    sa.Column("create_time", Time, nullable=False),
    sa.Column("update_time", Time, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Index("service_accounts_by_org", "organization_id", "create_time"),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("organization_id", sa.String(64), nullable=False),
    sa.Column(
        "service_account_id", sa.String(64), sa.ForeignKey("service_accounts.id"), nullable=False
    ),
    sa.Column("display_name", sa.String(200), nullable=False),
    sa.Column("lookup", sa.String(16), nullable=False, unique=True),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("expire_time", Time),
    sa.Column("create_time", Time, nullable=False),
    sa.Column("last_use_time", Time),
    sa.Column("revoke_time", Time),
    sa.Index("api_keys_by_account", "service_account_id", "create_time"),
)

refresh_families = sa.Table(
    "refresh_families",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.String(64), nullable=False, index=True),
    sa.Column("organization_id", sa.String(64), nullable=False),
    sa.Column("create_time", Time, nullable=False),
    sa.Column("revoke_time", Time),
)

refresh_tokens = sa.Table(
    "refresh_tokens",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("family_id", sa.String(64), sa.ForeignKey("refresh_families.id"), nullable=False),
    sa.Column("user_id", sa.String(64), nullable=False),
    sa.Column("organization_id", sa.String(64), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("create_time", Time, nullable=False),
    sa.Column("expire_time", Time, nullable=False),
    sa.Column("used_time", Time),
)

signing_keys = sa.Table(
    "signing_keys",
    metadata,
    sa.Column("kid", sa.String(64), primary_key=True),
    sa.Column("algorithm", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("private_key", sa.LargeBinary, nullable=False),
    sa.Column("public_jwk", sa.Text, nullable=False),
    sa.Column("create_time", Time, nullable=False),
    sa.Column("activate_time", Time),
    sa.Column("retire_time", Time),
    sa.Column("unpublish_time", Time),
    # At most one key signs and one waits: racing replicas cannot both create or promote one.
    *(
        sa.Index(
            f"one_{state}_signing_key",
            "state",
            unique=True,
            sqlite_where=sa.text(f"state = '{state}'"),
            postgresql_where=sa.text(f"state = '{state}'"),
        )
        for state in ("active", "pending")
    ),
)

idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("scope", sa.String(64), primary_key=True),
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("resource", sa.String(300), nullable=False),
    sa.Column("create_time", Time, nullable=False),
)

quotas = sa.Table(
    "quotas",
    metadata,
    sa.Column("subject", sa.String(200), primary_key=True),
    sa.Column("organization_id", sa.String(64), nullable=False),
    *(sa.Column(name, sa.BigInteger) for name in LIMIT_FIELDS),
    sa.Column("update_time", Time, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
)

usage_counters = sa.Table(
    "usage_counters",
    metadata,
    sa.Column("subject", sa.String(200), primary_key=True),
    sa.Column("kind", sa.String(32), primary_key=True),
    sa.Column("period", sa.String(8), primary_key=True),
    sa.Column("used", sa.BigInteger, nullable=False),
    sa.Column("reserved", sa.BigInteger, nullable=False),
)

reservations = sa.Table(
    "reservations",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("organization_id", sa.String(64), nullable=False),
    sa.Column("subject", sa.String(200), nullable=False),
    sa.Column("amounts", sa.Text, nullable=False),
    sa.Column("settled_amounts", sa.Text, nullable=False),
    sa.Column("reference", sa.String(300), nullable=False),
    sa.Column("request_id", sa.String(64), nullable=False, unique=True),
    sa.Column("period", sa.String(8), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("create_time", Time, nullable=False),
    sa.Column("expire_time", Time, nullable=False),
    sa.Column("settle_time", Time),
    sa.Column("end_time", Time),
    sa.Index("reservations_open", "state", "expire_time"),
)

usage_entries = sa.Table(
    "usage_entries",
    metadata,
    sa.Column("id", SerialId, primary_key=True, autoincrement=True),
    sa.Column("organization_id", sa.String(64), nullable=False),
    sa.Column("principal", sa.String(200), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("time", Time, nullable=False),
    sa.Index("usage_entries_by_org", "organization_id", "time"),
)

audit_events = sa.Table(
    "audit_events",
    metadata,
    sa.Column("seq", SerialId, primary_key=True, autoincrement=True),
    sa.Column("organization_id", sa.String(64), nullable=False),
    sa.Column("event_time", Time, nullable=False),
    sa.Column("actor", sa.String(300), nullable=False),
    sa.Column("action", sa.String(200), nullable=False),
    sa.Column("resource", sa.String(300), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("status_code", sa.Integer, nullable=False),
    sa.Column("source_ip", sa.String(64), nullable=False),
    sa.Column("user_agent", sa.String(256), nullable=False),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("service", sa.String(32), nullable=False),
    sa.Column("metadata", sa.Text, nullable=False),
    sa.Column("create_time", Time, nullable=False),
    sa.Index("audit_events_by_org", "organization_id", "event_time"),
)

login_failures = sa.Table(
    "login_failures",
    metadata,
    sa.Column("id", SerialId, primary_key=True, autoincrement=True),
    sa.Column("scope", sa.String(8), nullable=False),
    sa.Column("key", sa.String(320), nullable=False),
    sa.Column("time", Time, nullable=False),
    sa.Index("login_failures_by_key", "scope", "key", "time"),
)

audit_batches = sa.Table(
    "audit_batches",
    metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("written", sa.Integer, nullable=False),
    sa.Column("create_time", Time, nullable=False),
)


class DuplicateKey(Exception):
    """A unique constraint refused a row (a concurrent create won)."""


Row = sa.Row[Any]


def _where(table: sa.Table, conditions: Sequence[Condition]) -> list[sa.ColumnElement[bool]]:
    clauses: list[sa.ColumnElement[bool]] = []
    for c in conditions:
        column = table.c[c.column]
        if c.prefix:
            clauses.append(column.startswith(c.value, autoescape=True))
        else:
            clauses.append(column.operate(_OPS[c.op], c.value))
    return clauses


_OPS: dict[str, Any] = {
    "=": sa.sql.operators.eq,
    "!=": sa.sql.operators.ne,
    "<": sa.sql.operators.lt,
    "<=": sa.sql.operators.le,
    ">": sa.sql.operators.gt,
    ">=": sa.sql.operators.ge,
}


class _Repo:
    def __init__(self, connection: AsyncConnection) -> None:
        self.c = connection

    async def _one(self, query: sa.Select[Any]) -> Row | None:
        row: Row | None = (await self.c.execute(query)).first()
        return row

    async def _insert(self, table: sa.Table, values: dict[str, Any]) -> Any:
        try:
            return await self.c.execute(table.insert().values(**values))
        except sa.exc.IntegrityError as exc:
            raise DuplicateKey(str(exc.orig)) from exc

    def _upsert_ignore(self, table: sa.Table, values: dict[str, Any]) -> Any:
        insert = postgresql.insert if self.c.dialect.name == "postgresql" else sqlite.insert
        return insert(table).values(**values).on_conflict_do_nothing()

    async def _page(
        self,
        table: sa.Table,
        filters: list[sa.ColumnElement[bool]],
        sort: str,
        descending: bool,
        page: Page,
        id_column: str = "id",
    ) -> tuple[list[Row], tuple[Any, Any] | None, int]:
        sort_col, id_col = table.c[sort], table.c[id_column]
        total = (
            await self.c.execute(sa.select(sa.func.count()).select_from(table).where(*filters))
        ).scalar_one()
        query = sa.select(table).where(*filters)
        if page.after is not None:
            value, ident = page.after
            if descending:
                query = query.where(
                    sa.or_(sort_col < value, sa.and_(sort_col == value, id_col < ident))
                )
            else:
                query = query.where(
                    sa.or_(sort_col > value, sa.and_(sort_col == value, id_col > ident))
                )
        order = (sort_col.desc(), id_col.desc()) if descending else (sort_col, id_col)
        rows = list((await self.c.execute(query.order_by(*order).limit(page.size + 1))).all())
        last = None
        if len(rows) > page.size:
            rows = rows[: page.size]
            last = (rows[-1]._mapping[sort], rows[-1]._mapping[id_column])
        return rows, last, int(total)


# ---- organizations and principals ----


def _org(row: Row) -> Organization:
    m = row._mapping
    return Organization(
        id=m["id"],
        display_name=m["display_name"],
        state=State(m["state"]),
        create_time=m["create_time"],
        update_time=m["update_time"],
        version=m["version"],
    )


class Organizations(_Repo):
    async def get(self, org_id: str) -> Organization | None:
        row = await self._one(sa.select(organizations).where(organizations.c.id == org_id))
        return _org(row) if row else None

    async def any(self) -> bool:
        return await self._one(sa.select(organizations.c.id).limit(1)) is not None

    async def add(self, org: Organization) -> None:
        await self._insert(organizations, _org_values(org))

    async def save(self, org: Organization, expected_version: int) -> bool:
        result = await self.c.execute(
            organizations.update()
            .where(organizations.c.id == org.id, organizations.c.version == expected_version)
            .values(**_org_values(org))
        )
        return bool(result.rowcount)

    async def list(
        self, conditions: list[Condition], only: str | None, sort: str, desc: bool, page: Page
    ) -> tuple[list[Organization], tuple[Any, Any] | None, int]:
        filters = _where(organizations, conditions)
        if only is not None:
            filters.append(organizations.c.id == only)
        rows, last, total = await self._page(organizations, filters, sort, desc, page)
        return [_org(r) for r in rows], last, total


def _org_values(org: Organization) -> dict[str, Any]:
    return {
        "id": org.id,
        "display_name": org.display_name,
        "state": org.state.value,
        "create_time": org.create_time,
        "update_time": org.update_time,
        "version": org.version,
    }


def _user(row: Row) -> User:
    m = row._mapping
    return User(
        id=m["id"],
        organization_id=m["organization_id"],
        email=m["email"],
        display_name=m["display_name"],
        role=Role(m["role"]),
        password_hash=m["password_hash"],
        state=State(m["state"]),
        superuser=m["superuser"],
        token_generation=m["token_generation"],
        create_time=m["create_time"],
        update_time=m["update_time"],
        last_login_time=m["last_login_time"],
        version=m["version"],
    )


def _user_values(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "organization_id": user.organization_id,
        "email": user.email,
        "display_name": user.display_name,
        "role": user.role.value,
        "password_hash": user.password_hash,
        "state": user.state.value,
        "superuser": user.superuser,
        "token_generation": user.token_generation,
        "create_time": user.create_time,
        "update_time": user.update_time,
        "last_login_time": user.last_login_time,
        "version": user.version,
    }


class Users(_Repo):
    async def get(self, org_id: str, user_id: str) -> User | None:
        row = await self._one(
            sa.select(users).where(users.c.id == user_id, users.c.organization_id == org_id)
        )
        return _user(row) if row else None

    async def by_email(self, email: str) -> User | None:
        row = await self._one(sa.select(users).where(users.c.email == email))
        return _user(row) if row else None

    async def add(self, user: User) -> None:
        await self._insert(users, _user_values(user))

    async def save(self, user: User, expected_version: int) -> bool:
        """Write the user's editable fields if nobody else wrote since ``expected_version``.

        ``token_generation`` and ``last_login_time`` are never written here (only by the
        targeted updates below), so a stale copy can never undo a sign-out.
        """
        values = _user_values(user)
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
        rows = await self.c.execute(
            sa.select(users.c.id).where(
                users.c.organization_id == org_id,
                users.c.role == Role.ADMIN.value,
                users.c.state == State.ACTIVE.value,
            )
        )
        return [r[0] for r in rows]

    async def list(
        self, org_id: str, conditions: list[Condition], sort: str, desc: bool, page: Page
    ) -> tuple[list[User], tuple[Any, Any] | None, int]:
        filters = [users.c.organization_id == org_id, *_where(users, conditions)]
        rows, last, total = await self._page(users, filters, sort, desc, page)
        return [_user(r) for r in rows], last, total


def _sa(row: Row) -> ServiceAccount:
    m = row._mapping
    return ServiceAccount(
        id=m["id"],
        organization_id=m["organization_id"],
        display_name=m["display_name"],
        description=m["description"],
        role=Role(m["role"]),
        internal=m["internal"],
        deleted=m["deleted"],
        token_generation=m["token_generation"],
        create_time=m["create_time"],
        update_time=m["update_time"],
        version=m["version"],
    )


def _sa_values(account: ServiceAccount) -> dict[str, Any]:
    return {
        "id": account.id,
        "organization_id": account.organization_id,
        "display_name": account.display_name,
        "description": account.description,
        "role": account.role.value,
        "internal": account.internal,
        "deleted": account.deleted,
        "token_generation": account.token_generation,
        "create_time": account.create_time,
        "update_time": account.update_time,
        "version": account.version,
    }


class ServiceAccounts(_Repo):
    async def get(self, org_id: str, sa_id: str) -> ServiceAccount | None:
        row = await self._one(
            sa.select(service_accounts).where(
                service_accounts.c.id == sa_id,
                service_accounts.c.organization_id == org_id,
                service_accounts.c.deleted.is_(False),
            )
        )
        return _sa(row) if row else None

    async def add(self, account: ServiceAccount) -> None:
        await self._insert(service_accounts, _sa_values(account))

    async def save(self, account: ServiceAccount, expected_version: int) -> bool:
        values = _sa_values(account)
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
        self, org_id: str, conditions: list[Condition], sort: str, desc: bool, page: Page
    ) -> tuple[list[ServiceAccount], tuple[Any, Any] | None, int]:
        filters = [
            service_accounts.c.organization_id == org_id,
            service_accounts.c.deleted.is_(False),
            *_where(service_accounts, conditions),
        ]
        rows, last, total = await self._page(service_accounts, filters, sort, desc, page)
        return [_sa(r) for r in rows], last, total


def _key(row: Row) -> ApiKey:
    m = row._mapping
    return ApiKey(
        id=m["id"],
        organization_id=m["organization_id"],
        service_account_id=m["service_account_id"],
        display_name=m["display_name"],
        lookup=m["lookup"],
        secret_hash=m["secret_hash"],
        expire_time=m["expire_time"],
        create_time=m["create_time"],
        last_use_time=m["last_use_time"],
        revoke_time=m["revoke_time"],
    )


class ApiKeys(_Repo):
    async def get(self, org_id: str, sa_id: str, key_id: str) -> ApiKey | None:
        row = await self._one(
            sa.select(api_keys).where(
                api_keys.c.id == key_id,
                api_keys.c.service_account_id == sa_id,
                api_keys.c.organization_id == org_id,
            )
        )
        return _key(row) if row else None

    async def by_id(self, key_id: str) -> ApiKey | None:
        row = await self._one(sa.select(api_keys).where(api_keys.c.id == key_id))
        return _key(row) if row else None

    async def by_lookup(self, lookup: str) -> ApiKey | None:
        row = await self._one(sa.select(api_keys).where(api_keys.c.lookup == lookup))
        return _key(row) if row else None

    async def add(self, key: ApiKey) -> None:
        await self._insert(
            api_keys,
            {
                "id": key.id,
                "organization_id": key.organization_id,
                "service_account_id": key.service_account_id,
                "display_name": key.display_name,
                "lookup": key.lookup,
                "secret_hash": key.secret_hash,
                "expire_time": key.expire_time,
                "create_time": key.create_time,
                "last_use_time": key.last_use_time,
                "revoke_time": key.revoke_time,
            },
        )

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
        self, org_id: str, sa_id: str, conditions: list[Condition], page: Page, at: float
    ) -> tuple[list[ApiKey], tuple[Any, Any] | None, int]:
        """``state`` is derived (revoked, expired by ``at``, else active), so filter on it here."""
        states = [c for c in conditions if c.column == "state"]
        filters = [
            api_keys.c.organization_id == org_id,
            api_keys.c.service_account_id == sa_id,
            *_where(api_keys, [c for c in conditions if c.column != "state"]),
        ]
        for condition in states:
            clause = _key_state(ApiKeyState(condition.value), at)
            filters.append(clause if condition.op == "=" else sa.not_(clause))
        rows, last, total = await self._page(api_keys, filters, "create_time", True, page)
        return [_key(r) for r in rows], last, total


def _key_state(state: ApiKeyState, at: float) -> sa.ColumnElement[bool]:
    revoked, expires = api_keys.c.revoke_time, api_keys.c.expire_time
    if state is ApiKeyState.REVOKED:
        return revoked.is_not(None)
    if state is ApiKeyState.EXPIRED:
        return sa.and_(revoked.is_(None), expires <= at)
    return sa.and_(revoked.is_(None), sa.or_(expires.is_(None), expires > at))


# ---- refresh tokens ----


class RefreshTokens(_Repo):
    async def new_family(self, family_id: str, user: User, at: float) -> None:
        await self._insert(
            refresh_families,
            {
                "id": family_id,
                "user_id": user.id,
                "organization_id": user.organization_id,
                "create_time": at,
                "revoke_time": None,
            },
        )

    async def add(self, token: RefreshToken) -> None:
        await self._insert(
            refresh_tokens,
            {
                "id": token.id,
                "family_id": token.family_id,
                "user_id": token.user_id,
                "organization_id": token.organization_id,
                "token_hash": token.token_hash,
                "create_time": token.create_time,
                "expire_time": token.expire_time,
                "used_time": None,
            },
        )

    async def by_hash(self, token_hash: str) -> RefreshToken | None:
        query = (
            sa.select(refresh_tokens, refresh_families.c.revoke_time)
            .join(refresh_families, refresh_families.c.id == refresh_tokens.c.family_id)
            .where(refresh_tokens.c.token_hash == token_hash)
        )
        row = await self._one(query)
        if row is None:
            return None
        m = row._mapping
        return RefreshToken(
            id=m["id"],
            family_id=m["family_id"],
            user_id=m["user_id"],
            organization_id=m["organization_id"],
            token_hash=m["token_hash"],
            expire_time=m["expire_time"],
            create_time=m["create_time"],
            used_time=m["used_time"],
            family_revoked=m["revoke_time"] is not None,
        )

    async def use(self, token_id: str, at: float) -> bool:
        """Marks a token used; False if it already was (a concurrent refresh won)."""
        result = await self.c.execute(
            refresh_tokens.update()
            .where(refresh_tokens.c.id == token_id, refresh_tokens.c.used_time.is_(None))
            .values(used_time=at)
        )
        return bool(result.rowcount)

    async def revoke_family(self, family_id: str, at: float) -> int:
        result = await self.c.execute(
            refresh_families.update()
            .where(refresh_families.c.id == family_id, refresh_families.c.revoke_time.is_(None))
            .values(revoke_time=at)
        )
        return int(result.rowcount)

    async def revoke_user(self, user_id: str, at: float, *, keep_family: str = "") -> int:
        result = await self.c.execute(
            refresh_families.update()
            .where(
                refresh_families.c.user_id == user_id,
                refresh_families.c.revoke_time.is_(None),
                refresh_families.c.id != keep_family,
            )
            .values(revoke_time=at)
        )
        return int(result.rowcount)

    async def revoke_org(self, org_id: str, at: float) -> int:
        result = await self.c.execute(
            refresh_families.update()
            .where(
                refresh_families.c.organization_id == org_id,
                refresh_families.c.revoke_time.is_(None),
            )
            .values(revoke_time=at)
        )
        return int(result.rowcount)


# ---- signing keys ----


def _signing_key(row: Row) -> SigningKeyRecord:
    m = row._mapping
    return SigningKeyRecord(
        kid=m["kid"],
        algorithm=m["algorithm"],
        state=KeyState(m["state"]),
        private_key=bytes(m["private_key"]),
        public_jwk=json.loads(m["public_jwk"]),
        create_time=m["create_time"],
        activate_time=m["activate_time"],
        retire_time=m["retire_time"],
        unpublish_time=m["unpublish_time"],
    )


class SigningKeys(_Repo):
    async def all(self) -> list[SigningKeyRecord]:
        rows = await self.c.execute(
            sa.select(signing_keys).order_by(signing_keys.c.create_time.desc())
        )
        return [_signing_key(r) for r in rows]

    async def in_state(self, state: KeyState) -> list[SigningKeyRecord]:
        rows = await self.c.execute(
            sa.select(signing_keys)
            .where(signing_keys.c.state == state.value)
            .order_by(signing_keys.c.create_time.desc())
        )
        return [_signing_key(r) for r in rows]

    async def add(self, key: SigningKeyRecord) -> None:
        await self._insert(
            signing_keys,
            {
                "kid": key.kid,
                "algorithm": key.algorithm,
                "state": key.state.value,
                "private_key": key.private_key,
                "public_jwk": json.dumps(key.public_jwk),
                "create_time": key.create_time,
                "activate_time": key.activate_time,
                "retire_time": key.retire_time,
                "unpublish_time": key.unpublish_time,
            },
        )

    async def wipe_unpublished(self, at: float) -> None:
        await self.c.execute(
            signing_keys.update()
            .where(signing_keys.c.unpublish_time <= at, signing_keys.c.private_key != b"")
            .values(private_key=b"")
        )

    async def transition(self, key: SigningKeyRecord, expected: KeyState) -> bool:
        try:
            result = await self._transition(key, expected)
        except sa.exc.IntegrityError as exc:
            raise DuplicateKey(str(exc.orig)) from exc
        return bool(result.rowcount)

    async def _transition(self, key: SigningKeyRecord, expected: KeyState) -> Any:
        return await self.c.execute(
            signing_keys.update()
            .where(signing_keys.c.kid == key.kid, signing_keys.c.state == expected.value)
            .values(
                state=key.state.value,
                activate_time=key.activate_time,
                retire_time=key.retire_time,
                unpublish_time=key.unpublish_time,
            )
        )


# ---- idempotent creates ----


class IdempotencyKeys(_Repo):
    async def get(self, scope: str, request_id: str) -> tuple[str, str] | None:
        row = await self._one(
            sa.select(idempotency_keys.c.fingerprint, idempotency_keys.c.resource).where(
                idempotency_keys.c.scope == scope, idempotency_keys.c.request_id == request_id
            )
        )
        return (str(row._mapping["fingerprint"]), str(row._mapping["resource"])) if row else None

    async def add(
        self, scope: str, request_id: str, fingerprint: str, resource: str, at: float
    ) -> None:
        await self._insert(
            idempotency_keys,
            {
                "scope": scope,
                "request_id": request_id,
                "fingerprint": fingerprint,
                "resource": resource,
                "create_time": at,
            },
        )


# ---- quotas and the ledger ----


def _quota(row: Row) -> Quota:
    m = row._mapping
    return Quota(
        subject=m["subject"],
        organization_id=m["organization_id"],
        limits={name: m[name] for name in LIMIT_FIELDS},
        update_time=m["update_time"],
        version=m["version"],
    )


class Quotas(_Repo):
    async def get(self, subject: str) -> Quota | None:
        row = await self._one(sa.select(quotas).where(quotas.c.subject == subject))
        return _quota(row) if row else None

    async def get_many(self, subjects: Sequence[str]) -> dict[str, Quota]:
        rows = await self.c.execute(sa.select(quotas).where(quotas.c.subject.in_(subjects)))
        return {q.subject: q for q in map(_quota, rows)}

    async def add(self, quota: Quota) -> None:
        await self._insert(
            quotas,
            {
                "subject": quota.subject,
                "organization_id": quota.organization_id,
                **quota.limits,
                "update_time": quota.update_time,
                "version": quota.version,
            },
        )

    async def save(self, quota: Quota, expected_version: int) -> bool:
        result = await self.c.execute(
            quotas.update()
            .where(quotas.c.subject == quota.subject, quotas.c.version == expected_version)
            .values(**quota.limits, update_time=quota.update_time, version=quota.version)
        )
        return bool(result.rowcount)

    async def usage(
        self, subject: str, periods: dict[UsageKind, str]
    ) -> dict[UsageKind, tuple[int, int]]:
        rows = await self.c.execute(
            sa.select(usage_counters).where(usage_counters.c.subject == subject)
        )
        found: dict[UsageKind, tuple[int, int]] = {}
        for row in rows:
            m = row._mapping
            kind = UsageKind(m["kind"])
            if periods.get(kind) == m["period"]:
                found[kind] = (int(m["used"]), int(m["reserved"]))
        return found

    async def hold(
        self, subject: str, kind: UsageKind, period: str, amount: int, limit: int | None
    ) -> bool:
        """Atomically add ``amount`` to the held total if it stays within ``limit``.

        One conditional UPDATE: on PostgreSQL the row lock serializes racing holders and each
        re-checks the condition on the latest row; on SQLite writers are serialized anyway.
        """
        await self.c.execute(
            self._upsert_ignore(
                usage_counters,
                {
                    "subject": subject,
                    "kind": kind.value,
                    "period": period,
                    "used": 0,
                    "reserved": 0,
                },
            )
        )
        query = usage_counters.update().where(
            usage_counters.c.subject == subject,
            usage_counters.c.kind == kind.value,
            usage_counters.c.period == period,
        )
        if limit is not None:
            query = query.where(usage_counters.c.used + usage_counters.c.reserved + amount <= limit)
        result = await self.c.execute(query.values(reserved=usage_counters.c.reserved + amount))
        return bool(result.rowcount)

    async def adjust(
        self, subject: str, kind: UsageKind, period: str, *, used: int = 0, reserved: int = 0
    ) -> None:
        await self.c.execute(
            self._upsert_ignore(
                usage_counters,
                {
                    "subject": subject,
                    "kind": kind.value,
                    "period": period,
                    "used": 0,
                    "reserved": 0,
                },
            )
        )
        await self.c.execute(
            usage_counters.update()
            .where(
                usage_counters.c.subject == subject,
                usage_counters.c.kind == kind.value,
                usage_counters.c.period == period,
            )
            .values(
                used=sa.func.greatest(usage_counters.c.used + used, 0)
                if self.c.dialect.name == "postgresql"
                else sa.func.max(usage_counters.c.used + used, 0),
                reserved=sa.func.greatest(usage_counters.c.reserved + reserved, 0)
                if self.c.dialect.name == "postgresql"
                else sa.func.max(usage_counters.c.reserved + reserved, 0),
            )
        )


def _amounts(text: str) -> dict[UsageKind, int]:
    return {UsageKind(k): int(v) for k, v in json.loads(text).items()}


def _reservation(row: Row) -> Reservation:
    m = row._mapping
    return Reservation(
        id=m["id"],
        organization_id=m["organization_id"],
        subject=m["subject"],
        amounts=_amounts(m["amounts"]),
        settled_amounts=_amounts(m["settled_amounts"]),
        reference=m["reference"],
        request_id=m["request_id"],
        period=m["period"],
        state=ReservationState(m["state"]),
        create_time=m["create_time"],
        expire_time=m["expire_time"],
        settle_time=m["settle_time"],
        end_time=m["end_time"],
    )


class Reservations(_Repo):
    async def get(self, org_id: str, reservation_id: str) -> Reservation | None:
        row = await self._one(
            sa.select(reservations).where(
                reservations.c.id == reservation_id, reservations.c.organization_id == org_id
            )
        )
        return _reservation(row) if row else None

    async def by_request(self, request_id: str) -> Reservation | None:
        row = await self._one(
            sa.select(reservations).where(reservations.c.request_id == request_id)
        )
        return _reservation(row) if row else None

    async def add(self, r: Reservation) -> None:
        await self._insert(
            reservations,
            {
                "id": r.id,
                "organization_id": r.organization_id,
                "subject": r.subject,
                "amounts": json.dumps({k.value: v for k, v in r.amounts.items()}),
                "settled_amounts": "{}",
                "reference": r.reference,
                "request_id": r.request_id,
                "period": r.period,
                "state": r.state.value,
                "create_time": r.create_time,
                "expire_time": r.expire_time,
                "settle_time": None,
                "end_time": None,
            },
        )

    async def transition(self, r: Reservation, expected: ReservationState) -> bool:
        result = await self.c.execute(
            reservations.update()
            .where(reservations.c.id == r.id, reservations.c.state == expected.value)
            .values(
                state=r.state.value,
                settled_amounts=json.dumps({k.value: v for k, v in r.settled_amounts.items()}),
                settle_time=r.settle_time,
                end_time=r.end_time,
            )
        )
        return bool(result.rowcount)

    async def expired(self, at: float, limit: int = 100) -> list[Reservation]:
        rows = await self.c.execute(
            sa.select(reservations)
            .where(
                reservations.c.state == ReservationState.RESERVED.value,
                reservations.c.expire_time <= at,
            )
            .limit(limit)
        )
        return [_reservation(r) for r in rows]

    async def record(
        self, org_id: str, principal: str, kind: UsageKind, amount: int, at: float
    ) -> None:
        await self.c.execute(
            usage_entries.insert().values(
                organization_id=org_id, principal=principal, kind=kind.value, amount=amount, time=at
            )
        )

    async def entries(
        self, org_id: str, principal: str | None, start: float, end: float
    ) -> list[tuple[str, UsageKind, int, float]]:
        query = sa.select(
            usage_entries.c.principal,
            usage_entries.c.kind,
            usage_entries.c.amount,
            usage_entries.c.time,
        ).where(
            usage_entries.c.organization_id == org_id,
            usage_entries.c.time >= start,
            usage_entries.c.time < end,
        )
        if principal is not None:
            query = query.where(usage_entries.c.principal == principal)
        rows = await self.c.execute(query.order_by(usage_entries.c.time))
        return [(r[0], UsageKind(r[1]), int(r[2]), float(r[3])) for r in rows]


# ---- audit ----


def _event(row: Row) -> AuditEvent:
    m = row._mapping
    return AuditEvent(
        seq=m["seq"],
        organization_id=m["organization_id"],
        event_time=m["event_time"],
        actor=m["actor"],
        action=m["action"],
        resource=m["resource"],
        outcome=Outcome(m["outcome"]),
        status_code=m["status_code"],
        source_ip=m["source_ip"],
        user_agent=m["user_agent"],
        request_id=m["request_id"],
        service=m["service"],
        metadata=json.loads(m["metadata"]),
        create_time=m["create_time"],
    )


class AuditLog(_Repo):
    async def append(self, events: Sequence[AuditEvent]) -> None:
        if not events:
            return
        await self.c.execute(
            audit_events.insert(),
            [
                {
                    "organization_id": e.organization_id,
                    "event_time": e.event_time,
                    "actor": e.actor[:300],
                    "action": e.action[:200],
                    "resource": e.resource[:300],
                    "outcome": e.outcome.value,
                    "status_code": e.status_code,
                    "source_ip": e.source_ip[:64],
                    "user_agent": e.user_agent[:256],
                    "request_id": e.request_id[:128],
                    "service": e.service[:32],
                    "metadata": json.dumps(e.metadata),
                    "create_time": e.create_time,
                }
                for e in events
            ],
        )

    async def claim_batch(self, request_id: str, count: int, at: float) -> bool:
        result = await self.c.execute(
            self._upsert_ignore(
                audit_batches, {"request_id": request_id, "written": count, "create_time": at}
            )
        )
        return bool(result.rowcount)

    async def list(
        self, org_id: str | None, conditions: list[Condition], desc: bool, page: Page
    ) -> tuple[list[AuditEvent], tuple[Any, Any] | None, int]:
        filters = _where(audit_events, conditions)
        if org_id is not None:
            filters.append(audit_events.c.organization_id == org_id)
        rows, last, total = await self._page(
            audit_events, filters, "event_time", desc, page, id_column="seq"
        )
        return [_event(r) for r in rows], last, total


class LoginFailures(_Repo):
    async def recent(self, scope: str, key: str, since: float) -> tuple[int, float | None]:
        """How many failures for ``key`` since ``since``, and when the first of them was."""
        query = sa.select(
            sa.func.count().label("failures"), sa.func.min(login_failures.c.time).label("oldest")
        ).where(
            login_failures.c.scope == scope,
            login_failures.c.key == key,
            login_failures.c.time > since,
        )
        row = (await self.c.execute(query)).one()._mapping
        oldest = row["oldest"]
        return int(row["failures"]), (float(oldest) if oldest is not None else None)

    async def add(self, scope: str, key: str, at: float) -> None:
        await self.c.execute(login_failures.insert().values(scope=scope, key=key[:320], time=at))

    async def clear(self, scope: str, key: str) -> None:
        await self.c.execute(
            login_failures.delete().where(
                login_failures.c.scope == scope, login_failures.c.key == key
            )
        )

    async def prune(self, before: float) -> None:
        await self.c.execute(login_failures.delete().where(login_failures.c.time <= before))


class IdentityUnitOfWork(UnitOfWork):
    organizations: Organizations
    users: Users
    service_accounts: ServiceAccounts
    api_keys: ApiKeys
    refresh_tokens: RefreshTokens
    signing_keys: SigningKeys
    idempotency: IdempotencyKeys
    quotas: Quotas
    reservations: Reservations
    audit: AuditLog
    login_failures: LoginFailures

    def _bind(self) -> None:
        c = self.connection
        self.organizations = Organizations(c)
        self.users = Users(c)
        self.service_accounts = ServiceAccounts(c)
        self.api_keys = ApiKeys(c)
        self.refresh_tokens = RefreshTokens(c)
        self.signing_keys = SigningKeys(c)
        self.idempotency = IdempotencyKeys(c)
        self.quotas = Quotas(c)
        self.reservations = Reservations(c)
        self.audit = AuditLog(c)
        self.login_failures = LoginFailures(c)
