"""Stdio MCP servers with secrets only they can read.

Given to the CLI as stdio servers, an MCP server's environment (its secrets) would sit in the
CLI's arguments and be inherited by a child of the CLI, both readable by the agent's own tools.
Instead the runtime starts each stdio server itself, in a sandbox of its own (``sandbox.py``:
its own process table, a private home, the session's workspace), with its environment, and
gives the CLI an in-process SDK MCP server of the same name that forwards ``tools/list`` and
``tools/call`` to it over stdio. The CLI's configuration then names the server only.

Each bridge lives in a task of its own (mcp's stdio client must be closed by the task that
opened it) from ``start`` until ``close``. A server that does not start is left out, as the CLI
leaves out a server it cannot reach: the agent goes on without its tools.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from claude_agent_sdk._internal._mcp_compat import build_tool_server
from claude_agent_sdk.types import McpSdkServerConfig
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import CallToolResult, PaginatedRequestParams, TextContent, Tool

log = logging.getLogger("corral.runtime.mcp")

START_SECONDS = 30.0
STOP_SECONDS = 5.0


class McpBridge:
    """One stdio MCP server run by the runtime, as an SDK MCP server for the CLI."""

    def __init__(self, name: str, params: StdioServerParameters, *, home: Path | None) -> None:
        self.name = name
        self._params = params
        self._home = home  # its private directory, removed on close
        self._session: ClientSession | None = None
        self._tools: list[Tool] = []
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> McpSdkServerConfig | None:
        """Start the server and list its tools; None if it did not come up."""
        self._task = asyncio.create_task(self._serve(), name=f"mcp-bridge:{self.name}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), START_SECONDS)
        if self._session is None:
            log.warning("stdio MCP server %r did not start; the agent goes without it", self.name)
            await self.close()
            return None
        server = build_tool_server(self.name, "1.0.0", self._tools, self._call)
        return McpSdkServerConfig(type="sdk", name=self.name, instance=server)

    async def _serve(self) -> None:
        try:
            with open(os.devnull, "w") as errlog:  # noqa: ASYNC230 - opening /dev/null
                async with (
                    stdio_client(self._params, errlog=errlog) as (read, write),
                    ClientSession(read, write) as session,
                ):
                    await session.initialize()
                    self._tools = await _all_tools(session)
                    self._session = session
                    self._ready.set()
                    await self._stop.wait()
        except Exception:
            log.warning("stdio MCP server %r failed", self.name, exc_info=True)
        finally:
            self._session = None
            self._ready.set()

    async def _call(self, tool: str, arguments: dict[str, Any]) -> CallToolResult:
        session = self._session
        if session is None:
            return _error(f"the MCP server {self.name!r} is not running")
        return await session.call_tool(tool, arguments)

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), STOP_SECONDS)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        if self._home is not None:
            await asyncio.to_thread(shutil.rmtree, self._home, True)


async def _all_tools(session: ClientSession) -> list[Tool]:
    tools: list[Tool] = []
    cursor: str | None = None
    while True:
        page = await session.list_tools(
            params=PaginatedRequestParams(cursor=cursor) if cursor else None
        )
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools


def _error(message: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)


def server_parameters(
    command: str,
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    sandbox: Sequence[str],
    cwd: Path,
) -> StdioServerParameters:
    """How to start the server: under ``sandbox`` (a command line ending before the program),
    if there is one."""
    program = [*sandbox, command, *args]
    return StdioServerParameters(command=program[0], args=program[1:], env=dict(env), cwd=str(cwd))


async def close_all(bridges: Sequence[McpBridge]) -> None:
    await asyncio.gather(*(bridge.close() for bridge in bridges), return_exceptions=True)
