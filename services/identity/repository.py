"""Identity's unit of work (one transaction, every repository on it) and the audit log.

The tables are in :mod:`.tables`, rows <-> domain objects in :mod:`.rows`, and the other
repositories grouped by use case: :mod:`.repo_accounts`, :mod:`.repo_credentials`,
:mod:`.repo_ledger`.
"""

from __future__ import annotations

from collections.abc import Sequence

from corral.libs.db import UnitOfWork
from corral.libs.idempotency import SqlIdempotencyStore
from corral.services.identity import rows
from corral.services.identity.domain import AuditEvent
from corral.services.identity.queries import ListQuery
from corral.services.identity.repo_accounts import ApiKeys, Organizations, ServiceAccounts, Users
from corral.services.identity.repo_credentials import LoginFailures, RefreshTokens, SigningKeys
from corral.services.identity.repo_ledger import Quotas, Reservations
from corral.services.identity.sql import DuplicateKey, Repo
from corral.services.identity.tables import audit_batches, audit_events, idempotency_keys

__all__ = ["AuditLog", "DuplicateKey", "IdentityUnitOfWork"]


class AuditLog(Repo):
    async def append(self, events: Sequence[AuditEvent]) -> None:
        if events:
            await self.c.execute(
                audit_events.insert(), [rows.audit_event_values(e) for e in events]
            )

    async def claim_batch(self, request_id: str, count: int, at: float) -> bool:
        """Record a written batch; False if this ``request_id`` was written before."""
        result = await self.c.execute(
            self._upsert_ignore(
                audit_batches, {"request_id": request_id, "written": count, "create_time": at}
            )
        )
        return bool(result.rowcount)

    async def list(self, org_id: str | None, query: ListQuery) -> tuple[list[AuditEvent], str, int]:
        filters = [] if org_id is None else [audit_events.c.organization_id == org_id]
        return await self._page(audit_events, filters, query, rows.audit_event, id_column="seq")


class IdentityUnitOfWork(UnitOfWork):
    organizations: Organizations
    users: Users
    service_accounts: ServiceAccounts
    api_keys: ApiKeys
    refresh_tokens: RefreshTokens
    signing_keys: SigningKeys
    idempotency: SqlIdempotencyStore
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
        self.idempotency = SqlIdempotencyStore(c, idempotency_keys)
        self.quotas = Quotas(c)
        self.reservations = Reservations(c)
        self.audit = AuditLog(c)
        self.login_failures = LoginFailures(c)
