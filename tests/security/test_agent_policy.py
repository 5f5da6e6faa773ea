"""The organisation's agent policy, as a user and an attacker meet it through the session
service's gRPC API (a real server on port 0; the runtime, ledger and audit are fakes):
every allow-list, the safe defaults (no stdio MCP command, no bypass mode, no loader or
endpoint variables), the per-turn budget cap, a policy that narrows after a session was
made, and who may read or change the policy."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2

from corral.session.v1 import agent_options_pb2 as opts
from corral.session.v1 import agent_policy_pb2, session_pb2
from corral.session.v1 import session_service_pb2 as pb
from tests.session import conftest as session_fixtures
from tests.session.conftest import GLOBEX, Stack
from tests.session.test_session_stream import detail, reason, violated_fields

stack = session_fixtures.stack
encryption_keys = session_fixtures.encryption_keys

POLICY = "organizations/acme/agentPolicy"
Mode = opts.AgentOptions.PermissionMode
COMMAND = "/usr/local/bin/mcp-calc"


def stdio(command: str = COMMAND, **secret_env: str) -> opts.McpServer:
    return opts.McpServer(
        name="calc", stdio=opts.McpStdioTransport(command=command, secret_env=secret_env)
    )


def http(url: str) -> opts.McpServer:
    return opts.McpServer(name="tickets", http=opts.McpHttpTransport(url=url))


async def set_policy(
    stack: Stack, user: str = "ada", *, org: str = "organizations/acme", **fields: Any
) -> agent_policy_pb2.AgentPolicy:
    """An admin's UpdateAgentPolicy of just ``fields``."""
    reply = await stack.stub.UpdateAgentPolicy(
        pb.UpdateAgentPolicyRequest(
            agent_policy=agent_policy_pb2.AgentPolicy(name=POLICY, **fields),
            update_mask=field_mask_pb2.FieldMask(paths=sorted(fields)),
        ),
        metadata=stack.auth(user, org=org, roles=("admin",)),
    )
    return reply.agent_policy


async def create(stack: Stack, **options: Any) -> session_pb2.Session:
    reply = await stack.stub.CreateSession(
        pb.CreateSessionRequest(
            session=session_pb2.Session(agent_options=opts.AgentOptions(**options))
        ),
        metadata=stack.auth(),
    )
    return reply.session


