"""From Claude Agent SDK messages to ``corral.runtime.v1.RuntimeEvent``s.

One :class:`TurnEvents` per turn stamps every event with the turn id, the next ordinal and the
time, so events from the message stream and from permission callbacks share one gapless order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from claude_agent_sdk import (
    AssistantMessage,
    ResultMessage,
    StreamEvent,
    SystemMessage,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
    UserMessage,
)
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.rpc import code_pb2

from corral.runtime.v1 import runtime_event_pb2 as pb
from corral.services.runtime.domain import (
    Behavior,
    Decision,
    DecisionSource,
    mcp_server_of,
    micro_usd,
)

TOOL_RESULT_LIMIT = 64 * 1024

_BEHAVIOR = {
    Behavior.ALLOW: pb.PERMISSION_BEHAVIOR_ALLOW,
    Behavior.DENY: pb.PERMISSION_BEHAVIOR_DENY,
}
_SOURCE = {
    DecisionSource.USER: pb.PermissionDecision.SOURCE_USER,
    DecisionSource.POLICY: pb.PermissionDecision.SOURCE_POLICY,
    DecisionSource.TIMEOUT: pb.PermissionDecision.SOURCE_TIMEOUT,
    DecisionSource.INTERRUPT: pb.PermissionDecision.SOURCE_INTERRUPT,
}
# ResultMessage.subtype -> status; error_during_execution is INTERRUPTED only after an interrupt.
_STATUS = {
    "success": pb.TurnResult.STATUS_SUCCEEDED,
    "error_max_turns": pb.TurnResult.STATUS_MAX_TURNS_REACHED,
    "error_max_budget_usd": pb.TurnResult.STATUS_BUDGET_EXCEEDED,
}


def to_struct(value: Mapping[str, Any] | None) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    if value:
        # Through JSON so that anything the SDK parsed (nested lists, None) fits a Struct.
        message.update(json.loads(json.dumps(value, default=str)))
    return message


def seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def error(code: code_pb2.Code.ValueType, reason: str, message: str) -> pb.Error:
    return pb.Error(code=code, reason=reason, message=message)


def decision_message(decision: Decision) -> pb.PermissionDecision:
    message = pb.PermissionDecision(
        permission_request_id=decision.request_id,
        behavior=_BEHAVIOR[decision.behavior],
        source=_SOURCE[decision.source],
        decided_by=decision.decided_by,
        message=decision.message,
    )
    if decision.updated_input is not None:
        message.updated_input.CopyFrom(to_struct(decision.updated_input))
    return message


def usage_message(usage: Mapping[str, Any] | None, cost_usd_micros: int = 0) -> pb.Usage:
    usage = usage or {}

    def tokens(key: str) -> int:
        value = usage.get(key)
        return int(value) if isinstance(value, int | float) else 0

    return pb.Usage(
        input_tokens=tokens("input_tokens"),
        output_tokens=tokens("output_tokens"),
        cache_read_input_tokens=tokens("cache_read_input_tokens"),
        cache_creation_input_tokens=tokens("cache_creation_input_tokens"),
        cost_usd_micros=cost_usd_micros,
    )


def _result_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, dict) and isinstance(block.get("text"), str):
            parts.append(block["text"])
        else:
            parts.append(json.dumps(block, default=str))
    return "\n".join(parts)


def tool_result_message(block: ToolResultBlock) -> pb.ToolResult:
    text = _result_text(block.content)
    raw = text.encode()
    truncated = len(raw) > TOOL_RESULT_LIMIT
    if truncated:
        text = raw[:TOOL_RESULT_LIMIT].decode(errors="ignore")
    return pb.ToolResult(
        tool_use_id=block.tool_use_id,
        content=text,
        is_error=bool(block.is_error),
        content_truncated=truncated,
    )


class TurnEvents:
    """Builds one turn's events in order. Not thread-safe; one event loop owns a turn."""

    def __init__(self, turn_id: str) -> None:
        self.turn_id = turn_id
        self.ordinal = 0
        # The message being streamed, per subagent (parent tool use id; None: the agent itself).
        self._message_ids: dict[str | None, str] = {}
        # Complete blocks seen per message: the CLI sends each block in an AssistantMessage of
        # its own, so this is the block's index within the model's message.
        self._block_counts: dict[str, int] = {}

    def stamp(self, **payload: Any) -> pb.RuntimeEvent:
        self.ordinal += 1
        event = pb.RuntimeEvent(turn_id=self.turn_id, ordinal=self.ordinal, **payload)
        event.create_time.CopyFrom(_now())
        return event

    # -- the SDK's message stream --------------------------------------------------------------

    def from_message(self, message: object) -> list[pb.RuntimeEvent]:
        """Events for one SDK message; SystemMessage(init) and ResultMessage are the service's."""
        if isinstance(message, StreamEvent):
            return self._from_stream_event(message)
        if isinstance(message, AssistantMessage):
            return self._from_assistant(message)
        if isinstance(message, UserMessage) and isinstance(message.content, list):
            return [
                self.stamp(tool_result=tool_result_message(block))
                for block in message.content
                if isinstance(block, ToolResultBlock)
            ]
        return []

    def _from_stream_event(self, message: StreamEvent) -> list[pb.RuntimeEvent]:
        event = message.event
        kind = event.get("type")
        parent = message.parent_tool_use_id
        if kind == "message_start":
            self._message_ids[parent] = str(event.get("message", {}).get("id", ""))
            return []
        if kind == "content_block_delta":
            delta = event.get("delta", {})
            message_id = self._message_ids.get(parent, "")
            index = int(event.get("index", 0))
            if delta.get("type") == "text_delta":
                return [
                    self.stamp(
                        text_delta=pb.TextDelta(
                            message_id=message_id, index=index, text=str(delta.get("text", ""))
                        )
                    )
                ]
            if delta.get("type") == "thinking_delta":
                return [
                    self.stamp(
                        thinking_delta=pb.ThinkingDelta(
                            message_id=message_id,
                            index=index,
                            thinking=str(delta.get("thinking", "")),
                        )
                    )
                ]
            return []
        if kind == "message_delta" and isinstance(event.get("usage"), dict):
            return [self.stamp(usage=usage_message(event["usage"]))]
        return []

    def _from_assistant(self, message: AssistantMessage) -> list[pb.RuntimeEvent]:
        events = []
        message_id = message.message_id or ""
        if message.error:
            events.append(
                self.stamp(
                    error=error(
                        code_pb2.UNAVAILABLE,
                        "MODEL_ERROR",
                        f"the model API failed: {message.error}",
                    )
                )
            )
        for block in message.content:
            index = self._block_counts.get(message_id, 0)
            self._block_counts[message_id] = index + 1
            if isinstance(block, TextBlock):
                events.append(
                    self.stamp(
                        text_block=pb.TextBlock(message_id=message_id, index=index, text=block.text)
                    )
                )
            elif isinstance(block, ThinkingBlock):
                events.append(
                    self.stamp(
                        thinking_block=pb.ThinkingBlock(
                            message_id=message_id, index=index, thinking=block.thinking
                        )
                    )
                )
            elif isinstance(block, ToolUseBlock):
                events.append(
                    self.stamp(
                        tool_use=pb.ToolUse(
                            id=block.id,
                            name=block.name,
                            input=to_struct(block.input),
                            mcp_server=mcp_server_of(block.name),
                            parent_tool_use_id=message.parent_tool_use_id or "",
                        )
                    )
                )
        return events


