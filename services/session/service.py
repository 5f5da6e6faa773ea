"""The session use cases: sessions, turns, permissions, the organisation's agent policy.

One async method per use case, in Python terms (no protobuf requests, no gRPC). The event log
(:mod:`.event_log`) makes every change durable and visible in order; the turn runner
(:mod:`.runner`) drives accepted turns through the runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import datetime

from corral.libs import audit
from corral.libs.audit import Audit, AuditWriter
from corral.libs.auth.caller import Caller
from corral.libs.config import Settings
from corral.libs.crypto import KeyRing
from corral.libs.errors import (
    CorralError,
    FailedPrecondition,
    PermissionDenied,
)
from corral.libs.etags import check_etag, mismatch
from corral.libs.eventhub import EventHub
from corral.libs.idempotency import RETENTION_SECONDS, CreateRequest
from corral.libs.listing import Condition, Page, finish_page
from corral.libs.names import new_id
from corral.libs.outbox import Outbox
from corral.services.session import domain, policy, usage
from corral.services.session.domain import (
    SESSION,
    AgentPolicyRecord,
    Session,
    SessionState,
    StoredEvent,
    now,
)
from corral.services.session.event_log import EventFilter, EventLog, state_event
from corral.services.session.idempotent import once
from corral.services.session.leases import UNFINISHED
from corral.services.session.metrics import SessionMetrics, for_meter
from corral.services.session.options import options_with
from corral.services.session.ports import (
    Runtime,
    UnitOfWork,
    UsageLedger,
    WorkspaceStore,
)
from corral.services.session.runner import TurnRunner
from corral.services.session.secrets import Secrets, UnsealingRuntime
from corral.services.session.turns import TurnUseCases
from corral.services.session.workspace import Workspaces
from corral.session.v1 import agent_options_pb2, agent_policy_pb2

log = logging.getLogger("corral.session")

OUTBOX_SETTLE_SECONDS = 2.0


class SessionService(TurnUseCases):
    def __init__(
        self,
        uow: Callable[[], UnitOfWork],
        hub: EventHub,
        runtime: Runtime,
        ledger: UsageLedger,
        audit_writer: AuditWriter,
        *,
        workspaces: WorkspaceStore,
        heartbeat_seconds: float = 15.0,
        lease_seconds: float = 30.0,
        clock: Callable[[], datetime] = now,
        key_ring: KeyRing | None = None,
        metrics: SessionMetrics | None = None,
        default_turn_budget_usd_micros: int = 1_000_000,
        instance: str = "",
    ) -> None:
        """``key_ring`` seals MCP secrets at rest (the deployment's, from Settings, if not
        given); ``audit_writer`` is identity's audit log and ``ledger`` its usage ledger, both
        written through the outbox; ``workspaces``: the storage service's (a session's is made
        with it, copied with a fork and deleted with it, through the outbox); ``metrics``: the
        process's session instruments if not given; ``instance``: this process's name on the
        turns it runs (see TurnRunner)."""
        self.metrics = metrics or for_meter()
        self._uow = uow
        self._runtime = runtime
        self._ledger = ledger
        self.secrets = Secrets(key_ring or Settings().key_ring())
        self.outbox = Outbox(uow, clock=clock)
        self.outbox.handle(audit.AUDIT, audit.deliver(audit_writer))
        self.outbox.handle(usage.USAGE, usage.deliver(ledger))
        self.workspaces = Workspaces(workspaces, self.outbox)
        self.audit = Audit(self.outbox, clock=clock)
        self.events = EventLog(uow, hub, heartbeat_seconds=heartbeat_seconds, metrics=self.metrics)
        self.runner = TurnRunner(
            uow,
            self.events,
            UnsealingRuntime(runtime, self.secrets),  # secrets open here, for a turn only
            ledger,
            self.outbox,
            instance=instance,
            lease_seconds=lease_seconds,
            clock=clock,
            metrics=self.metrics,
            default_turn_budget_usd_micros=default_turn_budget_usd_micros,
        )

    async def recover(self) -> None:
        await self.runner.recover()

    async def maintain(self) -> None:
        """The background jobs: the orphaned-turn sweep, the outbox's retries (audit entries,
        turns' usage), and forgetting request ids past their retention (hourly)."""
        await asyncio.gather(self.runner.maintain(), self.outbox.run(), self._purge_requests())

    async def _purge_requests(self) -> None:
        while True:
            await self.purge_request_ids()
            await asyncio.sleep(3600)

    async def purge_request_ids(self) -> int:
        """Forget request ids older than their 24 h retention; returns how many."""
        try:
            async with self._uow() as uow:
                purged = await uow.idempotency.purge(time.time() - RETENTION_SECONDS)
                await uow.commit()
        except Exception:
            log.exception("purging old request ids failed")
            return 0
        return purged

    async def drain(self) -> None:
        """The server is stopping: open event streams end UNAVAILABLE (STREAM_RESTART), so
        their clients reconnect to another replica with the last sequence they received."""
        await self.events.drain()

    async def close(self, *, graceful: bool = True) -> None:
        """Stop: turns running here are interrupted and ended (``graceful``; else left to
        their leases, as a crash would), then the outbox's attempts in flight get a moment."""
        if graceful:
            await self.events.drain()
        await self.runner.close(graceful=graceful)
        if graceful:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.outbox.settle(), OUTBOX_SETTLE_SECONDS)
        await self.outbox.close()

    async def _policy(self, organization: str) -> agent_policy_pb2.AgentPolicy | None:
        async with self._uow() as uow:
            stored = await uow.policies.get(organization)
        return policy.parsed(stored.payload if stored else None)

    # -- sessions ------------------------------------------------------------------------------

    async def create_session(
        self,
        caller: Caller,
        *,
        display_name: str,
        options: agent_options_pb2.AgentOptions,
        labels: dict[str, str],
        organization: str,
        request_id: str,
    ) -> Session:
        if not domain.can_create(caller):
            raise PermissionDenied("viewers cannot create sessions", reason="ROLE_READ_ONLY")
        org = organization if (organization and caller.is_superuser) else caller.organization

        async def create(request: CreateRequest) -> Session:
            policy.check_options(options, await self._policy(org), "session.agent_options")
            session = self._new_session(caller, org, display_name, options, labels)
            session.agent_options = self.secrets.seal_session(
                options, session.name
            ).SerializeToString()
            entry = self.audit.entry(caller, "session.create", session.name, organization=org)
            async with self.workspaces.created(session), self._uow() as uow:
                await uow.sessions.add(session)
                await request.remember(uow.idempotency, session.name, time.time())
                await self.audit.add(uow, entry)
                await uow.commit()
            self.audit.send(entry, token=caller.token)
            self.metrics.sessions_created.add(1)
            log.info("session created", extra={"session": session.name, "owner": caller.subject})
            return session

        payload = {
            "display_name": display_name,
            "options": options,
            "labels": labels,
            "organization": organization,
        }
        return await once(
            self._uow,
            caller,
            "CreateSession",
            request_id,
            payload,
            create,
            self._session_named(caller),
        )

    @staticmethod
    def _new_session(
        caller: Caller,
        organization: str,
        display_name: str,
        options: agent_options_pb2.AgentOptions,
        labels: dict[str, str],
    ) -> Session:
        session_id = new_id()
        stamp = now()
        return Session(
            id=session_id,
            organization=organization,
            owner=caller.subject,
            display_name=display_name or "Untitled session",
            agent_options=options.SerializeToString(),
            labels=labels,
            create_time=stamp,
            update_time=stamp,
            workspace=f"workspaces/{session_id}",
        )

    def _session_named(self, caller: Caller) -> Callable[[str], Awaitable[Session]]:
        async def read(name: str) -> Session:
            (session_id,) = SESSION.parse_field(name, "name")
            return await self.get_session(caller, session_id)

        return read

    async def get_session(self, caller: Caller, session_id: str) -> Session:
        async with self._uow() as uow:
            return domain.authorize_read(
                caller, await uow.sessions.get(session_id), SESSION.format(session_id)
            )

    async def pending_permissions(self, session_id: str) -> list[bytes]:
        async with self._uow() as uow:
            return [payload for _, _, payload in await uow.permissions.pending(session_id)]

    async def list_sessions(
        self,
        caller: Caller,
        conditions: Sequence[Condition],
        *,
        order: str,
        descending: bool,
        page: Page,
    ) -> tuple[list[Session], str, int]:
        """Sessions the caller may see (own; the organisation's for admins and viewers; all
        for superusers), newest activity first by default. Returns (page, next token, total)."""
        scoped = list(conditions)
        if not caller.is_superuser:
            scoped.append(Condition("organization", "=", caller.organization))
            if not caller.has_role("admin", "viewer"):
                scoped.append(Condition("owner", "=", caller.subject))
        async with self._uow() as uow:
            rows = await uow.sessions.list(scoped, order=order, descending=descending, page=page)
            total = await uow.sessions.count(scoped)
        kept, token = finish_page(rows, page, lambda s: (getattr(s, order), s.id))
        return kept, token, total

    async def update_session(
        self,
        caller: Caller,
        session_id: str,
        *,
        etag: str,
        paths: frozenset[str],
        display_name: str,
        labels: dict[str, str],
        options: agent_options_pb2.AgentOptions,
    ) -> Session:
        """Change the fields ``paths`` names (``display_name``, ``labels``, ``agent_options``
        or ``agent_options.<field>``: only those fields of the options, lists replaced)."""
        top = {p.split(".", 1)[0] for p in paths}
        name = SESSION.format(session_id)
        async with self._uow() as uow:
            session = domain.authorize_write(
                caller,
                await uow.sessions.get(session_id, for_update=True),
                SESSION.format(session_id),
            )
            session.require_active()
            check_etag(etag, session.etag, "session")
            if "display_name" in top:
                session.display_name = display_name
            if "labels" in top:
                session.labels = labels
            if "agent_options" in top:
                merged = options_with(
                    self.secrets.seal_session(
                        agent_options_pb2.AgentOptions.FromString(session.agent_options),
                        name,
                        only_plain=True,  # a legacy value stored in the clear is sealed now
                    ),
                    self.secrets.seal_session(options, name),
                    paths,
                )
                stored = await uow.policies.get(session.organization)
                policy.check_options(
                    merged,
                    policy.parsed(stored.payload if stored else None),
                    "session.agent_options",
                )
                session.agent_options = merged.SerializeToString()
            session.version += 1
            session.update_time = now()
            await uow.sessions.save(session)
            entry = self.audit.entry(
                caller,
                "session.update",
                name,
                {"update_mask": ",".join(sorted(paths))[:1024]},
                organization=session.organization,
            )
            await self.audit.add(uow, entry)
            await uow.commit()
        self.audit.send(entry, token=caller.token)
        return session

    async def archive_session(self, caller: Caller, session_id: str, *, etag: str) -> Session:
        name = SESSION.format(session_id)
        async with self._uow() as uow:
            session = domain.authorize_write(caller, await uow.sessions.get(session_id), name)
        check_etag(etag, session.etag, "session")
        if session.busy:
            raise FailedPrecondition("interrupt the running turn first", reason="SESSION_BUSY")
        previous = session.move_to(SessionState.ARCHIVED)
        entry = self.audit.entry(caller, "session.archive", name, organization=session.organization)

        async def mutate(uow: UnitOfWork, _: int) -> None:
            current = await uow.sessions.get(session_id, for_update=True)
            if current is None or current.version != session.version:
                raise mismatch("session")
            session.archive_time = session.update_time = now()
            session.version += 1
            await uow.sessions.save(session)
            await self.audit.add(uow, entry)

        await self.events.append(
            session_id, "", [state_event(SessionState.ARCHIVED, previous)], mutate
        )
        self.audit.send(entry, token=caller.token)
        with contextlib.suppress(CorralError):
            await self._runtime.release(name, delete_transcript=False, token=caller.token)
        return session

    async def delete_session(
        self, caller: Caller, session_id: str, *, etag: str, force: bool
    ) -> None:
        name = SESSION.format(session_id)
        async with self._uow() as uow:
            session = domain.authorize_write(caller, await uow.sessions.get(session_id), name)
        check_etag(etag, session.etag, "session")
        if session.busy and not force:
            raise FailedPrecondition(
                "the session has a running turn; pass force", reason="SESSION_BUSY"
            )
        await self.runner.stop(session_id)
        with contextlib.suppress(CorralError):
            await self._runtime.release(name, delete_transcript=True, token=caller.token)
        entry = self.audit.entry(
            caller,
            "session.delete",
            name,
            {"force": str(force).lower()},
            organization=session.organization,
        )
        files = self.workspaces.deletion(session)  # storage's, now or once it answers
        async with self._uow() as uow:
            # What its unfinished turns hold is given back through the outbox.
            held = [
                usage.usage_item(session.organization, t.reservation, None, [t.budget_hold])
                for t in await uow.turns.in_state(session_id, *UNFINISHED)
                if t.reservation or t.budget_hold
            ]
            for item in [*held, *([files] if files else [])]:
                await self.outbox.add(uow, item)
            await uow.sessions.delete(session_id)
            await self.audit.add(uow, entry)
            await uow.commit()
        for item in held:
            self.outbox.send(item, token=caller.token)
        self.events.forget(session_id)
        self.audit.send(entry, token=caller.token)
        await self.workspaces.delete_now(files)

    async def fork_session(
        self, caller: Caller, session_id: str, *, display_name: str, request_id: str
    ) -> Session:
        """A new idle session of the caller's that resumes the parent's conversation, with a
        copy of the parent's workspace."""
        if not domain.can_create(caller):
            raise PermissionDenied("viewers cannot create sessions", reason="ROLE_READ_ONLY")

        async def create(request: CreateRequest) -> Session:
            parent = await self.get_session(caller, session_id)
            if not parent.transcript_id:
                raise FailedPrecondition(
                    "the session has no conversation to fork yet", reason="NOTHING_TO_FORK"
                )
            child = self._new_session(
                caller,
                parent.organization,
                display_name or f"{parent.display_name} (fork)",
                agent_options_pb2.AgentOptions(),
                dict(parent.labels),
            )
            child.agent_options = self.secrets.reseal_session(
                agent_options_pb2.AgentOptions.FromString(parent.agent_options),
                parent.name,
                child.name,
            ).SerializeToString()
            child.parent_session = parent.name
            child.fork_sequence = parent.last_sequence
            child.transcript_id = parent.transcript_id
            entry = self.audit.entry(
                caller,
                "session.fork",
                child.name,
                {"parent_session": parent.name},
                organization=parent.organization,
            )
            async with self.workspaces.copied(parent, child), self._uow() as uow:
                await uow.sessions.add(child)
                await request.remember(uow.idempotency, child.name, time.time())
                await self.audit.add(uow, entry)
                await uow.commit()
            self.audit.send(entry, token=caller.token)
            self.metrics.sessions_created.add(1)
            return child

        payload = {"parent": session_id, "display_name": display_name}
        return await once(
            self._uow,
            caller,
            "ForkSession",
            request_id,
            payload,
            create,
            self._session_named(caller),
        )

    # -- organisation policy -------------------------------------------------------------------

    async def get_policy(self, caller: Caller, organization: str) -> AgentPolicyRecord:
        domain.authorize_policy(caller, organization, write=False)
        async with self._uow() as uow:
            policy = await uow.policies.get(organization)
        return policy or AgentPolicyRecord(organization, b"", 0, now())

    async def update_policy(
        self,
        caller: Caller,
        organization: str,
        *,
        etag: str,
        paths: frozenset[str],
        sent: agent_policy_pb2.AgentPolicy,
    ) -> AgentPolicyRecord:
        """Replace the policy's fields ``paths`` names (see :data:`.policy.FIELDS`) with
        ``sent``'s; the others stay. Secrets of the servers sent are sealed."""
        domain.authorize_policy(caller, organization, write=True)
        sealed = agent_policy_pb2.AgentPolicy()
        sealed.CopyFrom(sent)
        self.secrets.seal_policy(sealed, organization)
        async with self._uow() as uow:
            stored = await uow.policies.get(organization)
            record = stored or AgentPolicyRecord(organization, b"", 0, now())
            check_etag(etag, record.etag, "policy")
            message = agent_policy_pb2.AgentPolicy.FromString(record.payload)
            policy.apply(message, sealed, paths)
            record.payload = message.SerializeToString()
            record.version += 1
            record.update_time = now()
            await uow.policies.save(record)
            entry = self.audit.entry(
                caller,
                "agent_policy.update",
                record.name,
                {"update_mask": ",".join(sorted(paths))[:1024]},
                organization=organization,
            )
            await self.audit.add(uow, entry)
            await uow.commit()
        self.audit.send(entry, token=caller.token)
        return record

    # -- history and the live stream -----------------------------------------------------------

    async def list_events(
        self,
        caller: Caller,
        session_id: str,
        *,
        after: int,
        event_filter: EventFilter,
        page: Page,
    ) -> tuple[list[StoredEvent], str, int]:
        """One page of history after ``after`` (or the page token's position): (events,
        next page token, the session's last sequence)."""
        await self.get_session(caller, session_id)
        async with self._uow() as uow:
            rows = await uow.events.page(
                session_id,
                after=after,
                types=event_filter.types,
                turn_id=event_filter.turn_id,
                page=page,
            )
            last = await uow.events.last_sequence(session_id)
        kept, token = finish_page(rows, page, lambda e: (e.sequence, e.sequence))
        return kept, token, last

    async def watch(
        self, caller: Caller, session_id: str, *, after: int, event_filter: EventFilter
    ) -> AsyncIterator[tuple[int, bytes]]:
        """The session's events after ``after``, then live ones (see :meth:`EventLog.watch`)."""
        session = await self.get_session(caller, session_id)
        async for item in self.events.watch(
            session_id,
            archived=session.state == SessionState.ARCHIVED,
            after=after,
            event_filter=event_filter,
        ):
            yield item
