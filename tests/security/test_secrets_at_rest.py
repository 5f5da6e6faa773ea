"""MCP secrets at rest: after CreateSession, UpdateSession and UpdateAgentPolicy with secrets,
no row of the session database (SQLite and PostgreSQL) holds them in the clear; no read RPC
returns them; a turn still gets them; values sealed before a key rotation still open with the
ring "new,old"; a value copied into another session's row does not open there; a development
database's unsealed values still work and are sealed at the next write."""

from __future__ import annotations

import base64
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import field_mask_pb2

from corral.libs.auth.caller import Caller
from corral.libs.crypto import KeyRing
from corral.services.session.domain import SessionState
from corral.services.session.repository import metadata, sessions
from corral.services.session.secrets import PREFIX
from corral.session.v1 import agent_options_pb2 as opts
from corral.session.v1 import agent_policy_pb2, session_pb2
from corral.session.v1 import session_service_pb2 as pb
from tests.session import conftest as session_fixtures
from tests.session.conftest import ACME, Stack

stack = session_fixtures.stack
encryption_keys = session_fixtures.encryption_keys

ENV_SECRET = "env-s3cret-4f1c9a"
HEADER_SECRET = "Bearer header-s3cret-77d2e0"
POLICY_SECRET = "org-s3cret-0b3e55"
UPDATED_SECRET = "rotated-by-user-9e9e9e"
SECRETS = (ENV_SECRET, HEADER_SECRET, POLICY_SECRET, UPDATED_SECRET)
COMMAND = "/usr/local/bin/mcp-calc"
ALICE = Caller("organizations/acme/users/alice", ACME, frozenset({"user"}))


def ring(*names: str) -> str:
    """``CORRAL_ENCRYPTION_KEYS`` for keys named ``names`` (the first is the primary)."""
    return ",".join(f"{n}:{base64.b64encode(n.encode().ljust(32, b'.')).decode()}" for n in names)


def servers(env_secret: str = ENV_SECRET) -> list[opts.McpServer]:
    return [
        opts.McpServer(
            name="calc",
            stdio=opts.McpStdioTransport(
                command=COMMAND, env={"MODE": "plain"}, secret_env={"API_TOKEN": env_secret}
            ),
        ),
        opts.McpServer(
            name="tickets",
            http=opts.McpHttpTransport(
                url="https://tickets.example/mcp", secret_headers={"authorization": HEADER_SECRET}
            ),
        ),
    ]


async def raw_rows(stack: Stack) -> list[bytes]:
    """Every value of every row of every session table, as bytes."""
    out: list[bytes] = []
    async with stack.engine.connect() as connection:
        for table in metadata.sorted_tables:
            for row in await connection.execute(sa.select(table)):
                for value in row:
                    out.append(value if isinstance(value, bytes) else str(value).encode())
    return out


def assert_absent(blobs: list[bytes], *secrets: str) -> None:
    for secret in secrets:
        for form in (secret.encode(), base64.b64encode(secret.encode())):
            assert not any(form in blob for blob in blobs), f"{secret!r} is stored in the clear"


async def admin_policy(stack: Stack, **fields: Any) -> None:
    await stack.stub.UpdateAgentPolicy(
        pb.UpdateAgentPolicyRequest(
            agent_policy=agent_policy_pb2.AgentPolicy(
                name="organizations/acme/agentPolicy", **fields
            ),
            update_mask=field_mask_pb2.FieldMask(paths=sorted(fields)),
        ),
        metadata=stack.auth("ada", roles=("admin",)),
    )


async def new_session(stack: Stack, env_secret: str = ENV_SECRET) -> session_pb2.Session:
    reply = await stack.stub.CreateSession(
        pb.CreateSessionRequest(
            session=session_pb2.Session(
                agent_options=opts.AgentOptions(mcp_servers=servers(env_secret))
            )
        ),
        metadata=stack.auth(),
    )
    return reply.session


async def turn_options(stack: Stack, session: str) -> Any:
    """What the runtime receives for the next turn of ``session``."""
    await stack.stub.SendMessage(
        pb.SendMessageRequest(session=session, text="go"), metadata=stack.auth()
    )
    settled = len(stack.ledger.settled)
    turn = await stack.runtime.next_turn()
    turn.finish()
    await stack.ledger.wait_settled(settled + 1)  # the turn is over: the session takes the next
    return turn.request.options


