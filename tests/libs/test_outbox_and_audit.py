"""The kit's outbox and audit, on a service of the test's own: any unit of work with an
``outbox`` store will do (session and storage each bring theirs). Real SQLite and PostgreSQL.

Also the list and request helpers session and storage share: labels in filters (matched in
SQL), update masks, names into a validator."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2
from sqlalchemy.ext.asyncio import AsyncEngine

from corral.libs import db, keyset, listing
from corral.libs.audit import AUDIT, ORIGIN, Audit, AuditEntry, CallOrigins, deliver
from corral.libs.auth.caller import Caller
from corral.libs.errors import InvalidArgument, NotFound, Unavailable, Validator
from corral.libs.names import ResourcePattern, ids_of
from corral.libs.outbox import Outbox, OutboxRecords, backoff, outbox_table
from corral.libs.ratelimit import trusted_networks
from corral.libs.validation import check_update_mask

metadata = sa.MetaData()
outbox = outbox_table(metadata)
things = sa.Table(
    "things",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("labels", sa.Text, nullable=False),  # sorted JSON, as every service keeps them
)


class ThingsUnitOfWork(db.UnitOfWork):
    """A service's unit of work: its own tables, and an outbox on its own ``outbox`` table."""

    outbox: OutboxRecords

    def _bind(self) -> None:
        self.outbox = OutboxRecords(self.connection, outbox)


@pytest.fixture
async def engine(database_url: tuple[str, str]) -> AsyncIterator[AsyncEngine]:
    url, schema = database_url
    made = db.create_engine(url, schema=None if url.startswith("sqlite") else schema)
    async with made.begin() as connection:
        if not url.startswith("sqlite"):
            await connection.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    async with made.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield made
    await made.dispose()


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2025, 6, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


class Writer:
    """The other service: refuses (or is down) until told otherwise; remembers what it took."""

    def __init__(self) -> None:
        self.failure: Exception | None = Unavailable("down", reason="DOWN")
        self.taken: list[AuditEntry] = []

    async def write(self, entry: AuditEntry, *, token: str) -> None:
        if self.failure is not None:
            raise self.failure
        self.taken.append(entry)


