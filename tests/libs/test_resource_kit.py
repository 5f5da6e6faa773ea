"""The shared resource kit: names, etags, keyset pages, idempotency, field checks, agent options.

The SQL parts run on real SQLite and real PostgreSQL (one contract, both databases)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from google.protobuf import duration_pb2
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from corral.libs import agent_options, db, idempotency, keyset, listing, names
from corral.libs.errors import Aborted, InvalidArgument, Validator
from corral.libs.etags import check_etag, etag_of
from corral.libs.validation import check_labels, check_text
from corral.runtime.v1 import agent_options_pb2 as runtime_pb
from corral.session.v1 import agent_options_pb2 as session_pb

USER = names.ResourcePattern("organizations/{organization}/users/{user}")
SESSION = names.ResourcePattern("sessions/{session}")


# ---- names ----


def test_a_pattern_formats_and_parses_back() -> None:
    name = USER.format("acme", "u1")
    assert name == "organizations/acme/users/u1"
    assert USER.parse(name) == ("acme", "u1")
    assert USER.variables == ("organization", "user")
    assert SESSION.parse("sessions/a-b_C9") == ("a-b_C9",)
    with pytest.raises(ValueError, match="takes 2 ids"):
        USER.format("acme")


@pytest.mark.parametrize(
    "name",
    [
        "",
        "sessions/",
        "sessions/..",
        "sessions/a/../b",
        "sessions/a.b",
        "sessions/-leading",
        "sessions/a/b",
        "sessions/a\x00",
        "sessions/" + "a" * 65,
        "/sessions/a",
        "Sessions/a",
        "sessions/a ",
    ],
)
def test_names_outside_the_one_alphabet_are_refused(name: str) -> None:
    assert SESSION.parse(name) is None
    with pytest.raises(InvalidArgument) as raised:
        SESSION.parse_field(name, "name")
    assert [v.field for v in raised.value.violations] == ["name"]
    assert "sessions/{session}" in raised.value.violations[0].description


def test_parse_any_says_which_pattern_matched() -> None:
    assert names.parse_any("sessions/s1", "parent", USER, SESSION) == (1, ("s1",))
    with pytest.raises(InvalidArgument, match="parent"):
        names.parse_any("workspaces/w", "parent", USER, SESSION)


def test_new_ids_are_in_the_alphabet_and_distinct() -> None:
    ids = {names.new_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(names.is_id(i) for i in ids)


# ---- etags ----


def test_etags_are_opaque_per_resource_and_version() -> None:
    assert etag_of("sessions/a", 1) != etag_of("sessions/a", 2)
    assert etag_of("sessions/a", 1) != etag_of("sessions/b", 1)
    assert etag_of("sessions/a", 1) == etag_of("sessions/a", 1)
    check_etag("", etag_of("k", 3))  # empty: whatever is current
    check_etag(etag_of("k", 3), etag_of("k", 3))
    with pytest.raises(Aborted) as raised:
        check_etag(etag_of("k", 2), etag_of("k", 3), "session")
    assert raised.value.reason == "ETAG_MISMATCH"


# ---- page tokens (pure) ----


def test_page_tokens_carry_datetimes_and_belong_to_one_query() -> None:
    page = listing.page_from(2, "", "q1")
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    rows, token = listing.finish_page([(when, "a"), (when, "b"), (when, "c")], page, lambda r: r)
    assert rows == [(when, "a"), (when, "b")]
    assert listing.page_from(2, token, "q1").after == (when, "b")
    with pytest.raises(InvalidArgument) as other:
        listing.page_from(2, token, "q2")
    assert other.value.reason == "INVALID_PAGE_TOKEN"
    with pytest.raises(InvalidArgument) as garbage:
        listing.page_from(2, "not-a-token!", "q1")
    assert garbage.value.reason == "INVALID_PAGE_TOKEN"
    assert listing.finish_page([(when, "a")], page, lambda r: r) == ([(when, "a")], "")
    assert listing.page_from(0, "", "q").size == 50
    assert listing.page_from(10**6, "", "q").size == listing.MAX_PAGE_SIZE


# ---- SQL: keyset pages and idempotency, on both databases ----

metadata = sa.MetaData()
items = sa.Table(
    "kit_items",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("rank", sa.Integer, nullable=False),
    sa.Column("title", sa.String(64), nullable=False),
)
keys = idempotency.idempotency_table(metadata, "kit_idempotency")


@pytest.fixture
async def engine(database_url: tuple[str, str]) -> AsyncIterator[AsyncEngine]:
    url, schema = database_url
    if url.startswith("sqlite"):
        made = create_async_engine(url)
    else:
        made = db.create_engine(url, schema=schema)
        async with made.begin() as connection:
            await connection.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    async with made.begin() as connection:
        await connection.run_sync(metadata.create_all)
    yield made
    await made.dispose()


async def test_keyset_pages_visit_every_row_once_in_order(engine: AsyncEngine) -> None:
    rows = [{"id": f"i{n:02d}", "rank": n % 3, "title": f"t{n}"} for n in range(11)]
    async with engine.begin() as connection:
        await connection.execute(items.insert(), rows)
    for descending in (False, True):
        seen: list[str] = []
        token = ""
        while True:
            page = listing.page_from(4, token, listing.fingerprint("all", descending))
            query = keyset.page_query(
                sa.select(items), items.c.rank, items.c.id, descending=descending, page=page
            )
            async with engine.connect() as connection:
                fetched = list(await connection.execute(query))
            kept, token = listing.finish_page(fetched, page, lambda r: (r.rank, r.id))
            seen.extend(r.id for r in kept)
            if not token:
                break
        expected = sorted(rows, key=lambda r: (r["rank"], r["id"]), reverse=descending)
        assert seen == [r["id"] for r in expected]


async def test_filters_become_where_clauses(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        await connection.execute(
            items.insert(),
            [
                {"id": "a", "rank": 1, "title": "report 50%"},
                {"id": "b", "rank": 2, "title": "report_x"},
                {"id": "c", "rank": 3, "title": "other"},
            ],
        )
    fields = {
        "rank": listing.FieldSpec("rank", int),
        "title": listing.FieldSpec("title", prefix=True),
    }

    async def ids(text: str) -> list[str]:
        clauses = keyset.where(items, listing.parse_filter(text, fields))
        async with engine.connect() as connection:
            result = await connection.execute(
                sa.select(items.c.id).where(*clauses).order_by(items.c.id)
            )
            return [row[0] for row in result]

    assert await ids("rank >= 2") == ["b", "c"]
    assert await ids('title = "report*"') == ["a", "b"]
    assert await ids('title = "report 5*"') == ["a"]  # '%' and '_' are literal in a prefix
    assert await ids('title = "report_*"') == ["b"]
    assert await ids("rank != 1 AND rank < 3") == ["b"]


async def test_idempotency_replays_refuses_reuse_and_scopes_by_caller(
    engine: AsyncEngine,
) -> None:
    alice = idempotency.scope("CreateThing", "organizations/acme/users/alice")
    bob = idempotency.scope("CreateThing", "organizations/acme/users/bob")
    first = idempotency.fingerprint({"title": "one"})
    async with engine.begin() as connection:
        store = idempotency.SqlIdempotencyStore(connection, keys)
        assert await idempotency.replay(store, alice, "r1", first) is None
        await store.put(alice, "r1", first, "things/1", time.time())
    async with engine.begin() as connection:
        store = idempotency.SqlIdempotencyStore(connection, keys)
        assert await idempotency.replay(store, alice, "r1", first) == "things/1"
        assert await idempotency.replay(store, bob, "r1", first) is None
        assert await idempotency.replay(store, alice, "", first) is None
        with pytest.raises(InvalidArgument) as reused:
            await idempotency.replay(store, alice, "r1", idempotency.fingerprint({"title": "2"}))
        assert reused.value.reason == "REQUEST_ID_REUSED"
    # a concurrent duplicate loses on the key; its transaction fails and nothing is doubled
    with pytest.raises(idempotency.RequestRaced):
        async with engine.begin() as connection:
            store = idempotency.SqlIdempotencyStore(connection, keys)
            await store.put(alice, "r1", first, "things/2", time.time())


async def test_idempotency_records_expire_after_the_retention(engine: AsyncEngine) -> None:
    scope = idempotency.scope("CreateThing", "organizations/acme/users/alice")
    old = time.time() - idempotency.RETENTION_SECONDS - 60
    async with engine.begin() as connection:
        store = idempotency.SqlIdempotencyStore(connection, keys)
        await store.put(scope, "r1", "f-old", "things/old", old)
    async with engine.begin() as connection:
        store = idempotency.SqlIdempotencyStore(connection, keys)
        assert await idempotency.replay(store, scope, "r1", "f-new") is None  # ignored
        await store.put(scope, "r1", "f-new", "things/new", time.time())  # replaces it
        assert await idempotency.replay(store, scope, "r1", "f-new") == "things/new"
        await store.put(scope, "r2", "f", "things/x", old)
        assert await store.purge(time.time() - idempotency.RETENTION_SECONDS) == 1


def test_fingerprints_are_stable_and_ignore_map_order() -> None:
    a = session_pb.AgentOptions(env={"A": "1", "B": "2"}, model="m")
    b = session_pb.AgentOptions(model="m", env={"B": "2", "A": "1"})
    assert idempotency.fingerprint(a) == idempotency.fingerprint(b)
    assert idempotency.fingerprint({"x": 1, "y": a}) == idempotency.fingerprint({"y": b, "x": 1})
    assert idempotency.fingerprint(a) != idempotency.fingerprint(session_pb.AgentOptions())


# ---- field checks ----


def _violations(run: object) -> list[str]:
    check = Validator()
    run(check)  # type: ignore[operator]
    return [v.field for v in check.violations]


def test_labels_follow_the_documented_rule() -> None:
    good = {"team": "infra", "a": "", "x_1-y": "v" * 63}
    assert _violations(lambda c: check_labels(good, c, "labels")) == []
    for bad in (
        {"Team": "x"},
        {"1team": "x"},
        {"": "x"},
        {"t" * 64: "x"},
        {"team": "v" * 64},
        {"team": "a\nb"},
        {"team": "a\x00"},
    ):
        assert _violations(lambda c, bad=bad: check_labels(bad, c, "labels")), bad
    too_many = {f"k{n}": "" for n in range(65)}
    assert _violations(lambda c: check_labels(too_many, c, "labels")) == ["labels"]


def test_text_refuses_control_characters_and_overlong_values() -> None:
    assert _violations(lambda c: check_text("a\tb\nc", c, "f", max_length=10)) == []
    assert _violations(lambda c: check_text("a\x00", c, "f", max_length=10)) == ["f"]
    assert _violations(lambda c: check_text("a\x1b[31m", c, "f", max_length=10)) == ["f"]
    assert _violations(lambda c: check_text("a\nb", c, "f", max_length=9, lines=False)) == ["f"]
    assert _violations(lambda c: check_text("x" * 11, c, "f", max_length=10)) == ["f"]
    assert _violations(lambda c: check_text("", c, "f", max_length=10, required=True)) == ["f"]


# ---- one agent-options validator for session and runtime ----


def _options(module: object, **fields: object) -> object:
    return module.AgentOptions(**fields)  # type: ignore[attr-defined]


@pytest.mark.parametrize("module", [session_pb, runtime_pb], ids=["session", "runtime"])
def test_agent_options_are_judged_alike_in_both_contexts(module: object) -> None:
    good = _options(
        module,
        model="claude-sonnet-4-5",
        allowed_tools=["Read", "Bash(git status:*)"],
        env={"LANG": "C.UTF-8"},
        permission_timeout=duration_pb2.Duration(seconds=600),
        permission_rules=[{"tool_pattern": "mcp__*", "action": 3}],
        mcp_servers=[
            {"name": "calc", "stdio": {"command": "calc-mcp", "args": ["--x"]}},
            {"name": "web", "http": {"url": "https://mcp.example/mcp"}},
        ],
    )
    assert _violations(lambda c: agent_options.validate(good, c, "o")) == []
    bad = _options(
        module,
        model="m\x00",
        max_turns=-1,
        env={"1BAD": "x"},
        permission_timeout=duration_pb2.Duration(seconds=int(timedelta(days=2).total_seconds())),
        permission_rules=[{"tool_pattern": "", "action": 0}],
        mcp_servers=[
            {"name": "Calc", "stdio": {"command": ""}},
            {"name": "web", "http": {"url": "ftp://x"}},
            {"name": "web"},
        ],
    )
    assert sorted(_violations(lambda c: agent_options.validate(bad, c, "o"))) == sorted(
        [
            "o.model",
            "o.max_turns",
            "o.env",
            "o.permission_timeout",
            "o.permission_rules[0].tool_pattern",
            "o.permission_rules[0].action",
            "o.mcp_servers[0].name",
            "o.mcp_servers[0].stdio.command",
            "o.mcp_servers[1].http.url",
            "o.mcp_servers[2].name",
            "o.mcp_servers[2].transport",
        ]
    )


# ---- what an organisation allows ----


def _refusal(options: object, allowances: agent_options.Allowances) -> tuple[str, list[str]]:
    with pytest.raises(InvalidArgument) as raised:
        agent_options.check_allowed(options, allowances, "o")
    return raised.value.reason, [v.field for v in raised.value.violations]


@pytest.mark.parametrize("module", [session_pb, runtime_pb], ids=["session", "runtime"])
def test_the_safe_defaults(module: object) -> None:
    defaults = agent_options.Allowances()
    fine = _options(
        module,
        model="any-model",
        permission_mode=2,
        env={"LANG": "C", "MY_TOOL_TOKEN": "x"},
        mcp_servers=[{"name": "web", "http": {"url": "https://mcp.example.com/mcp"}}],
    )
    agent_options.check_allowed(fine, defaults, "o")
    assert _refusal(_options(module, permission_mode=5), defaults) == (
        "PERMISSION_MODE_NOT_ALLOWED",
        ["o.permission_mode"],
    )
    stdio = [{"name": "x", "stdio": {"command": "/bin/sh", "env": {"LD_PRELOAD": "/x.so"}}}]
    assert _refusal(_options(module, mcp_servers=stdio), defaults) == (
        "MCP_COMMAND_NOT_ALLOWED",
        ["o.mcp_servers[0].stdio.command", "o.mcp_servers[0].stdio.env[LD_PRELOAD]"],
    )
    if module is session_pb:  # secrets are named in the session's options only
        hidden = [
            {"name": "x", "stdio": {"command": "/bin/sh", "secret_env": {"NODE_OPTIONS": "-r x"}}}
        ]
        assert _refusal(_options(module, mcp_servers=hidden), defaults)[1] == [
            "o.mcp_servers[0].stdio.command",
            "o.mcp_servers[0].stdio.secret_env[NODE_OPTIONS]",
        ]
    plain = [{"name": "x", "http": {"url": "http://169.254.169.254/latest"}}]
    assert _refusal(_options(module, mcp_servers=plain), defaults)[0] == "MCP_HOST_NOT_ALLOWED"
    for name in ("LD_PRELOAD", "ANTHROPIC_BASE_URL", "https_proxy", "NODE_OPTIONS", "PATH"):
        assert _refusal(_options(module, env={name: "x"}), defaults) == (
            "ENV_NOT_ALLOWED",
            [f"o.env[{name}]"],
        )


def test_an_organisation_narrows_or_widens_within_the_platform_rules() -> None:
    policy = agent_options.Allowances(
        mcp_commands=frozenset({"calc-mcp"}),
        mcp_hosts=frozenset({"*.corp.example", "tools.example"}),
        models=frozenset({"claude-sonnet-4-5"}),
        permission_modes=frozenset({1, 5}),
        env_keys=frozenset({"TEAM_*", "LD_LIBRARY_PATH"}),
    )
    allowed = session_pb.AgentOptions(
        model="claude-sonnet-4-5",
        permission_mode=5,
        env={"TEAM_NAME": "infra"},
        mcp_servers=[
            {"name": "calc", "stdio": {"command": "calc-mcp"}},
            {"name": "a", "http": {"url": "http://wiki.corp.example/mcp"}},
            {"name": "b", "http": {"url": "https://tools.example/mcp"}},
        ],
    )
    agent_options.check_allowed(allowed, policy, "o")
    assert _refusal(session_pb.AgentOptions(model="claude-opus-5-5"), policy)[0] == (
        "MODEL_NOT_ALLOWED"
    )
    assert _refusal(session_pb.AgentOptions(permission_mode=2), policy)[0] == (
        "PERMISSION_MODE_NOT_ALLOWED"
    )
    # Not on the organisation's list, or on the platform's deny-list even when listed.
    for name in ("OTHER", "LD_LIBRARY_PATH"):
        assert _refusal(session_pb.AgentOptions(env={name: "x"}), policy)[0] == "ENV_NOT_ALLOWED"
    evil = session_pb.AgentOptions(
        mcp_servers=[{"name": "x", "http": {"url": "https://corp.example.evil.test/mcp"}}]
    )
    assert _refusal(evil, policy)[0] == "MCP_HOST_NOT_ALLOWED"


async def test_page_tokens_are_signed_with_the_services_key() -> None:
    """A client can neither alter a token nor make one: a changed byte, a token made without
    the key, or one signed by another deployment's key is INVALID_PAGE_TOKEN."""
    page = listing.page_from(1, "", "q")
    await listing.PageTokenKeyHook(b"key-a").before(None)
    _, token = listing.finish_page([(1, "a"), (2, "b")], page, lambda r: r)
    assert listing.page_from(1, token, "q").after == (1, "a")

    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    forged_body = raw[:-16].replace(b'"a"', b'"z"')
    unsigned = json.dumps({"v": [1, 2], "i": "a", "f": page.fingerprint}).encode()
    for bad in (
        raw[:-1] + bytes([raw[-1] ^ 1]),  # a flipped bit of the signature
        forged_body + raw[-16:],  # another position, the old signature
        unsigned,  # no signature at all (and a list where a scalar belongs)
    ):
        forged = base64.urlsafe_b64encode(bad).decode().rstrip("=")
        with pytest.raises(InvalidArgument) as refused:
            listing.page_from(1, forged, "q")
        assert refused.value.reason == "INVALID_PAGE_TOKEN"

    await listing.PageTokenKeyHook(b"key-b").before(None)
    with pytest.raises(InvalidArgument, match="malformed"):
        listing.page_from(1, token, "q")
