"""Translating the runtime's events into the public ``SessionEvent`` contract.

Most payloads are declared identically in ``corral.runtime.v1`` and ``corral.session.v1`` (the
contexts share no types, but these messages agree field for field), so they are copied on the
wire; ``tests/session/test_events.py`` holds the two definitions to that agreement.
"""

from __future__ import annotations

from corral.runtime.v1 import runtime_event_pb2 as rt
from corral.session.v1 import event_pb2 as ev

# Payloads whose runtime and session messages are wire-identical.
WIRE_COPIED = (
    "text_delta",
    "text_block",
    "thinking_delta",
    "thinking_block",
    "tool_use",
    "tool_result",
    "permission_request",
    "permission_decision",
    "usage",
    "turn_result",
    "error",
    "waiting_for_agent",
)
STREAMING_FRAGMENTS = frozenset({"text_delta", "thinking_delta"})


def from_runtime(event: rt.RuntimeEvent) -> ev.SessionEvent | None:
    """The session event for a runtime event (``None`` for kinds the session does not record)."""
    kind = event.WhichOneof("payload")
    out = ev.SessionEvent(turn_id=event.turn_id)
    if event.HasField("create_time"):
        out.create_time.CopyFrom(event.create_time)
    else:
        out.create_time.GetCurrentTime()
    if kind == "turn_started":
        out.turn_started.model = event.turn_started.model
        if event.turn_started.HasField("wait_duration"):
            out.turn_started.wait_duration.CopyFrom(event.turn_started.wait_duration)
    elif kind in WIRE_COPIED:
        target = getattr(out, kind)
        target.ParseFromString(getattr(event, kind).SerializeToString())
        target.DiscardUnknownFields()  # e.g. TurnResult.transcript_id stays inside Corral
    else:
        return None
    return out


def kind_of(event: ev.SessionEvent) -> str:
    return event.WhichOneof("payload") or ""
