"""What a turn's runtime events add up to: its status, usage, transcript and result, and the
events that end a turn whose runtime stream broke off."""

from __future__ import annotations

import asyncio

from google.rpc import code_pb2

from corral.libs.errors import CorralError
from corral.libs.grpc.errors import code_for
from corral.runtime.v1 import runtime_event_pb2 as rt
from corral.services.session import events
from corral.services.session.domain import Usage
from corral.session.v1 import event_pb2


class TurnOutcome:
    """What a turn's events add up to."""

    def __init__(self) -> None:
        self.status = "SUCCEEDED"
        self.usage = Usage()
        self.result = b""
        self.result_seen = False
        self.transcript_id = ""
        self.error_reason = ""
        self.error_message = ""

    def observe(self, event: rt.RuntimeEvent) -> None:
        if event.HasField("turn_started") and event.turn_started.transcript_id:
            self.transcript_id = event.turn_started.transcript_id
        if event.HasField("turn_result"):
            result = event.turn_result
            self.result_seen = True
            self.status = rt.TurnResult.Status.Name(result.status).removeprefix("STATUS_")
            u = result.usage
            self.usage = Usage(
                u.input_tokens,
                u.output_tokens,
                u.cache_read_input_tokens,
                u.cache_creation_input_tokens,
                u.cost_usd_micros,
            )
            if result.transcript_id:
                self.transcript_id = result.transcript_id
            mapped = events.from_runtime(event)
            assert mapped is not None
            self.result = mapped.turn_result.SerializeToString()
            if result.HasField("error"):
                self.error_reason, self.error_message = result.error.reason, result.error.message

    def failed(self, exc: BaseException | None) -> list[event_pb2.SessionEvent]:
        """The events that end a turn whose runtime stream broke off."""
        self.status = "FAILED"
        self.result_seen = True
        reason = "RUNTIME_UNAVAILABLE"
        message = "the agent runtime stopped answering mid-turn"
        if isinstance(exc, CorralError):
            reason, message = exc.reason, exc.message
        elif exc is not None and not isinstance(exc, asyncio.CancelledError):
            reason, message = "TURN_ABORTED", str(exc)
        self.error_reason, self.error_message = reason, message
        error = event_pb2.SessionEvent()
        error.error.code = (
            code_for(exc).value[0] if isinstance(exc, CorralError) else code_pb2.UNAVAILABLE
        )
        error.error.reason = reason
        error.error.message = message
        result = event_pb2.SessionEvent()
        result.turn_result.status = event_pb2.TurnResult.STATUS_FAILED
        result.turn_result.error.CopyFrom(error.error)
        u = result.turn_result.usage
        u.input_tokens, u.output_tokens = self.usage.input_tokens, self.usage.output_tokens
        u.cost_usd_micros = self.usage.cost_usd_micros
        self.result = result.turn_result.SerializeToString()
        return [error, result]
