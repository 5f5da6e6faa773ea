"""One server interceptor that runs each call through a short pipeline.

For every call it: takes or makes a request id, runs the ``CallHook``s in order (authentication,
rate limiting, ...), calls the handler with the caller bound to a context variable, maps
:class:`~corral.libs.errors.CorralError` to a rich status (an outage of the database or Redis
to ``UNAVAILABLE`` with a retry delay, see :func:`~corral.libs.errors.outage`; anything else
unexpected to ``INTERNAL``, logged, never leaked), and writes one structured log line. One
wrapper rather than a chain of interceptors keeps the per-call overhead to a single extra
coroutine frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from google.protobuf.message import Message

from corral.libs.auth.caller import Caller, set_caller
from corral.libs.auth.jwt import TokenVerifier
from corral.libs.errors import (
    CorralError,
    FieldViolation,
    InvalidArgument,
    Unauthenticated,
    Unimplemented,
    outage,
)
from corral.libs.grpc.errors import code_for, internal_status, to_status
from corral.libs.grpc.metrics import RpcMetrics, rpc_metrics
from corral.libs.observability import annotate_span, current_trace_id
from corral.libs.validation import nul_fields

log = logging.getLogger("corral.rpc")

REQUEST_ID_KEY = "x-request-id"
QUIET_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
OUTAGE_LOG_SECONDS = 10.0


@dataclass
class CallInfo:
    """What hooks and the log line know about one call."""

    method: str
    request_id: str
    metadata: dict[str, str]
    peer: str
    caller: Caller | None = None
    started: float = field(default_factory=time.perf_counter)


class CallHook(Protocol):
    async def before(self, call: CallInfo) -> None:
        """Raise a ``CorralError`` to refuse the call; may set ``call.caller``."""
        ...


class AuthenticationHook:
    """Verifies ``authorization: Bearer <jwt>``; methods in ``public_methods`` need no token."""

    def __init__(self, verifier: TokenVerifier, public_methods: Iterable[str] = ()) -> None:
        self._verifier = verifier
        self._public = frozenset(public_methods)

    async def before(self, call: CallInfo) -> None:
        header = call.metadata.get("authorization", "")
        if not header:
            if call.method in self._public or call.method.startswith(QUIET_PREFIXES):
                return
            raise Unauthenticated("this method needs a bearer token", reason="TOKEN_MISSING")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(
                "the authorization header must be 'Bearer <token>'", reason="TOKEN_MALFORMED"
            )
        call.caller = await self._verifier.verify(token.strip())


if TYPE_CHECKING:  # the stubs are generic; the runtime classes are not subscriptable
    Handler = grpc.RpcMethodHandler[Any, Any]
    Context = grpc.aio.ServicerContext[Any, Any]
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    Context = grpc.aio.ServicerContext
    _ServerInterceptor = grpc.aio.ServerInterceptor


def _code(context: Context, default: grpc.StatusCode) -> grpc.StatusCode:
    """The code a handler set or aborted with (``None`` until one is set)."""
    code: object = context.code()
    return code if isinstance(code, grpc.StatusCode) else default


def _passing_bytes(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """A server stream may yield a response already encoded (``bytes``): a fan-out that sends
    one event to many watchers encodes it once instead of once per watcher."""
    if serializer is None:
        return None
    encode = serializer

    def serialize(message: Any) -> bytes:
        return message if isinstance(message, bytes) else encode(message)

    return serialize


class Undecodable:
    """Stands in for a request whose bytes are not a message of the method's type, so the call
    still passes authentication and then fails INVALID_ARGUMENT (grpc itself would answer
    INTERNAL before any of our code ran)."""


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:
            return Undecodable()

    return deserialize


def _status_name(code: grpc.StatusCode) -> str:
    return str(code.name)


class CorralServerInterceptor(_ServerInterceptor):
    def __init__(self, hooks: Sequence[CallHook] = (), *, metrics: bool = True) -> None:
        self._hooks = list(hooks)
        self._outages_logged: dict[str, float] = {}
        self._metrics: RpcMetrics | None = rpc_metrics("server") if metrics else None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return handler  # type: ignore[return-value]
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(method, handler.unary_stream),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=_passing_bytes(handler.response_serializer),
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(method, handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(method, handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _begin(self, method: str, context: Context) -> CallInfo:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        request_id = metadata.get(REQUEST_ID_KEY) or uuid.uuid4().hex
        call = CallInfo(
            method=method, request_id=request_id[:128], metadata=metadata, peer=context.peer()
        )
        context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
        return call

    async def _admit(self, call: CallInfo) -> None:
        for hook in self._hooks:
            await hook.before(call)
        # Each RPC runs in its own task (its own context copy), so nothing needs resetting.
        set_caller(call.caller)

    async def _fail(self, call: CallInfo, context: Context, exc: Exception) -> grpc.StatusCode:
        if isinstance(exc, CorralError):
            status = to_status(exc)
            code = code_for(exc)
        elif (mapped := outage(exc)) is not None:  # the database or Redis, not a bug
            self._outage(call, mapped, exc)
            status = to_status(mapped)
            code = code_for(mapped)
        elif isinstance(exc, NotImplementedError):  # a generated base servicer's method
            status = to_status(Unimplemented("this method is not implemented yet"))
            code = grpc.StatusCode.UNIMPLEMENTED
        else:
            log.exception(
                "unhandled error", extra={"request_id": call.request_id, "method": call.method}
            )
            status = internal_status()
            code = grpc.StatusCode.INTERNAL
        self._log(call, code)
        await context.abort(
            status.code,
            status.details,
            trailing_metadata=(*status.trailing_metadata, (REQUEST_ID_KEY, call.request_id)),
        )
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    def _outage(self, call: CallInfo, error: CorralError, exc: Exception) -> None:
        """One warning per reason every ``OUTAGE_LOG_SECONDS``, not one stack per call: an
        outage fails every call at once, and each call has its own log line anyway."""
        now = time.monotonic()
        if now - self._outages_logged.get(error.reason, -math.inf) < OUTAGE_LOG_SECONDS:
            return
        self._outages_logged[error.reason] = now
        log.warning(
            "backing store unavailable",
            extra={
                "reason": error.reason,
                "error": repr(exc)[:500],
                "request_id": call.request_id,
                "method": call.method,
            },
        )

    def _log(self, call: CallInfo, code: grpc.StatusCode) -> None:
        """How the call ended: its metrics, then its log line."""
        if self._metrics is not None:
            self._metrics.record(call.method, code, call.started)
        level = logging.DEBUG if call.method.startswith(QUIET_PREFIXES) else logging.INFO
        if not log.isEnabledFor(level):
            return
        log.log(
            level,
            "rpc",
            extra={
                "request_id": call.request_id,
                "method": call.method,
                "caller": call.caller.subject if call.caller else "",
                "organization": call.caller.organization if call.caller else "",
                "status": _status_name(code),
                "duration_ms": round((time.perf_counter() - call.started) * 1000, 3),
                "trace_id": current_trace_id(),
                "peer": call.peer,
            },
        )

    @contextlib.asynccontextmanager
    async def _served(self, method: str, context: Context, request: Any) -> AsyncIterator[None]:
        """Around one call: admit it (hooks), then log how it ended; expected errors become
        their rich status, anything else INTERNAL."""
        call = self._begin(method, context)
        try:
            await self._admit(call)
            if isinstance(request, Undecodable):
                raise InvalidArgument(
                    "the request message cannot be decoded (is it of this method's type?)"
                )
            if isinstance(request, Message) and (paths := nul_fields(request)):
                raise InvalidArgument(
                    "text fields must not contain NUL characters",
                    violations=[FieldViolation(p, "contains a NUL character") for p in paths],
                )
            annotate_span(request)
            yield
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            self._log(call, _code(context, grpc.StatusCode.UNKNOWN))
            raise
        except asyncio.CancelledError:
            self._log(call, grpc.StatusCode.CANCELLED)
            raise
        except Exception as exc:
            await self._fail(call, context, exc)
        else:
            self._log(call, _code(context, grpc.StatusCode.OK))

    def _wrap_unary(self, method: str, inner: Callable[..., Any]) -> Callable[..., Any]:
        async def behavior(request: Any, context: Context) -> Any:
            async with self._served(method, context, request):
                return await inner(request, context)

        return behavior

    def _wrap_stream(self, method: str, inner: Callable[..., Any]) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(inner):
            # A streaming handler that writes with ``context.write`` is awaited like a unary one.
            return self._wrap_unary(method, inner)

        async def behavior(request: Any, context: Context) -> AsyncIterator[Any]:
            async with self._served(method, context, request):
                async for response in inner(request, context):
                    yield response

        return behavior