def by_name(options: Any) -> dict[str, Any]:
    return {server.name: server for server in options.mcp_servers}


async def test_secrets_are_sealed_in_every_row_hidden_from_reads_and_given_to_turns(
    stack: Stack,
) -> None:
    await admin_policy(
        stack,
        allowed_mcp_commands=[COMMAND],
        mcp_servers=[
            opts.McpServer(
                name="org-search",
                http=opts.McpHttpTransport(
                    url="https://search.example/mcp", secret_headers={"x-key": POLICY_SECRET}
                ),
            )
        ],
    )
    session = await new_session(stack)

    assert_absent(await raw_rows(stack), *SECRETS)
    # The reads name the secrets' keys, never their values.
    got = await stack.stub.GetSession(
        pb.GetSessionRequest(name=session.name), metadata=stack.auth()
    )
    listed = await stack.stub.ListSessions(pb.ListSessionsRequest(), metadata=stack.auth())
    policy = await stack.stub.GetAgentPolicy(
        pb.GetAgentPolicyRequest(name="organizations/acme/agentPolicy"),
        metadata=stack.auth("ada", roles=("admin",)),
    )
    for reply in (session, got, listed, policy):
        assert_absent([reply.SerializeToString()], *SECRETS)
        assert PREFIX.encode() not in reply.SerializeToString()  # nor their sealed form
    assert list(got.session.agent_options.mcp_servers[0].stdio.secret_env_keys) == ["API_TOKEN"]

    sent = by_name(await turn_options(stack, session.name))
    assert sent["calc"].stdio.env["API_TOKEN"] == ENV_SECRET
    assert sent["calc"].stdio.env["MODE"] == "plain"
    assert sent["tickets"].http.headers["authorization"] == HEADER_SECRET
    assert sent["org-search"].http.headers["x-key"] == POLICY_SECRET

    # A new secret through UpdateSession is sealed too, and the turn gets the new one.
    await stack.stub.UpdateSession(
        pb.UpdateSessionRequest(
            session=session_pb2.Session(
                name=session.name,
                agent_options=opts.AgentOptions(mcp_servers=servers(UPDATED_SECRET)),
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["agent_options.mcp_servers"]),
        ),
        metadata=stack.auth(),
    )
    assert_absent(await raw_rows(stack), *SECRETS)
    assert by_name(await turn_options(stack, session.name))["calc"].stdio.env["API_TOKEN"] == (
        UPDATED_SECRET
    )


