"""The runtime's and the session's event messages agree field for field where the session
copies them on the wire (services/session/events.py); this keeps the copy honest."""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from corral.runtime.v1 import runtime_event_pb2 as rt
from corral.services.session.events import WIRE_COPIED, from_runtime
from corral.session.v1 import event_pb2 as ev

# Same number, type and values, different name: the runtime says what the SDK does (behavior),
# the session what a person decided (decision).
RENAMED = {"permission_decision.decision": "behavior"}


def _compatible(session: Descriptor, runtime: Descriptor, path: str) -> list[str]:
    problems = []
    for field in session.fields:
        other = runtime.fields_by_number.get(field.number)
        where = f"{path}.{field.name}"
        expected_name = RENAMED.get(where, field.name)
        if other is None or other.name != expected_name or other.type != field.type:
            problems.append(where)
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.full_name.startswith(
            "corral."
        ):
            problems += _compatible(field.message_type, other.message_type, where)
        if field.type == FieldDescriptor.TYPE_ENUM:
            mine = {v.number for v in field.enum_type.values}
            theirs = {v.number for v in other.enum_type.values}
            if mine != theirs:
                problems.append(f"{where} (enum values)")
    return problems


def test_wire_copied_payloads_are_compatible() -> None:
    session_fields = ev.SessionEvent.DESCRIPTOR.fields_by_name
    runtime_fields = rt.RuntimeEvent.DESCRIPTOR.fields_by_name
    problems = []
    for kind in WIRE_COPIED:
        problems += _compatible(
            session_fields[kind].message_type, runtime_fields[kind].message_type, kind
        )
    assert problems == []


def test_runtime_only_fields_do_not_leak_into_session_events() -> None:
    event = rt.RuntimeEvent(turn_id="t1")
    event.turn_result.status = rt.TurnResult.STATUS_SUCCEEDED
    event.turn_result.transcript_id = "internal-transcript"
    mapped = from_runtime(event)
    assert mapped is not None
    assert b"internal-transcript" not in mapped.SerializeToString()
    assert mapped.turn_result.status == ev.TurnResult.STATUS_SUCCEEDED
