"""The one validator of agent options, shared by session (CreateSession, UpdateSession,
UpdateAgentPolicy) and runtime (RunTurn), so anything a session accepts its runtime accepts.

``corral.session.v1.AgentOptions`` and ``corral.runtime.v1.AgentOptions`` have the same field
names and numbers (the session's adds ``secret_env`` / ``secret_headers``, which the runtime
receives merged into ``env`` / ``headers``); the checks read fields by name, so one function
serves both. The limits are the ones ``protos/corral/session/v1/agent_options.proto``
documents.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Any

from corral.libs.errors import FieldViolation, InvalidArgument, Validator
from corral.libs.validation import check_text

MAX_MODEL = 100
MAX_PROMPT = 100_000
MAX_TOOLS = 200
MAX_TOOL_NAME = 200
MAX_MCP_SERVERS = 20
MAX_RULES = 50
MAX_ENV = 100
MAX_ENV_VALUE = 10_000
MAX_ARGS = 100
MAX_PERMISSION_TIMEOUT_SECONDS = 24 * 3600
SERVER_NAME = re.compile(r"^[a-z0-9_-]{1,64}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")
# PermissionMode values 0-5 and PermissionRule.Action 1-3 in both contexts' protos.
PERMISSION_MODES = range(0, 6)
ACTIONS = range(1, 4)


def validate(options: Any, check: Validator, prefix: str, *, policy_servers: int = 0) -> None:
    """Add a violation, under ``prefix`` (e.g. ``session.agent_options``), for every field of
    ``options`` out of its documented range. ``policy_servers``: how many MCP servers an
    organisation's policy adds on top of the session's own (the runtime sees both)."""
    check_text(options.model, check, f"{prefix}.model", max_length=MAX_MODEL, lines=False)
    for name in ("system_prompt", "append_system_prompt"):
        check_text(getattr(options, name), check, f"{prefix}.{name}", max_length=MAX_PROMPT)
    for name in ("allowed_tools", "disallowed_tools"):
        tools = getattr(options, name)
        check.check(len(tools) <= MAX_TOOLS, f"{prefix}.{name}", f"at most {MAX_TOOLS} tools")
        for i, tool in enumerate(tools):
            check_text(
                tool, check, f"{prefix}.{name}[{i}]", max_length=MAX_TOOL_NAME, required=True
            )
    check.check(
        int(options.permission_mode) in PERMISSION_MODES,
        f"{prefix}.permission_mode",
        "is not a known permission mode",
    )
    for name in ("max_turns", "max_budget_usd_micros", "max_thinking_tokens"):
        check.check(getattr(options, name) >= 0, f"{prefix}.{name}", "must not be negative")
    timeout = options.permission_timeout.ToNanoseconds() / 1e9
    check.check(
        0 <= timeout <= MAX_PERMISSION_TIMEOUT_SECONDS,
        f"{prefix}.permission_timeout",
        "must be between 0 and 24 hours",
    )
    _check_env(options.env, check, f"{prefix}.env")
    _check_rules(options.permission_rules, check, f"{prefix}.permission_rules")
    _check_servers(options.mcp_servers, check, f"{prefix}.mcp_servers", policy_servers)


def _check_rules(rules: Any, check: Validator, path: str) -> None:
    check.check(len(rules) <= MAX_RULES, path, f"at most {MAX_RULES} rules")
    for i, rule in enumerate(rules):
        where = f"{path}[{i}]"
        check_text(rule.tool_pattern, check, f"{where}.tool_pattern", max_length=200, required=True)
        check.check(int(rule.action) in ACTIONS, f"{where}.action", "must be ALLOW, DENY or ASK")


def _check_servers(servers: Any, check: Validator, path: str, policy_servers: int) -> None:
    limit = MAX_MCP_SERVERS + policy_servers
    check.check(len(servers) <= limit, path, f"at most {MAX_MCP_SERVERS} servers")
    names: set[str] = set()
    for i, server in enumerate(servers):
        where = f"{path}[{i}]"
        check.check(
            bool(SERVER_NAME.match(server.name)) and server.name not in names,
            f"{where}.name",
            "must be unique, 1-64 lowercase letters, digits, '_' or '-'",
        )
        names.add(server.name)
        transport = server.WhichOneof("transport")
        if transport is None:
            check.add(f"{where}.transport", "give stdio or http")
        elif transport == "stdio":
            stdio = server.stdio
            check_text(
                stdio.command, check, f"{where}.stdio.command", max_length=4096, required=True
            )
            check.check(len(stdio.args) <= MAX_ARGS, f"{where}.stdio.args", "at most 100")
            for j, arg in enumerate(stdio.args):
                check_text(arg, check, f"{where}.stdio.args[{j}]", max_length=MAX_ENV_VALUE)
            _check_env(stdio.env, check, f"{where}.stdio.env")
            if hasattr(stdio, "secret_env"):
                _check_env(stdio.secret_env, check, f"{where}.stdio.secret_env")
        else:
            http = server.http
            check_text(http.url, check, f"{where}.http.url", max_length=2048, lines=False)
            check.check(
                http.url.startswith(("http://", "https://")),
                f"{where}.http.url",
                "must be an http(s) URL",
            )
            _check_headers(http.headers, check, f"{where}.http.headers")
            if hasattr(http, "secret_headers"):
                _check_headers(http.secret_headers, check, f"{where}.http.secret_headers")


def _check_env(env: Any, check: Validator, path: str) -> None:
    check.check(len(env) <= MAX_ENV, path, f"at most {MAX_ENV} variables")
    for key, value in env.items():
        if not ENV_NAME.match(key):
            check.add(path, f"{key[:40]!r} is not a variable name")
            continue
        check_text(value, check, f"{path}[{key}]", max_length=MAX_ENV_VALUE)


def _check_headers(headers: Any, check: Validator, path: str) -> None:
    check.check(len(headers) <= MAX_ENV, path, f"at most {MAX_ENV} headers")
    for key, value in headers.items():
        if not HEADER_NAME.match(key):
            check.add(path, f"{key[:40]!r} is not a header name")
            continue
        check_text(value, check, f"{path}[{key}]", max_length=MAX_ENV_VALUE, lines=False)


# ---- what an organisation's admins allow (the agent policy's allow-lists) -------------------

BYPASS_PERMISSIONS = 5
# Variables no session may set, whatever its organisation allows: they change what programs
# load or where they connect (loaders, interpreters' search paths, proxies, CA bundles, the
# model endpoint and the CLI's own configuration).
DENIED_ENV_PREFIXES = ("LD_", "DYLD_", "ANTHROPIC_", "CLAUDE_", "CORRAL_", "OTEL_", "GIT_")
DENIED_ENV = frozenset(
    {
        "PATH",
        "HOME",
        "SHELL",
        "ENV",
        "BASH_ENV",
        "IS_SANDBOX",
        "NODE_OPTIONS",
        "NODE_PATH",
        "NODE_EXTRA_CA_CERTS",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PYTHONUSERBASE",
        "PERL5LIB",
        "PERL5OPT",
        "RUBYOPT",
        "RUBYLIB",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "TMPDIR",
    }
)


@dataclass(frozen=True)
class Allowances:
    """An organisation's allow-lists (AgentPolicy). The defaults are the safe ones: no stdio
    MCP command, HTTP MCP servers on any host over https only, any model, every permission mode
    but bypass, any environment variable not on the platform's deny-list."""

    mcp_commands: frozenset[str] = frozenset()
    mcp_hosts: frozenset[str] = frozenset()  # `host` or `*.domain`; empty: any host, https only
    models: frozenset[str] = frozenset()  # empty: any
    permission_modes: frozenset[int] = frozenset()  # empty: all but BYPASS_PERMISSIONS
    env_keys: frozenset[str] = frozenset()  # `NAME` or `PREFIX*`; empty: any not denied


