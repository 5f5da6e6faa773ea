"""What identity's use-case modules share: who is calling (:class:`Context`), the one audit-event
helper, ``NOT_FOUND`` for a missing resource, and idempotent creates by ``request_id``.

Each use-case module (:mod:`.accounts`, :mod:`.service_accounts`, :mod:`.signing`,
:mod:`.authentication`, :mod:`.ledger`, :mod:`.audit`) subclasses :class:`UseCases`; every use
case is one async method that owns its unit of work.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from corral.libs.errors import AlreadyExists, NotFound, Unauthenticated
from corral.libs.idempotency import CreateRequest, create_once
from corral.libs.names import ResourcePattern
from corral.services.identity.domain import AuditEvent, Outcome, Principal, Role
from corral.services.identity.metrics import for_meter
from corral.services.identity.repository import IdentityUnitOfWork
from corral.services.identity.revocations import NO_FEED, RevocationFeed

T = TypeVar("T")
Clock = Callable[[], float]
UnitOfWorkFactory = Callable[[], IdentityUnitOfWork]

PLATFORM = "-"  # the "organization" of events that belong to none (key rotation, unknown emails)
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
class ListResult(Generic[T]):
    items: list[T]
    next_page_token: str
    total_size: int


def found(value: T | None, name: str) -> T:
    """``value``, or NOT_FOUND naming the resource that does not exist."""
    if value is None:
        raise NotFound(f"{name} was not found", reason="NOT_FOUND")
    return value


class UseCases:
    def __init__(
        self,
        uow: UnitOfWorkFactory,
        config: Config,
        clock: Clock,
        revocations: RevocationFeed = NO_FEED,
    ) -> None:
        self._uow = uow
        self.config = config
        self._clock = clock
        # Changes that void tokens publish there after they commit (every service refuses
        # the tokens within seconds).
        self._revocations = revocations
        self.metrics = for_meter()  # the process's; IdentityService may give another

    async def _revoke(self, kind: str, ident: str) -> None:
        """After the change committed: tokens whose ``kind`` claim is ``ident`` issued until
        now are void everywhere (now, not the change's start: a token a concurrent call issued
        before the commit is covered too). Never fails the use case."""
        result = await self._revocations.publish(kind, ident, self._clock())
        self.metrics.revocations.add(1, {"kind": kind, "outcome": result})

    # ---- the audit log ----

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
        """One of identity's own audit events (``identity.<action>``), by ``ctx``'s caller
        unless ``actor`` says otherwise."""
        at = self._clock()
        return AuditEvent(
            organization_id=org_id,
            actor=actor or (ctx.principal.subject if ctx.principal else "anonymous"),
            action=f"identity.{action}",
            resource=resource,
            outcome=outcome,
            status_code=status_code,
            source_ip=ctx.source_ip,
            user_agent=ctx.user_agent[:256],
            request_id=ctx.request_id,
            metadata=dict(metadata),
            event_time=at,
            create_time=at,
        )

    async def _audit(
        self, uow: IdentityUnitOfWork, ctx: Context, org_id: str, action: str, *args: Any, **kw: Any
    ) -> None:
        """Record an event in ``uow``'s transaction (it commits with the change it tells of)."""
        await uow.audit.append([self._event(ctx, org_id, action, *args, **kw)])

    async def _audit_update(
        self,
        uow: IdentityUnitOfWork,
        ctx: Context,
        org_id: str,
        collection: str,
        name: str,
        changes: Iterable[str],
        roles: tuple[Role, Role],
    ) -> None:
        """``<collection>.update`` naming the changed fields, and ``<collection>.role_change``
        when ``roles`` (before, after) differ."""
        await self._audit(uow, ctx, org_id, f"{collection}.update", name, fields=",".join(changes))
        old, new = roles
        if new is not old:
            await self._audit(
                uow,
                ctx,
                org_id,
                f"{collection}.role_change",
                name,
                old_role=old.value,
                new_role=new.value,
            )

    async def _audit_apart(
        self, ctx: Context, org_id: str, action: str, *args: Any, **kw: Any
    ) -> None:
        """Record an event in its own transaction (for refusals, whose main one rolls back)."""
        async with self._uow() as uow:
            await self._audit(uow, ctx, org_id, action, *args, **kw)
            await uow.commit()

    # ---- idempotent creates (AIP-155, the shared kit's mechanism) ----

    async def _replayed(self, request: CreateRequest) -> str | None:
        """The name of what an earlier identical request created, if there was one."""
        if not request.request_id:
            return None
        async with self._uow() as uow:
            return await request.earlier(uow.idempotency, now=self._clock())

    def _reread(
        self, pattern: ResourcePattern, get: Callable[..., Awaitable[T]]
    ) -> Callable[[str], Awaitable[T]]:
        """A replay that reads the created resource again: ``get(uow, *ids of its name)``."""

        async def replay(name: str) -> T:
            async with self._uow() as uow:
                return await get(uow, *pattern.parse_field(name, "name"))

        return replay

    async def _create_once(
        self,
        ctx: Context,
        method: str,
        request_id: str,
        payload: Any,
        create: Callable[[CreateRequest], Awaitable[T]],
        replay: Callable[[str], Awaitable[T]],
    ) -> T:
        """``create(request)`` unless an earlier request by this caller with this
        ``request_id`` did: then ``replay(name)`` answers as that one did (the kit's
        :func:`~corral.libs.idempotency.create_once`; a twin that wins the race on the
        resource's own unique key counts as a race too). ``create`` records its result with
        ``request.remember(uow.idempotency, name, at)`` in the transaction that creates it."""
        request = CreateRequest.of(method, ctx.require().subject, request_id, payload)
        return await create_once(request, self._replayed, create, replay, races=(AlreadyExists,))
