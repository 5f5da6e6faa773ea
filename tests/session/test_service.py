"""The session service layer on its own (no gRPC): rules that are plainest here. The runtime,
ledger and audit log are fakes; the unit of work is the real one on SQLite."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import duration_pb2

from corral.libs import db, idempotency
from corral.libs.auth.caller import Caller
from corral.libs.errors import Aborted, FailedPrecondition, PermissionDenied
from corral.libs.eventhub import InMemoryHub
from corral.libs.listing import page_from
from corral.services.session import service as session_service
from corral.services.session.domain import BusyStrategy, TurnState
from corral.services.session.main import MIGRATIONS, wire
from corral.services.session.service import SessionService
from corral.session.v1 import agent_options_pb2 as opts
from corral.session.v1 import agent_policy_pb2, event_pb2
from tests.session.fakes import FakeAudit, FakeLedger, FakeRuntime, FakeWorkspaces

ALICE = Caller("organizations/acme/users/alice", "organizations/acme", frozenset({"user"}))
ADA = Caller("organizations/acme/users/ada", "organizations/acme", frozenset({"admin"}))
ACME = "organizations/acme"


class Parts:
    def __init__(self, service: SessionService, runtime: FakeRuntime, ledger: FakeLedger):
        self.service, self.runtime, self.ledger = service, runtime, ledger


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    engine = db.create_engine(f"sqlite+aiosqlite:///{tmp_path}/session.db")
    await db.migrate(engine, MIGRATIONS)
    hub, runtime, ledger = InMemoryHub(), FakeRuntime(), FakeLedger()
    wired = wire(
        engine,
        hub,
        runtime,
        ledger,
        FakeAudit(),
        workspaces=FakeWorkspaces(),
        heartbeat_seconds=0.3,
        lease_seconds=30,
    )
    try:
        yield Parts(wired.service, runtime, ledger)
    finally:
        await wired.service.close()
        await hub.close()
        await engine.dispose()


OPTIONS = opts.AgentOptions(
    model="claude-a",
    allowed_tools=["Read", "Bash"],
    env={"A": "1", "B": "2"},
    permission_timeout=duration_pb2.Duration(seconds=60),
)


async def _session(service: SessionService) -> str:
    session = await service.create_session(
        ALICE,
        display_name="x",
        options=OPTIONS,
        labels={"env": "dev"},
        organization="",
        request_id="",
    )
    return session.id


def _options(raw: bytes) -> opts.AgentOptions:
    return opts.AgentOptions.FromString(raw)


async def test_update_mask_changes_only_the_named_option_fields(parts: Parts) -> None:
    service = parts.service
    session_id = await _session(service)
    sent = opts.AgentOptions(model="claude-b", allowed_tools=["Write"], env={"C": "3"})

    async def update(*paths: str, etag: str = "") -> opts.AgentOptions:
        updated = await service.update_session(
            ALICE,
            session_id,
            etag=etag,
            paths=frozenset(paths),
            display_name="renamed",
            labels={},
            options=sent,
        )
        return _options(updated.agent_options)

    merged = await update("agent_options.allowed_tools", "agent_options.env")
    assert merged.model == "claude-a"  # not named: kept
    assert list(merged.allowed_tools) == ["Write"]  # lists replaced, not appended
    assert dict(merged.env) == {"C": "3"}  # maps too
    assert merged.permission_timeout.seconds == 60

    same = await service.get_session(ALICE, session_id)
    assert same.display_name == "x" and same.labels == {"env": "dev"}  # not in the mask

    assert await update("agent_options") == sent  # the whole options replaced
    current = await service.get_session(ALICE, session_id)
    await update("display_name", etag=current.etag)
    with pytest.raises(Aborted) as stale:
        await update("display_name", etag=current.etag)
    assert stale.value.reason == "ETAG_MISMATCH"


async def test_policy_update_replaces_only_the_named_fields(parts: Parts) -> None:
    service = parts.service
    servers = [opts.McpServer(name="search", http=opts.McpHttpTransport(url="https://s.example"))]
    rules = [opts.PermissionRule(tool_pattern="Bash", action=opts.PermissionRule.ACTION_ASK)]
    sent = agent_policy_pb2.AgentPolicy(mcp_servers=servers, permission_rules=rules)

    async def update(*paths: str, etag: str = "") -> agent_policy_pb2.AgentPolicy:
        record = await service.update_policy(
            ADA, ACME, etag=etag, paths=frozenset(paths), sent=sent
        )
        return agent_policy_pb2.AgentPolicy.FromString(record.payload)

    only_rules = await update("permission_rules")
    assert list(only_rules.permission_rules) == rules and list(only_rules.mcp_servers) == []
    del sent.permission_rules[:]
    both = await update("mcp_servers")
    assert list(both.mcp_servers) == servers
    assert list(both.permission_rules) == rules  # not named: kept
    cleared = await update("mcp_servers", "permission_rules")
    assert list(cleared.permission_rules) == [] and list(cleared.mcp_servers) == servers

    with pytest.raises(PermissionDenied):
        await service.update_policy(ALICE, ACME, etag="", paths=frozenset(), sent=sent)
    with pytest.raises(Aborted):
        await update("mcp_servers", etag="0123456789abcdef")


async def test_busy_strategies_reject_enqueue_or_interrupt(parts: Parts) -> None:
    service, runtime, ledger = parts.service, parts.runtime, parts.ledger
    session_id = await _session(service)

    async def send(text: str, strategy: BusyStrategy) -> str:
        turn = await service.send_message(
            ALICE, session_id, text=text, request_id="", strategy=strategy
        )
        return turn.id

    first = await send("first", BusyStrategy.REJECT)
    running = await runtime.next_turn()
    with pytest.raises(FailedPrecondition) as busy:
        await send("refused", BusyStrategy.REJECT)
    assert busy.value.reason == "SESSION_BUSY"
    assert busy.value.metadata["turn"].endswith(f"/turns/{first}")
    assert len(ledger.held) == 1  # a refused turn reserves nothing

    queued = await send("queued", BusyStrategy.ENQUEUE)
    assert (await service.get_turn(ALICE, session_id, queued)).state == TurnState.QUEUED

    third = await send("third", BusyStrategy.INTERRUPT)
    assert runtime.interrupted == [running.id]  # the running turn is stopped...
    dropped = await service.get_turn(ALICE, session_id, queued)
    assert dropped.state == TurnState.FINISHED  # ...and the queued one dropped unrun
    result = event_pb2.TurnResult.FromString(dropped.result)
    assert result.status == event_pb2.TurnResult.STATUS_INTERRUPTED
    assert (await runtime.next_turn()).id == third
    assert [t.request.prompt for t in runtime.turns] == ["first", "third"]


async def test_concurrent_twins_create_one_session(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests with one request_id, both past the replay check before either creates:
    the second loses on the idempotency key and answers with the first one's session."""
    service = parts.service
    looked = 0
    both_looked = asyncio.Event()
    replay = idempotency.replay

    async def replay_together(*args: Any, **kwargs: Any) -> str | None:
        nonlocal looked
        found = await replay(*args, **kwargs)
        looked += 1
        if looked == 2:
            both_looked.set()
        if looked <= 2:
            await both_looked.wait()
        return found

    monkeypatch.setattr(idempotency, "replay", replay_together)

    async def create() -> str:
        session = await service.create_session(
            ALICE,
            display_name="twin",
            options=OPTIONS,
            labels={},
            organization="",
            request_id="r-1",
        )
        return session.name

    first, second = await asyncio.gather(create(), create())
    assert first == second and looked == 3  # the loser looked again
    listed, _, total = await service.list_sessions(
        ALICE, [], order="create_time", descending=False, page=page_from(0, "", "q")
    )
    assert total == 1 and [s.name for s in listed] == [first]