async def rows(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as connection:
        return list(await connection.execute(sa.select(outbox)))


async def test_an_item_kept_with_the_change_is_retried_with_backoff_until_delivered_once(
    engine: AsyncEngine,
) -> None:
    clock, writer = Clock(), Writer()
    box = Outbox(lambda: ThingsUnitOfWork(engine), clock=clock)
    box.handle(AUDIT, deliver(writer))
    audit = Audit(box, clock=clock)
    caller = Caller(subject="organizations/acme/users/u1", organization="organizations/acme")
    entry = audit.entry(caller, "things.create", "things/t1", {"size": "1"})

    async with ThingsUnitOfWork(engine) as uow:
        await uow.connection.execute(things.insert().values(id="t1", labels="{}"))
        await audit.add(uow, entry)  # with the change, in its transaction
        await uow.commit()
    audit.send(entry, token="")  # one attempt at once, in the background
    await box.settle()
    [row] = await rows(engine)
    assert row.attempts == 1 and "down" in row.last_error

    assert await box.drain() == 0  # not due: the backoff has not passed
    clock.now += backoff(1)
    assert await box.drain() == 0  # due, tried, still down
    [row] = await rows(engine)
    assert row.attempts == 2
    writer.failure = None
    clock.now += backoff(2)
    async with ThingsUnitOfWork(engine) as uow:
        [(item, _)] = await uow.outbox.due(clock(), 10)
    assert await box.deliver(item, token="")  # an attempt the caller waits for
    assert await box.drain() == 0
    assert await rows(engine) == [] and await box.drain() == 0
    [taken] = writer.taken
    assert (taken.id, taken.action, taken.metadata) == (entry.id, "things.create", {"size": "1"})
    assert taken.event_time == entry.event_time and taken.attempts == 2
    assert len(writer.taken) == 1


async def test_a_refusal_for_good_is_dropped_and_one_replica_claims_an_item(
    engine: AsyncEngine,
) -> None:
    clock, writer = Clock(), Writer()
    replicas = [Outbox(lambda: ThingsUnitOfWork(engine), clock=clock) for _ in range(2)]
    for replica in replicas:
        replica.handle(AUDIT, deliver(writer))
    audit = Audit(replicas[0], clock=clock)
    caller = Caller(subject="organizations/acme/users/u1", organization="organizations/acme")
    await audit.record(audit.entry(caller, "things.delete", "things/t1"), token="")
    await replicas[0].settle()  # the immediate attempt failed: the item waits
    clock.now += timedelta(minutes=10)
    async with ThingsUnitOfWork(engine) as uow:
        [(item, seen)] = await uow.outbox.due(clock(), 10)
        assert await uow.outbox.claim(item.id, seen, clock() + timedelta(seconds=60))
        await uow.commit()
    assert await replicas[1].drain() == 0  # claimed by another replica: left alone
    assert len(await rows(engine)) == 1

    writer.failure = NotFound("no such organization")
    clock.now += timedelta(minutes=2)
    assert await replicas[1].drain() == 1  # done with: dropped
    assert await rows(engine) == [] and writer.taken == []  # dropped, not retried


def test_the_origin_of_a_call_goes_into_its_audit_entries() -> None:
    class Context:
        def invocation_metadata(self) -> list[tuple[str, str]]:
            return [("x-forwarded-for", "203.0.113.9"), ("user-agent", "cli/1.0" + "x" * 300)]

        def trailing_metadata(self) -> list[tuple[str, str]]:
            return [("x-request-id", "req-7")]  # the id the kit gave the call

        def peer(self) -> str:
            return "ipv4:10.0.0.5:4711"

    def no_database() -> ThingsUnitOfWork:
        raise AssertionError("an entry is made without the database")

    caller = Caller(subject="organizations/acme/users/u1", organization="organizations/acme")
    audit = Audit(Outbox(no_database))
    token = ORIGIN.set(None)
    try:
        CallOrigins(trusted_networks(["10.0.0.0/8"])).capture(Context())
        entry = audit.entry(caller, "things.update", "things/t1")
        assert (entry.request_id, entry.source_ip) == ("req-7", "203.0.113.9")
        assert entry.user_agent.startswith("cli/1.0") and len(entry.user_agent) == 256
        CallOrigins(trusted_networks([])).capture(Context())  # the peer names no one
        assert audit.entry(caller, "things.update", "things/t1").source_ip == "10.0.0.5"
    finally:
        ORIGIN.reset(token)


async def test_labels_in_a_filter_match_exact_pairs_in_sql(engine: AsyncEngine) -> None:
    stored = {"a": {"team": "x_1"}, "b": {"team": "x%1"}, "c": {"team": "xy1", "tier": "gold"}}
    async with engine.begin() as connection:
        await connection.execute(
            things.insert(),
            [{"id": k, "labels": json.dumps(v, sort_keys=True)} for k, v in stored.items()],
        )
    fields = listing.LabelledFields({"id": listing.FieldSpec("id")})

    async def ids(text: str) -> list[str]:
        conditions = listing.parse_filter(text, fields)
        clauses = keyset.where(things, conditions, keyset.label_condition(things))
        async with engine.connect() as connection:
            found = await connection.execute(
                sa.select(things.c.id).where(*clauses).order_by(things.c.id)
            )
            return [row[0] for row in found]

    assert await ids('labels.team = "x_1"') == ["a"]  # '_' and '%' are literal
    assert await ids('labels.team = "x%1"') == ["b"]
    assert await ids("labels.team != xy1") == ["a", "b"]
    assert await ids("labels.tier = gold AND id = c") == ["c"]
    with pytest.raises(InvalidArgument, match=r"labels\.<key>"):
        listing.parse_filter("colour = red", fields)


def test_update_masks_and_names_report_every_bad_field() -> None:
    allowed = frozenset({"labels", "options"})
    check = Validator()
    paths = check_update_mask(field_mask_pb2.FieldMask(paths=["*"]), allowed, check)
    assert paths == allowed and not check.violations
    check_update_mask(field_mask_pb2.FieldMask(paths=["options.model"]), allowed, check)
    check_update_mask(field_mask_pb2.FieldMask(paths=[]), allowed, check)
    assert ids_of(ResourcePattern("things/{thing}"), "widgets/1", "name", check) == ("",)
    assert [v.field for v in check.violations] == ["update_mask", "update_mask", "name"]
    check = Validator()
    check_update_mask(
        field_mask_pb2.FieldMask(paths=["options.model"]), allowed, check, nested=True
    )
    assert check.violations == []
