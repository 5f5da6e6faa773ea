"""``Client``: Corral's API from Python, typed, over the generated stubs.

One address (the edge, ``127.0.0.1:8080`` under ``make run``) reaches every service; a mapping
``{"identity": ..., "session": ...}`` reaches services directly. Sign in with ``login`` (email
and password; the access token is then renewed with the refresh token before it expires) or
``exchange_api_key`` (service accounts), or pass a ``token``.

The typed stubs (``identity``, ``sessions``, ``tasks``, ``storage``) carry the call policy of
``corral.client.calls``; the helpers below cover what most callers do with sessions, and
``events`` follows a session's stream across reconnects without a gap or a duplicate.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc

from corral.client.calls import RetryPolicy, Tokens, interceptors
from corral.client.errors import ApiError, api_error
from corral.identity.v1 import identity_service_pb2 as ipb
from corral.identity.v1 import identity_service_pb2_grpc as irpc
from corral.session.v1 import (
    agent_options_pb2,
    event_pb2,
    permission_pb2,
    session_pb2,
    turn_pb2,
)
from corral.session.v1 import session_service_pb2 as spb
from corral.session.v1 import session_service_pb2_grpc as srpc
from corral.storage.v1 import storage_service_pb2_grpc as storage_rpc
from corral.task.v1 import task_service_pb2_grpc as task_rpc

SERVICES = ("identity", "session", "task", "storage")
# Pings on a quiet connection find a server that went away (heartbeats come every 15 s).
CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
)
Busy = spb.SendMessageRequest.BusyStrategy


class Client:
    """``async with Client("127.0.0.1:8080") as corral: await corral.login(email, password)``"""

    def __init__(
        self,
        target: str | Mapping[str, str],
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
    ) -> None:
        self._targets = {n: target for n in SERVICES} if isinstance(target, str) else {**target}
        self._credentials = credentials
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.tokens = Tokens(token)
        self.tokens.refresher = self._refresh
        self._interceptors = interceptors(self.tokens, self.retry)
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close(None)

    def channel(self, service: str) -> grpc.aio.Channel:
        """The channel to ``service`` (one per distinct address)."""
        address = self._targets.get(service)
        if address is None:
            raise ValueError(f"no address for the {service} service")
        if address not in self._channels:
            options, chain = CHANNEL_OPTIONS, self._interceptors
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(address, options=options, interceptors=chain)
            else:
                channel = grpc.aio.secure_channel(
                    address, self._credentials, options=options, interceptors=chain
                )
            self._channels[address] = channel
        return self._channels[address]

    @property
    def identity(self) -> irpc.IdentityServiceAsyncStub:
        return irpc.IdentityServiceStub(self.channel("identity"))

    @property
    def sessions(self) -> srpc.SessionServiceAsyncStub:
        return srpc.SessionServiceStub(self.channel("session"))

    @property
    def tasks(self) -> task_rpc.TaskServiceAsyncStub:
        return task_rpc.TaskServiceStub(self.channel("task"))

    @property
    def storage(self) -> storage_rpc.StorageServiceAsyncStub:
        return storage_rpc.StorageServiceStub(self.channel("storage"))

    # --- signing in ----------------------------------------------------------------------------

    async def login(self, email: str, password: str) -> ipb.LoginResponse:
        """Sign in; later calls carry the access token, renewed before it expires."""
        reply = await self.identity.Login(
            ipb.LoginRequest(email=email, password=password), timeout=self.timeout
        )
        self._use(reply.token)
        return reply

    async def exchange_api_key(self, api_key: str) -> ipb.ExchangeApiKeyResponse:
        """Sign in as a service account (no refresh token: exchange the key again later)."""
        reply = await self.identity.ExchangeApiKey(
            ipb.ExchangeApiKeyRequest(api_key=api_key), timeout=self.timeout
        )
        self._use(reply.token)
        return reply

    def _use(self, grant: ipb.TokenGrant) -> None:
        expires = grant.access_token_expire_time
        at = expires.ToNanoseconds() / 1e9 if grant.HasField("access_token_expire_time") else 0
        self.tokens.use(grant.access_token, grant.refresh_token, at or float("inf"))

    async def _refresh(self, refresh_token: str) -> tuple[str, str, float]:
        reply = await self.identity.RefreshToken(
            ipb.RefreshTokenRequest(refresh_token=refresh_token), timeout=self.timeout
        )
        grant = reply.token
        return (
            grant.access_token,
            grant.refresh_token,
            grant.access_token_expire_time.ToNanoseconds() / 1e9,
        )

    # --- sessions ------------------------------------------------------------------------------

    async def create_session(
        self,
        display_name: str = "",
        *,
        agent_options: agent_options_pb2.AgentOptions | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> session_pb2.Session:
        session = session_pb2.Session(
            display_name=display_name, agent_options=agent_options, labels=dict(labels or {})
        )
        reply = await self.sessions.CreateSession(
            spb.CreateSessionRequest(session=session, request_id=str(uuid.uuid4())),
            timeout=self.timeout,
        )
        return reply.session

    async def get_session(self, name: str) -> session_pb2.Session:
        reply = await self.sessions.GetSession(
            spb.GetSessionRequest(name=name), timeout=self.timeout
        )
        return reply.session

    async def list_sessions(
        self, *, filter: str = "", order_by: str = "", page_size: int = 100
    ) -> AsyncIterator[session_pb2.Session]:
        """Every session the caller can read, page after page."""
        token = ""
        while True:
            reply = await self.sessions.ListSessions(
                spb.ListSessionsRequest(
                    page_size=page_size, page_token=token, filter=filter, order_by=order_by
                ),
                timeout=self.timeout,
            )
            for session in reply.sessions:
                yield session
            token = reply.next_page_token
            if not token:
                return

    async def archive_session(self, name: str) -> session_pb2.Session:
        reply = await self.sessions.ArchiveSession(
            spb.ArchiveSessionRequest(name=name), timeout=self.timeout
        )
        return reply.session

    async def delete_session(self, name: str, *, force: bool = False) -> None:
        await self.sessions.DeleteSession(
            spb.DeleteSessionRequest(name=name, force=force), timeout=self.timeout
        )

    async def send_message(
        self, session: str, text: str, *, busy: Busy.ValueType = Busy.BUSY_STRATEGY_ENQUEUE
    ) -> turn_pb2.Turn:
        """Start (or queue) a turn; returns it at once (its events follow on the stream)."""
        reply = await self.sessions.SendMessage(
            spb.SendMessageRequest(
                session=session, text=text, request_id=str(uuid.uuid4()), busy_strategy=busy
            ),
            timeout=self.timeout,
        )
        return reply.turn

    async def interrupt(self, session: str) -> None:
        await self.sessions.InterruptTurn(
            spb.InterruptTurnRequest(session=session), timeout=self.timeout
        )

    async def respond(
        self, session: str, permission_request_id: str, allow: bool, message: str = ""
    ) -> None:
        """Answer an agent's permission request (a ``permission_request`` event)."""
        decision = permission_pb2.PermissionDecision
        await self.sessions.RespondToPermission(
            spb.RespondToPermissionRequest(
                session=session,
                permission_request_id=permission_request_id,
                decision=decision.DECISION_ALLOW if allow else decision.DECISION_DENY,
                message=message,
            ),
            timeout=self.timeout,
        )

    # --- events --------------------------------------------------------------------------------

    async def events(
        self, session: str, after: int = 0, *, heartbeats: bool = False, filter: str = ""
    ) -> AsyncIterator[event_pb2.SessionEvent]:
        """The session's events after sequence ``after``, then live ones, for as long as the
        caller reads. A dropped stream (the server restarting, a network blip: ``UNAVAILABLE``)
        is reopened after the last sequence seen, with backoff, so nothing is missed or
        repeated; it ends when the server ends it (an archived session's history is complete).
        Gives up after ``retry.attempts`` reconnects in a row that delivered nothing."""
        cursor, failures = after, 0
        while True:
            call = self.sessions.StreamSessionEvents(
                spb.StreamSessionEventsRequest(
                    session=session, after_sequence=cursor, filter=filter
                )
            )
            try:
                async for response in call:
                    event = response.event
                    failures = 0
                    if event.HasField("heartbeat"):
                        if heartbeats:
                            yield event
                        continue
                    if event.sequence <= cursor:
                        continue
                    cursor = event.sequence
                    yield event
                return
            except grpc.aio.AioRpcError as exc:
                error = api_error(exc)
            finally:
                call.cancel()
            if error.reason == "TOKEN_EXPIRED" and await self.tokens.refresh(
                self.tokens.access_token
            ):
                continue
            failures += 1
            if error.code != grpc.StatusCode.UNAVAILABLE or failures >= self.retry.attempts:
                raise error
            await asyncio.sleep(self.retry.delay(failures, error.retry_after))

    async def turn_events(
        self, session: str, turn: turn_pb2.Turn
    ) -> AsyncIterator[event_pb2.SessionEvent]:
        """The events of one turn (from ``send_message``), ending with its ``turn_result``."""
        turn_id = turn.name.rsplit("/", 1)[-1]
        async for event in self.events(session, after=max(0, turn.first_sequence - 1)):
            if event.turn_id != turn_id:
                continue
            yield event
            if event.HasField("turn_result"):
                return


__all__ = ["ApiError", "Client", "RetryPolicy"]
