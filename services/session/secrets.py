"""MCP secrets at rest: sealed with the deployment's key ring, opened only for a turn.

A session's (or an organisation's policy's) ``secret_env`` / ``secret_headers`` values are
stored as ``corral-sealed:v1:<owner>:<base64>`` strings inside the serialised options, where the
base64 is a :meth:`KeyRing.seal` value (it names the key that sealed it, so values sealed before
a rotation still open) and ``<owner>`` says whose it is (``s`` a session's, ``p`` the policy's).
Each value is sealed with a context naming its row, server, kind and key
(``sessions/{id}:mcp_servers/{server}/secret_env/{KEY}``), so a value copied anywhere else does
not open.

Nothing opens them but :class:`UnsealingRuntime`, which wraps the runtime port and opens the
values of a :class:`~.ports.TurnRequest` just before the call. A value stored before secrets
were sealed (a development database) has no prefix: it is passed on as it is, and sealed the
next time the session's options are written.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from corral.libs.crypto import KeyRing, KeyRingError
from corral.libs.errors import FailedPrecondition
from corral.runtime.v1 import agent_options_pb2 as runtime_options
from corral.runtime.v1 import runtime_event_pb2 as rt
from corral.services.session.ports import Runtime, TurnRequest
from corral.session.v1 import agent_options_pb2 as opts
from corral.session.v1 import agent_policy_pb2

PREFIX = "corral-sealed:v1:"
SESSION_OWNER = "s"
POLICY_OWNER = "p"


def is_sealed(value: str) -> bool:
    return value.startswith(PREFIX)


def _context(owner: str, server: str, kind: str, key: str) -> str:
    return f"{owner}:mcp_servers/{server}/{kind}/{key}"


def _owner_name(owner: str, session: str, organization: str) -> str:
    return session if owner == SESSION_OWNER else f"{organization}/agentPolicy"


class Secrets:
    """Seals and opens MCP secret values with ``key_ring`` (its primary key seals)."""

    def __init__(self, key_ring: KeyRing) -> None:
        self._ring = key_ring

    def seal_session(
        self, options: opts.AgentOptions, session: str, *, only_plain: bool = False
    ) -> opts.AgentOptions:
        """A copy of ``options`` with every secret value sealed for ``session``
        (``sessions/{id}``). ``only_plain``: leave values already sealed (stored data being
        rewritten); without it every value is sealed, whatever it looks like (client input)."""
        out = opts.AgentOptions()
        out.CopyFrom(options)
        self._seal_servers(out.mcp_servers, SESSION_OWNER, session, only_plain)
        return out

    def seal_policy(self, policy: agent_policy_pb2.AgentPolicy, organization: str) -> None:
        """Seal, in place, the secret values of a policy's servers as sent by an admin."""
        self._seal_servers(
            policy.mcp_servers, POLICY_OWNER, f"{organization}/agentPolicy", only_plain=False
        )

    def reseal_session(
        self, options: opts.AgentOptions, parent: str, child: str
    ) -> opts.AgentOptions:
        """A fork's copy of its parent's options: each value opened for ``parent`` and sealed
        for ``child`` (a sealed value opens only in its own row)."""
        out = opts.AgentOptions()
        out.CopyFrom(options)
        for server in out.mcp_servers:
            for kind, values in _secret_maps(server):
                for key, value in list(values.items()):
                    plain = (
                        self.open(value, _context(parent, server.name, kind, key))
                        if is_sealed(value)
                        else value
                    )
                    values[key] = self._seal(
                        plain, SESSION_OWNER, _context(child, server.name, kind, key)
                    )
        return out

    def open(self, value: str, context: str) -> str:
        """The plaintext of a stored value (``PREFIX`` + owner + ``:`` + base64)."""
        encoded = value.removeprefix(PREFIX).partition(":")[2]
        try:
            return self._ring.open(base64.b64decode(encoded, validate=True), context).decode()
        except (KeyRingError, binascii.Error, UnicodeDecodeError) as exc:
            raise FailedPrecondition(
                "a stored MCP secret cannot be opened with this deployment's key ring"
                " (a key was removed too early?); set the secret again",
                reason="SECRET_UNAVAILABLE",
            ) from exc

    def open_for_turn(self, request: TurnRequest) -> TurnRequest:
        """``request`` with its sealed values opened: a session's with the session's context,
        the policy's with the organisation's."""
        options = runtime_options.AgentOptions()
        options.CopyFrom(request.options)
        for server in options.mcp_servers:
            kind, values = (
                ("secret_env", server.stdio.env)
                if server.HasField("stdio")
                else ("secret_headers", server.http.headers)
            )
            for key, value in list(values.items()):
                if not is_sealed(value):
                    continue
                owner = value.removeprefix(PREFIX).partition(":")[0]
                name = _owner_name(owner, request.session, request.organization)
                values[key] = self.open(value, _context(name, server.name, kind, key))
        return dataclasses.replace(request, options=options)

    def _seal_servers(self, servers: Any, owner: str, name: str, only_plain: bool) -> None:
        for server in servers:
            for kind, values in _secret_maps(server):
                for key, value in list(values.items()):
                    if only_plain and is_sealed(value):
                        continue
                    values[key] = self._seal(value, owner, _context(name, server.name, kind, key))

    def _seal(self, plain: str, owner: str, context: str) -> str:
        sealed = self._ring.seal(plain.encode(), context)
        return f"{PREFIX}{owner}:{base64.b64encode(sealed).decode()}"


def _secret_maps(server: opts.McpServer) -> list[tuple[str, Any]]:
    if server.HasField("stdio"):
        return [("secret_env", server.stdio.secret_env)]
    if server.HasField("http"):
        return [("secret_headers", server.http.secret_headers)]
    return []


class UnsealingRuntime:
    """The runtime port, with a turn's sealed secrets opened on the way in (the one place
    they are decrypted). Every other call passes through unchanged."""

    def __init__(self, runtime: Runtime, secrets: Secrets) -> None:
        self._runtime = runtime
        self._secrets = secrets

    def run_turn(self, request: TurnRequest, **kwargs: Any) -> AsyncIterator[rt.RuntimeEvent]:
        return self._runtime.run_turn(self._secrets.open_for_turn(request), **kwargs)

    async def interrupt(self, *args: Any, **kwargs: Any) -> None:
        await self._runtime.interrupt(*args, **kwargs)

    async def decide(self, *args: Any, **kwargs: Any) -> None:
        await self._runtime.decide(*args, **kwargs)

    async def release(self, *args: Any, **kwargs: Any) -> None:
        await self._runtime.release(*args, **kwargs)
