"""Session and runtime agree on agent options: whatever CreateSession accepts, merged with the
organisation's policy and converted for the runtime, is what the runtime's validator (the one
both contexts share) accepts too. Otherwise a session could be created that never runs."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from corral.libs import agent_options
from corral.libs.errors import Validator
from corral.session.v1 import agent_options_pb2 as opts
from corral.session.v1 import agent_policy_pb2, session_pb2
from corral.session.v1 import session_service_pb2 as pb
from tests.session.conftest import Stack

COMMAND = "/usr/bin/mcp-files"


def _stdio(name: str, **secrets: str) -> opts.McpServer:
    return opts.McpServer(
        name=name,
        stdio=opts.McpStdioTransport(
            command=COMMAND,
            args=["--root", "/workspace", "--verbose"],
            env={"LOG_LEVEL": "debug"},
            secret_env=secrets,
        ),
    )


def _http(name: str, **secrets: str) -> opts.McpServer:
    return opts.McpServer(
        name=name,
        http=opts.McpHttpTransport(
            url=f"https://mcp.example/{name}",
            headers={"x-team": "platform"},
            secret_headers=secrets,
        ),
    )


OPTION_SETS = {
    "defaults": opts.AgentOptions(),
    "everything-but-servers": opts.AgentOptions(
        model="claude-sonnet-4-5",
        system_prompt="You review pull requests.\nBe brief.",
        append_system_prompt="Answer in English.",
        allowed_tools=["Read", "Bash(git diff:*)"],
        disallowed_tools=["WebFetch"],
        permission_mode=opts.AgentOptions.PERMISSION_MODE_ACCEPT_EDITS,
        max_turns=12,
        max_budget_usd_micros=2_000_000,
        max_thinking_tokens=4096,
        env={"TZ": "UTC", "PAGER": "cat"},  # GIT_* is on the platform's deny-list
        permission_timeout=duration_pb2.Duration(seconds=600),
        permission_rules=[
            opts.PermissionRule(tool_pattern="Bash", action=opts.PermissionRule.ACTION_ASK),
            opts.PermissionRule(tool_pattern="Read", action=opts.PermissionRule.ACTION_ALLOW),
        ],
    ),
    "servers-with-secrets": opts.AgentOptions(
        mcp_servers=[
            _stdio("files", API_TOKEN="s3cret", OTHER_TOKEN="x"),
            _http("tickets", authorization="Bearer s3cret"),
        ]
    ),
    "as-many-servers-as-allowed": opts.AgentOptions(
        mcp_servers=[_http(f"server-{i}", authorization=f"Bearer {i}") for i in range(20)]
    ),
}

POLICIES = {
    # The least policy these options need: no stdio command is allowed by default.
    "allows-the-command": agent_policy_pb2.AgentPolicy(allowed_mcp_commands=[COMMAND]),
    "policy-adds-servers-and-rules": agent_policy_pb2.AgentPolicy(
        allowed_mcp_commands=[COMMAND],
        mcp_servers=[
            _http("org-search", authorization="Bearer org"),
            _stdio("org-files", ORG_TOKEN="org"),
            _http("tickets", authorization="Bearer org-wins"),  # the org's name wins
        ],
        permission_rules=[
            opts.PermissionRule(tool_pattern="Bash(rm:*)", action=opts.PermissionRule.ACTION_DENY)
        ],
    ),
}


@pytest.mark.parametrize("policy_name", POLICIES)
@pytest.mark.parametrize("options_name", OPTION_SETS)
async def test_what_a_session_accepts_its_runtime_accepts(
    stack: Stack, options_name: str, policy_name: str
) -> None:
    options, policy = OPTION_SETS[options_name], POLICIES[policy_name]
    policy.name = "organizations/acme/agentPolicy"
    await stack.stub.UpdateAgentPolicy(
        pb.UpdateAgentPolicyRequest(
            agent_policy=policy, update_mask=field_mask_pb2.FieldMask(paths=["*"])
        ),
        metadata=stack.auth("ada", roles=("admin",)),
    )
    session = (
        await stack.stub.CreateSession(
            pb.CreateSessionRequest(session=session_pb2.Session(agent_options=options)),
            metadata=stack.auth(),
        )
    ).session
    await stack.stub.SendMessage(
        pb.SendMessageRequest(session=session.name, text="go"), metadata=stack.auth()
    )
    turn = await stack.runtime.next_turn()
    sent = turn.request.options  # what the runtime receives, policy merged, secrets in
    check = Validator()
    # The runtime's own check (services/runtime/api.py): room for a policy's servers on top.
    agent_options.validate(sent, check, "options", policy_servers=agent_options.MAX_MCP_SERVERS)
    assert check.violations == []
    own = {s.name for s in options.mcp_servers}
    added = {s.name for s in policy.mcp_servers}
    assert {s.name for s in sent.mcp_servers} == own | added
    turn.finish()
