"""The runtime's rules in plain Python: the permission policy, pending decisions, cost."""

from __future__ import annotations

import pytest

from corral.libs.errors import FailedPrecondition, NotFound
from corral.services.runtime.domain import (
    Behavior,
    CostMeter,
    Decision,
    DecisionSource,
    PermissionBook,
    PermissionRule,
    RuleAction,
    first_matching_rule,
    mcp_server_of,
    micro_usd,
)


def test_the_first_matching_rule_decides() -> None:
    rules = [
        PermissionRule("mcp__github__*", RuleAction.ASK),
        PermissionRule("mcp__*", RuleAction.ALLOW),
        PermissionRule("Bash", RuleAction.DENY),
    ]
    assert first_matching_rule(rules, "mcp__github__create_issue") == rules[0]
    assert first_matching_rule(rules, "mcp__calc__add") == rules[1]
    assert first_matching_rule(rules, "Bash") == rules[2]
    assert first_matching_rule(rules, "bash") is None  # case-sensitive, like tool names
    assert first_matching_rule(rules, "Write") is None
    assert mcp_server_of("mcp__github__create_issue") == "github"
    assert mcp_server_of("Bash") == ""


async def test_a_permission_request_is_decided_once() -> None:
    book = PermissionBook()
    request = book.open("Bash", "toolu_1", {"command": "ls"}, timeout_seconds=5)
    assert book.pending_count == 1
    allow = Decision(request.request_id, Behavior.ALLOW, DecisionSource.USER)
    book.decide(request.request_id, allow)
    assert await request.outcome == allow
    assert book.pending_count == 0
    with pytest.raises(FailedPrecondition) as again:
        book.decide(request.request_id, allow)
    assert again.value.reason == "PERMISSION_REQUEST_NOT_PENDING"
    with pytest.raises(NotFound):
        book.decide("perm-404", allow)


async def test_an_interrupt_denies_every_pending_request() -> None:
    book = PermissionBook()
    first = book.open("Bash", "toolu_1", {}, timeout_seconds=5)
    second = book.open("Write", "toolu_2", {}, timeout_seconds=5)
    book.deny_all(DecisionSource.INTERRUPT, "interrupted")
    for request in (first, second):
        decision = await request.outcome
        assert decision.behavior is Behavior.DENY
        assert decision.source is DecisionSource.INTERRUPT
    assert first.request_id != second.request_id


def test_a_turn_costs_the_difference_of_cumulative_totals() -> None:
    meter = CostMeter(started_usd=3.0)  # a process resumed a transcript that had cost 3 USD
    assert meter.spent_in_process == 0
    assert meter.settle(3.25) == pytest.approx(0.25)
    assert meter.settle(3.75) == pytest.approx(0.5)
    assert meter.settle(None) == 0
    assert meter.spent_in_process == pytest.approx(0.75)
    assert micro_usd(0.0474) == 47_400
    assert micro_usd(None) == 0