def env_denied(name: str) -> bool:
    upper = name.upper()
    return upper in DENIED_ENV or upper.startswith(DENIED_ENV_PREFIXES) or upper.endswith("_PROXY")


def _host_allowed(host: str, allowed: frozenset[str]) -> bool:
    host = host.lower().rstrip(".")
    return any(
        host == entry or (entry.startswith("*.") and host.endswith(entry[1:])) for entry in allowed
    )


def _env_allowed(name: str, allowed: frozenset[str]) -> bool:
    if env_denied(name):
        return False
    if not allowed:
        return True
    return any(
        name == entry or (entry.endswith("*") and name.startswith(entry[:-1])) for entry in allowed
    )


def check_allowed(options: Any, allowances: Allowances, prefix: str) -> None:
    """Raise INVALID_ARGUMENT when ``options`` use anything ``allowances`` do not allow; the
    reason is the first rule broken (MODEL_NOT_ALLOWED, PERMISSION_MODE_NOT_ALLOWED,
    ENV_NOT_ALLOWED, MCP_COMMAND_NOT_ALLOWED, MCP_HOST_NOT_ALLOWED) and every broken field is
    listed."""
    broken: list[tuple[str, FieldViolation]] = []

    def refuse(reason: str, path: str, description: str) -> None:
        broken.append((reason, FieldViolation(path, description)))

    if options.model and allowances.models and options.model not in allowances.models:
        refuse("MODEL_NOT_ALLOWED", f"{prefix}.model", "is not allowed by the organisation")
    mode = int(options.permission_mode)
    modes = allowances.permission_modes
    if (modes and mode and mode not in modes) or (not modes and mode == BYPASS_PERMISSIONS):
        refuse(
            "PERMISSION_MODE_NOT_ALLOWED",
            f"{prefix}.permission_mode",
            "is not allowed by the organisation",
        )
    for name in options.env:
        if not _env_allowed(name, allowances.env_keys):
            refuse("ENV_NOT_ALLOWED", f"{prefix}.env[{name[:40]}]", "may not be set")
    for i, server in enumerate(options.mcp_servers):
        where = f"{prefix}.mcp_servers[{i}]"
        transport = server.WhichOneof("transport")
        if transport == "stdio":
            if server.stdio.command not in allowances.mcp_commands:
                refuse(
                    "MCP_COMMAND_NOT_ALLOWED",
                    f"{where}.stdio.command",
                    "is not on the organisation's list of MCP commands",
                )
            for field_name in ("env", "secret_env"):
                for name in getattr(server.stdio, field_name, ()):
                    if not _env_allowed(name, allowances.env_keys):
                        refuse(
                            "ENV_NOT_ALLOWED",
                            f"{where}.stdio.{field_name}[{name[:40]}]",
                            "may not be set",
                        )
        elif transport == "http":
            url = urllib.parse.urlsplit(server.http.url)
            host = url.hostname or ""
            listed = _host_allowed(host, allowances.mcp_hosts)
            if not (listed or (not allowances.mcp_hosts and url.scheme == "https")):
                refuse(
                    "MCP_HOST_NOT_ALLOWED",
                    f"{where}.http.url",
                    "is not an allowed MCP host (https to any host unless the organisation "
                    "lists hosts; plain http only to listed ones)",
                )
    if broken:
        raise InvalidArgument(
            "the agent options use what the organisation does not allow",
            reason=broken[0][0],
            violations=[violation for _, violation in broken],
        )