async def test_values_sealed_under_the_old_key_open_after_rotation(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stack's service seals with the test key; the deployment rotates to "new" (first).
    await admin_policy(stack, allowed_mcp_commands=[COMMAND])
    old = await new_session(stack)
    old_id = old.name.removeprefix("sessions/")
    monkeypatch.setenv("CORRAL_ENCRYPTION_KEYS", ring("new") + "," + session_fixtures.TEST_KEYS)
    rotated = stack.make_service()
    try:
        turn = await rotated.send_message(
            ALICE, old_id, text="go", request_id="", strategy=_enqueue()
        )
        fake = await stack.runtime.next_turn()
        assert by_name(fake.request.options)["calc"].stdio.env["API_TOKEN"] == ENV_SECRET
        fake.finish()
        await stack.ledger.wait_settled()
        # What the rotated service writes is sealed with the new primary key.
        forked = await _fork_after(rotated, old_id, turn.id)
        sealed = await _stored_secret(stack, forked)
        assert KeyRing.parse(ring("new")).key_id_of(sealed) == "new"
    finally:
        await rotated.close()

    # Without the old key the old value does not open: the turn fails, the secret never leaks.
    monkeypatch.setenv("CORRAL_ENCRYPTION_KEYS", ring("new"))
    forgetful = stack.make_service()
    try:
        await forgetful.send_message(ALICE, old_id, text="go", request_id="", strategy=_enqueue())
        await stack.ledger.wait_settled(2)
        got = await forgetful.get_session(ALICE, old_id)
        assert len(stack.runtime.turns) == 1  # the runtime never saw the turn
        assert got.state == SessionState.FAILED
        assert got.failure_reason == "SECRET_UNAVAILABLE"  # as the session contract names it
        assert "key ring" in got.failure_message and ENV_SECRET not in got.failure_message
    finally:
        await forgetful.close()


def _enqueue() -> Any:
    from corral.services.session.domain import BusyStrategy

    return BusyStrategy.ENQUEUE


async def _fork_after(service: Any, session_id: str, turn_id: str) -> str:
    """Fork ``session_id`` once its turn is over (the fork copies sealed secrets)."""
    async with service._uow() as uow:  # the turn's result is written: the transcript exists
        assert (await uow.turns.get(session_id, turn_id)).end_time is not None
    child = await service.fork_session(ALICE, session_id, display_name="", request_id="")
    return str(child.id)


async def _stored_secret(stack: Stack, session_id: str) -> bytes:
    async with stack.engine.connect() as connection:
        raw = (
            await connection.execute(
                sa.select(sessions.c.agent_options).where(sessions.c.id == session_id)
            )
        ).scalar_one()
    stored = opts.AgentOptions.FromString(bytes(raw))
    value = stored.mcp_servers[0].stdio.secret_env["API_TOKEN"]
    assert value.startswith(PREFIX)
    return base64.b64decode(value.removeprefix(PREFIX).partition(":")[2])


async def test_a_sealed_value_copied_into_another_row_does_not_open(stack: Stack) -> None:
    await admin_policy(stack, allowed_mcp_commands=[COMMAND])
    victim = await new_session(stack)
    thief = await new_session(stack, env_secret="the thief's own")
    async with stack.engine.begin() as connection:
        stolen = (
            await connection.execute(
                sa.select(sessions.c.agent_options).where(
                    sessions.c.id == victim.name.removeprefix("sessions/")
                )
            )
        ).scalar_one()
        await connection.execute(
            sessions.update()
            .where(sessions.c.id == thief.name.removeprefix("sessions/"))
            .values(agent_options=stolen)
        )
    await stack.stub.SendMessage(
        pb.SendMessageRequest(session=thief.name, text="go"), metadata=stack.auth()
    )
    await stack.ledger.wait_settled()
    assert stack.runtime.turns == []  # the values did not open in another session's row
    history = await stack.stub.ListSessionEvents(
        pb.ListSessionEventsRequest(parent=thief.name), metadata=stack.auth()
    )
    results = [e.turn_result for e in history.session_events if e.HasField("turn_result")]
    assert results and results[0].status != results[0].STATUS_SUCCEEDED
    assert_absent([history.SerializeToString()], ENV_SECRET)


async def test_a_development_databases_plain_values_still_work_and_get_sealed(
    stack: Stack,
) -> None:
    await admin_policy(stack, allowed_mcp_commands=[COMMAND])
    session = await new_session(stack, env_secret="placeholder")
    session_id = session.name.removeprefix("sessions/")
    legacy = opts.AgentOptions(mcp_servers=servers())  # as stored before sealing existed
    async with stack.engine.begin() as connection:
        await connection.execute(
            sessions.update()
            .where(sessions.c.id == session_id)
            .values(agent_options=legacy.SerializeToString())
        )
    assert by_name(await turn_options(stack, session.name))["calc"].stdio.env["API_TOKEN"] == (
        ENV_SECRET
    )
    # The next write of the options seals what was in the clear, even the parts not sent.
    got = await stack.stub.GetSession(
        pb.GetSessionRequest(name=session.name), metadata=stack.auth()
    )
    await stack.stub.UpdateSession(
        pb.UpdateSessionRequest(
            session=session_pb2.Session(
                name=session.name, etag=got.session.etag, agent_options=opts.AgentOptions(model="m")
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["agent_options.model"]),
        ),
        metadata=stack.auth(),
    )
    assert_absent(await raw_rows(stack), ENV_SECRET, HEADER_SECRET)
    assert by_name(await turn_options(stack, session.name))["calc"].stdio.env["API_TOKEN"] == (
        ENV_SECRET
    )


async def test_another_organisation_learns_nothing_of_them(stack: Stack) -> None:
    """A caller of another organisation learns nothing of a session's secrets either."""
    await admin_policy(stack, allowed_mcp_commands=[COMMAND])
    session = await new_session(stack)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.GetSession(
            pb.GetSessionRequest(name=session.name),
            metadata=stack.auth("eve", org="organizations/globex"),
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert ENV_SECRET not in (caught.value.details() or "")
