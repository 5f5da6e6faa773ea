"""The organisation's agent policy as a rule book: what its admins may put in the allow-lists
(UpdateAgentPolicy), and whether a session's options stay inside them (CreateSession,
UpdateSession, and every turn, since a policy can narrow after a session was created).

The allow-list semantics themselves (defaults, the environment deny-list) are the shared kit's
(:func:`corral.libs.agent_options.check_allowed`); this module reads them out of the policy and
adds the per-turn budget cap.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from corral.libs.agent_options import PERMISSION_MODES, Allowances, check_allowed, env_denied
from corral.libs.errors import FieldViolation, InvalidArgument, Validator
from corral.libs.validation import check_text
from corral.session.v1 import agent_options_pb2 as opts
from corral.session.v1 import agent_policy_pb2

MAX_ENTRIES = 100
ALLOW_LISTS = (
    "allowed_mcp_commands",
    "allowed_mcp_hosts",
    "allowed_models",
    "allowed_permission_modes",
    "allowed_env",
)
# Every field UpdateAgentPolicy's update_mask may name.
FIELDS = frozenset({"mcp_servers", "permission_rules", *ALLOW_LISTS, "max_turn_budget_usd_micros"})
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
HOST = re.compile(rf"^(?:\*\.)?{_LABEL}(?:\.{_LABEL})*$")
ENV_ENTRY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\*?$")
_MAX_LENGTH = {"allowed_mcp_commands": 4096, "allowed_mcp_hosts": 253, "allowed_models": 100}


def validate(sent: agent_policy_pb2.AgentPolicy, paths: Iterable[str], check: Validator) -> None:
    """Add a violation under ``agent_policy.<field>`` for every bad allow-list entry or cap
    among the fields ``paths`` names."""
    named = frozenset(paths)
    for field in ALLOW_LISTS:
        if field not in named:
            continue
        entries = list(getattr(sent, field))
        where = f"agent_policy.{field}"
        check.check(len(entries) <= MAX_ENTRIES, where, f"at most {MAX_ENTRIES} entries")
        for i, entry in enumerate(entries[:MAX_ENTRIES]):
            _check_entry(field, entry, check, f"{where}[{i}]")
    if "max_turn_budget_usd_micros" in named:
        check.check(
            sent.max_turn_budget_usd_micros >= 0,
            "agent_policy.max_turn_budget_usd_micros",
            "must not be negative",
        )


def _check_entry(field: str, entry: str | int, check: Validator, where: str) -> None:
    if field == "allowed_permission_modes":
        check.check(
            int(entry) in PERMISSION_MODES and int(entry) != 0,
            where,
            "must be a known permission mode other than UNSPECIFIED",
        )
        return
    assert isinstance(entry, str)
    if field == "allowed_env":
        if not ENV_ENTRY.match(entry):
            check.add(where, "must be a variable name NAME or a prefix PREFIX*")
        elif not entry.endswith("*") and env_denied(entry):
            check.add(where, "is on the platform's deny-list: no session may set it")
        return
    if field == "allowed_mcp_hosts":
        if not HOST.match(entry):
            check.add(where, "must be a lower-case host name `host` or `*.domain`")
        return
    check_text(entry, check, where, max_length=_MAX_LENGTH[field], required=True, lines=False)


def allowances(policy: agent_policy_pb2.AgentPolicy | None) -> Allowances:
    """The allow-lists of ``policy``; the safe defaults without one."""
    if policy is None:
        return Allowances()
    return Allowances(
        mcp_commands=frozenset(policy.allowed_mcp_commands),
        mcp_hosts=frozenset(policy.allowed_mcp_hosts),
        models=frozenset(policy.allowed_models),
        permission_modes=frozenset(int(m) for m in policy.allowed_permission_modes),
        env_keys=frozenset(policy.allowed_env),
    )


def check_options(
    options: opts.AgentOptions, policy: agent_policy_pb2.AgentPolicy | None, prefix: str
) -> None:
    """Raise INVALID_ARGUMENT when a session's ``options`` use what the organisation's
    ``policy`` does not allow (the kit's reasons), or ask for a per-turn budget above its cap."""
    checked = opts.AgentOptions()
    checked.CopyFrom(options)
    # The kit judges stdio servers' env names; secret variables reach the same process, so
    # the same names are judged (a secret LD_PRELOAD is still LD_PRELOAD).
    for server in checked.mcp_servers:
        if server.HasField("stdio"):
            for name in server.stdio.secret_env:
                server.stdio.env.setdefault(name, "")
    check_allowed(checked, allowances(policy), prefix)
    cap = policy.max_turn_budget_usd_micros if policy is not None else 0
    if cap and options.max_budget_usd_micros > cap:
        raise InvalidArgument(
            "the per-turn budget is above the organisation's cap",
            violations=[
                FieldViolation(
                    f"{prefix}.max_budget_usd_micros",
                    f"at most {cap} (the organisation's max_turn_budget_usd_micros)",
                )
            ],
        )


def parsed(payload: bytes | None) -> agent_policy_pb2.AgentPolicy | None:
    """The stored policy (None: the organisation has none)."""
    return None if payload is None else agent_policy_pb2.AgentPolicy.FromString(payload)


def apply(
    stored: agent_policy_pb2.AgentPolicy,
    sent: agent_policy_pb2.AgentPolicy,
    paths: Iterable[str],
) -> None:
    """Replace ``stored``'s fields that ``paths`` names with ``sent``'s; the others stay."""
    for field in sorted(frozenset(paths) & FIELDS):
        if field == "max_turn_budget_usd_micros":
            stored.max_turn_budget_usd_micros = sent.max_turn_budget_usd_micros
            continue
        target = getattr(stored, field)
        del target[:]
        target.extend(getattr(sent, field))