# -- the payloads of the first and last event, which the service composes -----------------------


def turn_started(
    init: SystemMessage | None,
    *,
    transcript_id: str,
    model: str,
    process_started: bool,
) -> pb.TurnStarted:
    data = init.data if init is not None else {}
    servers = data.get("mcp_servers")
    tools = data.get("tools")
    return pb.TurnStarted(
        transcript_id=str(data.get("session_id") or transcript_id),
        model=str(data.get("model") or model),
        process_started=process_started,
        tools=[str(t) for t in tools] if isinstance(tools, list) else [],
        mcp_servers=[
            pb.McpServerStatus(name=str(s.get("name", "")), status=str(s.get("status", "")))
            for s in (servers if isinstance(servers, list) else [])
            if isinstance(s, dict)
        ],
    )


def turn_result(
    result: ResultMessage | None,
    *,
    cost_usd: float,
    interrupted: bool,
    transcript_id: str,
    failure: pb.Error | None = None,
    elapsed_seconds: float = 0.0,
) -> pb.TurnResult:
    message = pb.TurnResult(transcript_id=transcript_id)
    if result is not None:
        message.num_turns = result.num_turns
        message.duration.CopyFrom(seconds(result.duration_ms / 1000))
        message.api_duration.CopyFrom(seconds(result.duration_api_ms / 1000))
        message.permission_denials = len(result.permission_denials or [])
        message.transcript_id = result.session_id or transcript_id
    else:
        message.duration.CopyFrom(seconds(elapsed_seconds))
    message.usage.CopyFrom(usage_message(result.usage if result else None, micro_usd(cost_usd)))
    if interrupted:
        message.status = pb.TurnResult.STATUS_INTERRUPTED
        message.error.CopyFrom(
            failure or error(code_pb2.CANCELLED, "INTERRUPTED", "the turn was interrupted")
        )
    elif failure is not None:
        message.status = pb.TurnResult.STATUS_FAILED
        message.error.CopyFrom(failure)
    elif result is None:
        message.status = pb.TurnResult.STATUS_FAILED
        message.error.CopyFrom(
            error(code_pb2.INTERNAL, "PROCESS_CRASHED", "the agent ended without a result")
        )
    else:
        status = _STATUS.get(result.subtype, pb.TurnResult.STATUS_FAILED)
        if result.is_error and status == pb.TurnResult.STATUS_SUCCEEDED:
            status = pb.TurnResult.STATUS_FAILED
        message.status = status
        if status == pb.TurnResult.STATUS_SUCCEEDED:
            message.result = result.result or ""
        else:
            message.error.CopyFrom(_result_error(result))
    return message


def _result_error(result: ResultMessage) -> pb.Error:
    detail = "; ".join(result.errors or []) or result.result or result.subtype
    if result.subtype == "error_max_turns":
        return error(code_pb2.RESOURCE_EXHAUSTED, "MAX_TURNS_REACHED", detail)
    if result.subtype == "error_max_budget_usd":
        return error(code_pb2.RESOURCE_EXHAUSTED, "BUDGET_EXCEEDED", detail)
    if result.api_error_status is not None or detail.startswith("API Error"):
        return error(code_pb2.UNAVAILABLE, "MODEL_ERROR", detail)
    return error(code_pb2.INTERNAL, "SDK_ERROR", detail)


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp
