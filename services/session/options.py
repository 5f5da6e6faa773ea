"""Agent options: what is echoed back, and what the runtime receives. What a client may set
is checked by the one validator both contexts share, :func:`corral.libs.agent_options.validate`."""

from __future__ import annotations

from google.protobuf import field_mask_pb2

from corral.runtime.v1 import agent_options_pb2 as runtime_options
from corral.session.v1 import agent_options_pb2 as pb
from corral.session.v1 import agent_policy_pb2 as policy_pb


def redacted(options: pb.AgentOptions) -> pb.AgentOptions:
    """What clients see: secret values dropped, only their keys listed."""
    out = pb.AgentOptions()
    out.CopyFrom(options)
    for server in out.mcp_servers:
        if server.HasField("stdio"):
            keys = sorted(server.stdio.secret_env)
            server.stdio.secret_env.clear()
            server.stdio.secret_env_keys[:] = keys
        if server.HasField("http"):
            keys = sorted(server.http.secret_headers)
            server.http.secret_headers.clear()
            server.http.secret_header_keys[:] = keys
    return out


def with_policy(options: pb.AgentOptions, policy: policy_pb.AgentPolicy | None) -> pb.AgentOptions:
    """A session's options under its organisation's policy: the organisation's MCP servers
    (its names win) and its permission rules first, then the session's own."""
    if policy is None:
        return options
    merged = pb.AgentOptions()
    merged.CopyFrom(options)
    taken = {server.name for server in policy.mcp_servers}
    del merged.mcp_servers[:]
    merged.mcp_servers.extend(policy.mcp_servers)
    merged.mcp_servers.extend(s for s in options.mcp_servers if s.name not in taken)
    del merged.permission_rules[:]
    merged.permission_rules.extend(policy.permission_rules)
    merged.permission_rules.extend(options.permission_rules)
    return merged


def redacted_policy(policy: policy_pb.AgentPolicy) -> policy_pb.AgentPolicy:
    shown = redacted(pb.AgentOptions(mcp_servers=policy.mcp_servers))
    out = policy_pb.AgentPolicy()
    out.CopyFrom(policy)
    del out.mcp_servers[:]
    out.mcp_servers.extend(shown.mcp_servers)
    return out


def for_runtime(options: pb.AgentOptions) -> runtime_options.AgentOptions:
    """The runtime's view: the same fields, with secrets merged into env / headers."""
    out = runtime_options.AgentOptions(
        model=options.model,
        system_prompt=options.system_prompt,
        append_system_prompt=options.append_system_prompt,
        allowed_tools=list(options.allowed_tools),
        disallowed_tools=list(options.disallowed_tools),
        permission_mode=int(options.permission_mode),  # type: ignore[arg-type]
        max_turns=options.max_turns,
        max_budget_usd_micros=options.max_budget_usd_micros,
        max_thinking_tokens=options.max_thinking_tokens,
        env=dict(options.env),
    )
    if options.HasField("permission_timeout"):
        out.permission_timeout.CopyFrom(options.permission_timeout)
    for rule in options.permission_rules:
        out.permission_rules.add(tool_pattern=rule.tool_pattern, action=int(rule.action))
    for server in options.mcp_servers:
        target = out.mcp_servers.add(name=server.name)
        if server.HasField("stdio"):
            target.stdio.command = server.stdio.command
            target.stdio.args.extend(server.stdio.args)
            target.stdio.env.update(server.stdio.env)
            target.stdio.env.update(server.stdio.secret_env)
        elif server.HasField("http"):
            target.http.url = server.http.url
            target.http.protocol = int(server.http.protocol)  # type: ignore[assignment]
            target.http.headers.update(server.http.headers)
            target.http.headers.update(server.http.secret_headers)
    return out


def options_with(
    current: pb.AgentOptions, sent: pb.AgentOptions, paths: frozenset[str]
) -> pb.AgentOptions:
    """UpdateSession's field mask on agent options: ``agent_options`` (alone, or with no
    ``agent_options.<field>`` path) replaces them all; ``agent_options.<field>`` paths replace
    just those fields (lists and maps replaced, not appended)."""
    fields = sorted(p.split(".", 1)[1] for p in paths if p.startswith("agent_options."))
    if "agent_options" in paths or not fields:
        return sent
    merged = pb.AgentOptions()
    merged.CopyFrom(current)
    field_mask_pb2.FieldMask(paths=fields).MergeMessage(sent, merged, replace_repeated_field=True)
    return merged
