"""How every call of a ``Client`` goes: with the bearer token (refreshed before it expires, and
once more if the server says it has), retried with backoff on ``UNAVAILABLE`` when that is safe,
and failed with an ``ApiError`` that carries the ``ErrorInfo`` reason.

A call is safe to repeat when its method is marked ``NO_SIDE_EFFECTS`` or ``IDEMPOTENT`` in the
protos (reads), or when its request carries a ``request_id`` (creates and sends: the server
answers a repeat with the first result, AIP-155). Anything else that meets ``UNAVAILABLE`` is
raised at once: it may or may not have happened.
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import Message

from corral.client.errors import api_error
from corral.identity.v1 import identity_service_pb2 as identity

_IDENTITY = identity.DESCRIPTOR.services_by_name["IdentityService"].full_name
# Methods that take no access token: sending an expired one would only get them refused.
PUBLIC = frozenset(
    f"/{_IDENTITY}/{name}"
    for name in ("Login", "RefreshToken", "ExchangeApiKey", "Logout", "GetJwks")
)
_IDEMPOTENT = {
    descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
    descriptor_pb2.MethodOptions.IDEMPOTENT,
}


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter; ``RetryInfo`` from the server is a floor."""

    attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def delay(self, attempt: int, hint: float | None = None) -> float:
        """The pause before retry number ``attempt`` (1, 2, ...)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return max(hint or 0.0, random.uniform(0, ceiling))  # jitter, not a secret


@functools.cache
def _idempotent(method: str) -> bool:
    try:
        found = descriptor_pool.Default().FindMethodByName(method.strip("/").replace("/", "."))
    except KeyError:
        return False
    return found.GetOptions().idempotency_level in _IDEMPOTENT


def is_safe(method: str, request: Message) -> bool:
    """Whether repeating this call cannot do twice what it does once."""
    if _idempotent(method):
        return True
    fields = request.DESCRIPTOR.fields_by_name
    return "request_id" in fields and bool(getattr(request, "request_id"))  # noqa: B009


class Tokens:
    """The caller's access token, and the refresh token that renews it before it expires."""

    margin = 30.0  # refresh this long before the access token expires

    def __init__(self, access_token: str | None, clock: Callable[[], float] = time.time) -> None:
        self.access_token = access_token or ""
        self.refresh_token = ""
        self.expires_at = float("inf")
        self.refresher: Callable[[str], Awaitable[tuple[str, str, float]]] | None = None
        self._clock = clock
        self._lock = asyncio.Lock()

    def use(self, access_token: str, refresh_token: str, expires_at: float) -> None:
        self.access_token, self.refresh_token, self.expires_at = (
            access_token,
            refresh_token,
            expires_at,
        )

    async def bearer(self) -> str:
        if self.refresh_token and self._clock() >= self.expires_at - self.margin:
            await self.refresh(self.access_token)
        return self.access_token

    async def refresh(self, stale: str) -> bool:
        """Renew the access token ``stale`` (once, however many calls ask at the same time);
        False when there is nothing to renew it with."""
        async with self._lock:
            if self.access_token != stale:
                return True  # another call renewed it meanwhile
            if not self.refresh_token or self.refresher is None:
                return False
            self.use(*await self.refresher(self.refresh_token))
            return True


class _Authorizer:
    def __init__(self, tokens: Tokens) -> None:
        self._tokens = tokens

    async def authorized(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        """The call's details with ``authorization: Bearer`` (none for public methods)."""
        method = _name(details.method)
        token = "" if method in PUBLIC else await self._tokens.bearer()
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        if token and "authorization" not in metadata:
            metadata.add("authorization", f"Bearer {token}")
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class UnaryPolicy(_Authorizer, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Unary calls: the token, one renewal on TOKEN_EXPIRED, retries, ApiError."""

    def __init__(
        self,
        tokens: Tokens,
        retry: RetryPolicy,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(tokens)
        self._retry = retry
        self._sleep = sleep

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        method = _name(client_call_details.method)
        attempt, refreshed = 0, False
        while True:
            details = await self.authorized(client_call_details)
            try:
                return await (await continuation(details, request))
            except grpc.aio.AioRpcError as exc:
                error = api_error(exc)
            attempt += 1
            if error.reason == "TOKEN_EXPIRED" and method not in PUBLIC and not refreshed:
                refreshed = await self._tokens.refresh(_token_of(details))
                if refreshed:
                    continue
            retry = error.code == grpc.StatusCode.UNAVAILABLE and is_safe(method, request)
            if retry and attempt < self._retry.attempts:
                await self._sleep(self._retry.delay(attempt, error.retry_after))
                continue
            raise error


class StreamPolicy(_Authorizer, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    """Server streams: the token only; their owner (Client.events) resumes them by cursor.
    (grpc.aio files an interceptor under one kind only, hence two classes.)"""

    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(await self.authorized(client_call_details), request)


def interceptors(tokens: Tokens, retry: RetryPolicy) -> list[Any]:
    """What every channel of a ``Client`` carries."""
    return [UnaryPolicy(tokens, retry), StreamPolicy(tokens)]


def _name(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


def _token_of(details: grpc.aio.ClientCallDetails) -> str:
    for key, value in details.metadata or ():
        if key == "authorization":
            return str(value).removeprefix("Bearer ")
    return ""