async def refused(stack: Stack, **options: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(stack, **options)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return caught.value


async def test_no_stdio_command_by_default_until_an_admin_allows_it(stack: Stack) -> None:
    error = await refused(stack, mcp_servers=[stdio()])
    assert reason(error) == "MCP_COMMAND_NOT_ALLOWED"
    assert violated_fields(error) == {"session.agent_options.mcp_servers[0].stdio.command"}

    await set_policy(stack, allowed_mcp_commands=[COMMAND])
    assert (await create(stack, mcp_servers=[stdio()])).name  # widened: now accepted
    error = await refused(stack, mcp_servers=[stdio("/bin/sh")])  # only the listed one
    assert reason(error) == "MCP_COMMAND_NOT_ALLOWED"


async def test_no_bypass_mode_by_default_and_only_listed_modes_when_set(stack: Stack) -> None:
    bypass = Mode.PERMISSION_MODE_BYPASS_PERMISSIONS
    error = await refused(stack, permission_mode=bypass)
    assert reason(error) == "PERMISSION_MODE_NOT_ALLOWED"
    assert violated_fields(error) == {"session.agent_options.permission_mode"}
    for mode in (Mode.PERMISSION_MODE_DEFAULT, Mode.PERMISSION_MODE_ACCEPT_EDITS):
        assert (await create(stack, permission_mode=mode)).name

    await set_policy(stack, allowed_permission_modes=[Mode.PERMISSION_MODE_PLAN, bypass])
    assert (await create(stack, permission_mode=bypass)).name
    error = await refused(stack, permission_mode=Mode.PERMISSION_MODE_ACCEPT_EDITS)
    assert reason(error) == "PERMISSION_MODE_NOT_ALLOWED"


async def test_models_outside_the_list_are_refused(stack: Stack) -> None:
    assert (await create(stack, model="claude-anything")).name  # empty list: any model
    await set_policy(stack, allowed_models=["claude-a"])
    error = await refused(stack, model="claude-b")
    assert reason(error) == "MODEL_NOT_ALLOWED"
    assert violated_fields(error) == {"session.agent_options.model"}
    assert (await create(stack, model="claude-a")).name
    assert (await create(stack)).name  # no model named: the deployment's default


@pytest.mark.parametrize(
    "name",
    ["LD_PRELOAD", "ANTHROPIC_BASE_URL", "CLAUDE_CONFIG_DIR", "NODE_OPTIONS", "https_proxy"],
)
async def test_loader_and_endpoint_variables_are_refused_everywhere(
    stack: Stack, name: str
) -> None:
    await set_policy(stack, allowed_mcp_commands=[COMMAND])
    for options in (
        {"env": {name: "x"}},
        {
            "mcp_servers": [
                opts.McpServer(
                    name="calc", stdio=opts.McpStdioTransport(command=COMMAND, env={name: "x"})
                )
            ]
        },
        {"mcp_servers": [stdio(**{name: "x"})]},  # a secret variable is still a variable
    ):
        error = await refused(stack, **options)
        assert reason(error) == "ENV_NOT_ALLOWED", options


async def test_the_deny_list_holds_against_the_allow_list(stack: Stack) -> None:
    await set_policy(stack, allowed_env=["APP_*", "TZ", "LD_*"])  # a prefix may be listed...
    error = await refused(stack, env={"LD_PRELOAD": "/tmp/evil.so"})  # ...denied still wins
    assert reason(error) == "ENV_NOT_ALLOWED"
    error = await refused(stack, env={"LANG": "C"})  # not on the list
    assert reason(error) == "ENV_NOT_ALLOWED"
    assert violated_fields(error) == {"session.agent_options.env[LANG]"}
    assert (await create(stack, env={"APP_MODE": "fast", "TZ": "UTC"})).name


async def test_http_servers_plain_http_and_unlisted_hosts(stack: Stack) -> None:
    assert (await create(stack, mcp_servers=[http("https://mcp.anywhere.example/x")])).name
    error = await refused(stack, mcp_servers=[http("http://mcp.anywhere.example/x")])
    assert reason(error) == "MCP_HOST_NOT_ALLOWED"

    await set_policy(stack, allowed_mcp_hosts=["*.corp.example", "tools.example"])
    for url in ("https://mcp.corp.example/a", "http://mcp.corp.example/a", "https://tools.example"):
        assert (await create(stack, mcp_servers=[http(url)])).name, url
    for url in ("https://mcp.anywhere.example/x", "https://corp.example.evil.example/"):
        error = await refused(stack, mcp_servers=[http(url)])
        assert reason(error) == "MCP_HOST_NOT_ALLOWED", url


async def test_budget_above_the_cap_is_refused_naming_the_field(stack: Stack) -> None:
    assert (await create(stack, max_budget_usd_micros=50_000_000)).name  # no cap yet
    await set_policy(stack, max_turn_budget_usd_micros=1_000_000)
    error = await refused(stack, max_budget_usd_micros=1_000_001)
    assert violated_fields(error) == {"session.agent_options.max_budget_usd_micros"}
    assert (await create(stack, max_budget_usd_micros=1_000_000)).name
    assert (await create(stack)).name  # 0: the policy's cap applies


async def test_update_session_is_held_to_the_policy(stack: Stack) -> None:
    session = await create(stack)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.UpdateSession(
            pb.UpdateSessionRequest(
                session=session_pb2.Session(
                    name=session.name,
                    agent_options=opts.AgentOptions(
                        permission_mode=Mode.PERMISSION_MODE_BYPASS_PERMISSIONS
                    ),
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["agent_options.permission_mode"]),
            ),
            metadata=stack.auth(),
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(caught.value) == "PERMISSION_MODE_NOT_ALLOWED"
    stored = await stack.stub.GetSession(
        pb.GetSessionRequest(name=session.name), metadata=stack.auth()
    )
    assert stored.session.agent_options.permission_mode == 0


async def test_a_narrowed_policy_stops_turns_of_sessions_made_before(stack: Stack) -> None:
    await set_policy(stack, allowed_mcp_commands=[COMMAND])
    session = await create(stack, model="claude-b", mcp_servers=[stdio()])
    await set_policy(stack, allowed_mcp_commands=[], allowed_models=["claude-a"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.SendMessage(
            pb.SendMessageRequest(session=session.name, text="hi"), metadata=stack.auth()
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(caught.value) == "MODEL_NOT_ALLOWED"
    assert violated_fields(caught.value) == {
        "session.agent_options.model",
        "session.agent_options.mcp_servers[0].stdio.command",
    }
    assert stack.runtime.turns == [] and stack.ledger.held == {}  # nothing ran, nothing held


async def test_get_returns_the_allow_lists(stack: Stack) -> None:
    await set_policy(
        stack,
        allowed_mcp_commands=[COMMAND],
        allowed_mcp_hosts=["*.corp.example"],
        allowed_models=["claude-a"],
        allowed_permission_modes=[Mode.PERMISSION_MODE_PLAN],
        allowed_env=["APP_*"],
        max_turn_budget_usd_micros=250_000,
    )
    reader = stack.auth("victor", roles=("viewer",))  # any member may read it
    got = await stack.stub.GetAgentPolicy(pb.GetAgentPolicyRequest(name=POLICY), metadata=reader)
    policy = got.agent_policy
    assert list(policy.allowed_mcp_commands) == [COMMAND]
    assert list(policy.allowed_mcp_hosts) == ["*.corp.example"]
    assert list(policy.allowed_models) == ["claude-a"]
    assert list(policy.allowed_permission_modes) == [Mode.PERMISSION_MODE_PLAN]
    assert list(policy.allowed_env) == ["APP_*"]
    assert policy.max_turn_budget_usd_micros == 250_000


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"allowed_mcp_hosts": ["https://corp.example"]}, "agent_policy.allowed_mcp_hosts[0]"),
        ({"allowed_mcp_hosts": ["a.*.example"]}, "agent_policy.allowed_mcp_hosts[0]"),
        ({"allowed_env": ["A-B"]}, "agent_policy.allowed_env[0]"),
        ({"allowed_env": ["PATH"]}, "agent_policy.allowed_env[0]"),
        ({"allowed_mcp_commands": ["/bin/x\x00y"]}, "agent_policy.allowed_mcp_commands[0]"),
        ({"allowed_mcp_commands": [""]}, "agent_policy.allowed_mcp_commands[0]"),
        ({"allowed_models": ["m" * 101]}, "agent_policy.allowed_models[0]"),
        ({"allowed_models": [f"m{i}" for i in range(101)]}, "agent_policy.allowed_models"),
        ({"allowed_permission_modes": [0]}, "agent_policy.allowed_permission_modes[0]"),
        ({"allowed_permission_modes": [9]}, "agent_policy.allowed_permission_modes[0]"),
        ({"max_turn_budget_usd_micros": -1}, "agent_policy.max_turn_budget_usd_micros"),
    ],
)
async def test_bad_allow_lists_are_refused_naming_the_field(
    stack: Stack, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await set_policy(stack, **fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violated_fields(caught.value)


async def test_only_the_organisations_admins_change_it(stack: Stack) -> None:
    await set_policy(stack, allowed_models=["claude-a"])
    attempt = pb.UpdateAgentPolicyRequest(
        agent_policy=agent_policy_pb2.AgentPolicy(
            name=POLICY, allowed_mcp_commands=["/bin/sh"], allowed_permission_modes=[5]
        ),
        update_mask=field_mask_pb2.FieldMask(paths=["*"]),
    )
    for roles in (("user",), ("viewer",)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.stub.UpdateAgentPolicy(attempt, metadata=stack.auth("mallory", roles=roles))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, roles
        assert detail(caught.value, error_details_pb2.ErrorInfo) is not None
    # Another organisation's admin can neither read nor change it (it does not exist for them).
    outsider = stack.auth("eve", org=GLOBEX, roles=("admin",))
    for call, request in (
        (stack.stub.UpdateAgentPolicy, attempt),
        (stack.stub.GetAgentPolicy, pb.GetAgentPolicyRequest(name=POLICY)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(request, metadata=outsider)  # type: ignore[operator]
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    policy = (
        await stack.stub.GetAgentPolicy(
            pb.GetAgentPolicyRequest(name=POLICY), metadata=stack.auth()
        )
    ).agent_policy
    assert list(policy.allowed_models) == ["claude-a"]
    assert list(policy.allowed_mcp_commands) == [] and list(policy.allowed_permission_modes) == []
    error = await refused(stack, mcp_servers=[stdio("/bin/sh")])
    assert reason(error) == "MCP_COMMAND_NOT_ALLOWED"