async def test_request_ids_past_their_retention_are_purged(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The maintenance job forgets request ids past their retention: the same id may then carry
    another request (here the retention is made zero instead of waiting a day)."""
    service = parts.service

    async def create(name: str) -> str:
        session = await service.create_session(
            ALICE, display_name=name, options=OPTIONS, labels={}, organization="", request_id="r-9"
        )
        return session.name

    first = await create("one")
    assert await service.purge_request_ids() == 0  # within its retention: kept
    monkeypatch.setattr(session_service, "RETENTION_SECONDS", -60)
    assert await service.purge_request_ids() == 1
    assert await create("two") != first  # no REQUEST_ID_REUSED: the id was forgotten


async def test_a_running_turn_holds_its_cap_and_less_when_less_is_left(
    parts: Parts,
) -> None:
    """The budget hold on the service layer: a turn holds its cap while it runs; with less of
    the budget left, it holds (and the runtime is told) what is left; the hold is given back."""
    service, runtime, ledger = parts.service, parts.runtime, parts.ledger
    ledger.budget = 300_000
    capped = opts.AgentOptions(max_budget_usd_micros=500_000)
    session = await service.create_session(
        ALICE, display_name="b", options=capped, labels={}, organization="", request_id=""
    )
    await service.send_message(
        ALICE, session.id, text="go", request_id="", strategy=BusyStrategy.ENQUEUE
    )
    turn = await runtime.next_turn()
    assert turn.request.options.max_budget_usd_micros == 300_000  # what was left, not 500,000
    assert list(ledger.budget_holds.values()) == [300_000]
    turn.finish()
    await ledger.wait(lambda: not ledger.budget_holds)  # given back just after the settle
    assert len(ledger.settled) == 1
