"""Typed clients for calling other Corral services.

Every call gets a deadline; idempotent methods (proto ``idempotency_level`` NO_SIDE_EFFECTS or
IDEMPOTENT) are retried on UNAVAILABLE by the channel's service config and nothing else is; the
caller's bearer token is forwarded so the callee checks the same identity.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor, descriptor_pb2
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from corral.libs.auth.caller import current_caller
from corral.libs.grpc.metrics import RpcMetrics, rpc_metrics

TokenProvider = Callable[[], str | None]

_IDEMPOTENT = {
    descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
    descriptor_pb2.MethodOptions.IDEMPOTENT,
}


def idempotent_methods(service: descriptor.ServiceDescriptor) -> list[str]:
    return [m.name for m in service.methods if m.GetOptions().idempotency_level in _IDEMPOTENT]


def service_config(
    services: Sequence[descriptor.ServiceDescriptor], *, max_attempts: int = 4
) -> str:
    """A gRPC service config JSON that retries only the idempotent methods of ``services``."""
    names = [{"service": s.full_name, "method": m} for s in services for m in idempotent_methods(s)]
    config: dict[str, Any] = {"methodConfig": []}
    if names:
        config["methodConfig"].append(
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        )
    return json.dumps(config)


def forward_caller_token() -> str | None:
    """The default token provider: the token of the call being served, if any."""
    caller = current_caller()
    return caller.token if caller else None


class _CallDetails(grpc.aio.ClientCallDetails):
    pass


class DeadlineAndTokenInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds a default deadline to unary calls and ``authorization`` to every call."""

    def __init__(self, default_timeout: float, token_provider: TokenProvider | None) -> None:
        self._timeout = default_timeout
        self._token_provider = token_provider

    def _details(self, details: grpc.aio.ClientCallDetails, *, streaming: bool) -> _CallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        token = self._token_provider() if self._token_provider else None
        if token and not metadata.get_all("authorization"):
            metadata.add("authorization", f"Bearer {token}")
        timeout = details.timeout
        if timeout is None and not streaming:
            timeout = self._timeout
        return _CallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details, streaming=False), request)

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details, streaming=True), request)


class MetricsInterceptor(
    grpc.aio.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.aio.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Counts and times every call (``corral_rpc_client_*``) by service, method and code; a
    stream is timed until it ends."""

    def __init__(self, instruments: RpcMetrics | None = None) -> None:
        self._metrics = instruments or rpc_metrics("client")
        self._pending: set[asyncio.Task[None]] = set()

    @staticmethod
    def _method(details: grpc.aio.ClientCallDetails) -> str:
        method: str | bytes = details.method
        return method.decode() if isinstance(method, bytes) else method

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        started = time.perf_counter()
        method = self._method(client_call_details)
        try:
            call = await continuation(client_call_details, request)
            await call  # the caller awaits it again (the result is kept) or reads its metadata
        except grpc.aio.AioRpcError as exc:
            self._metrics.record(method, exc.code(), started)
            raise
        except asyncio.CancelledError:
            self._metrics.record(method, grpc.StatusCode.CANCELLED, started)
            raise
        self._metrics.record(method, grpc.StatusCode.OK, started)
        return call

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        started = time.perf_counter()
        method = self._method(client_call_details)
        call = await continuation(client_call_details, request)

        async def record() -> None:
            self._metrics.record(method, await call.code(), started)

        def done(_: Any) -> None:
            task = asyncio.ensure_future(record())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

        call.add_done_callback(done)
        return call


class _StreamSide(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    """The unary-stream half of an interceptor that implements both: grpc.aio files an
    interceptor under its first matching kind only, so the streaming half needs its own."""

    def __init__(self, both: Any) -> None:
        self._both = both

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await self._both.intercept_unary_stream(continuation, client_call_details, request)


def create_channel(
    target: str,
    services: Sequence[descriptor.ServiceDescriptor] = (),
    *,
    default_timeout: float = 10.0,
    token_provider: TokenProvider | None = forward_caller_token,
    tracing: bool = True,
    metrics: bool = True,
    credentials: grpc.ChannelCredentials | None = None,
) -> grpc.aio.Channel:
    """A channel to another service with retries, deadlines and token forwarding; over TLS
    with ``credentials`` (:func:`corral.libs.tls.channel_credentials`), else plaintext.

    Streaming calls get no default deadline: a session event stream may last hours.
    """
    both: list[Any] = [DeadlineAndTokenInterceptor(default_timeout, token_provider)]
    if metrics:
        both.append(MetricsInterceptor())
    interceptors: list[Any] = [*both, *(_StreamSide(i) for i in both)]
    if tracing:
        interceptors.extend(aio_client_interceptors())  # type: ignore[no-untyped-call]
    options = [
        ("grpc.service_config", service_config(services)),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
    ]
    if credentials is not None:
        return grpc.aio.secure_channel(
            target, credentials, options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
