"""The Claude Agent SDK behind the runtime's port (``sdk``): one ``ClaudeSDKClient`` per process.

It turns an :class:`~corral.services.runtime.sdk.AgentSpec` into ``ClaudeAgentOptions`` (the
CLI runs through ``process``'s launcher, with only the environment the session allows), wires
the PreToolUse hook and ``can_use_tool`` to a :class:`~corral.services.runtime.sdk.ToolGate`,
runs the session's stdio MCP servers itself (``mcp_bridge``: their secrets stay out of the
CLI's reach), and turns the SDK's errors into the runtime's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import claude_agent_sdk
from claude_agent_sdk import (
    ClaudeAgentOptions,
    ClaudeSDKClient,
    ClaudeSDKError,
    CLIConnectionError,
    HookContext,
    HookInput,
    HookJSONOutput,
    HookMatcher,
    PermissionResult,
    PermissionResultAllow,
    PermissionResultDeny,
    ProcessError,
    ResultError,
    ToolPermissionContext,
)
from claude_agent_sdk.types import McpSdkServerConfig, McpServerConfig, PermissionMode

from corral.runtime.v1 import agent_options_pb2 as options_pb
from corral.services.runtime import mcp_bridge, orphans, process, sandbox
from corral.services.runtime.domain import (
    Behavior,
    DecisionSource,
    ProcessFailed,
    TranscriptNotFound,
)
from corral.services.runtime.sandbox import SandboxPolicy
from corral.services.runtime.sdk import AgentProcessLost, AgentSpec, ToolGate

log = logging.getLogger("corral.runtime")

_MODES: dict[int, PermissionMode] = {
    options_pb.AgentOptions.PERMISSION_MODE_UNSPECIFIED: "default",
    options_pb.AgentOptions.PERMISSION_MODE_DEFAULT: "default",
    options_pb.AgentOptions.PERMISSION_MODE_ACCEPT_EDITS: "acceptEdits",
    options_pb.AgentOptions.PERMISSION_MODE_PLAN: "plan",
    options_pb.AgentOptions.PERMISSION_MODE_DONT_ASK: "dontAsk",
    options_pb.AgentOptions.PERMISSION_MODE_BYPASS_PERMISSIONS: "bypassPermissions",
}


class ClaudeClient:
    """A connected ``ClaudeSDKClient``, as an :class:`~corral.services.runtime.sdk.AgentClient`."""

    def __init__(
        self, client: ClaudeSDKClient, bridges: Sequence[mcp_bridge.McpBridge] = ()
    ) -> None:
        self._client = client
        self._bridges = list(bridges)  # its stdio MCP servers, run by the runtime

    @property
    def pid(self) -> int | None:
        """The CLI's pid. The SDK keeps its subprocess private; read it defensively."""
        transport = getattr(self._client, "_transport", None)
        child = getattr(transport, "_process", None)
        pid = getattr(child, "pid", None)
        return pid if isinstance(pid, int) else None

    async def query(self, prompt: str) -> None:
        with _lost():
            await self._client.query(prompt)

    async def receive_messages(self) -> AsyncIterator[Any]:
        with _lost():
            async for message in self._client.receive_messages():
                yield message

    async def interrupt(self) -> None:
        await self._client.interrupt()

    async def disconnect(self) -> None:
        try:
            await self._client.disconnect()
        finally:
            await mcp_bridge.close_all(self._bridges)


@contextlib.contextmanager
def _lost() -> Iterator[None]:
    """The SDK's "the process is gone" errors as :class:`AgentProcessLost`, with a message that
    says what happened and never what the CLI printed."""
    try:
        yield
    except ResultError:
        raise
    except ProcessError as exc:
        raise AgentProcessLost(
            f"the agent process exited unexpectedly (exit code {exc.exit_code})"
        ) from exc
    except CLIConnectionError as exc:
        raise AgentProcessLost("the agent process went away") from exc


class ClaudeSdk:
    """Starts CLI processes for the runtime. ``model_env``: ANTHROPIC_BASE_URL / _API_KEY;
    ``scrub_tool_env``: have the CLI keep them from its tools (it needs bubblewrap for it);
    ``sandbox``: how agents are confined (None: they are not, which only an operator chooses)."""

    def __init__(
        self,
        root: Path,
        model_env: Mapping[str, str],
        *,
        scrub_tool_env: bool,
        sandbox: SandboxPolicy | None = None,
    ) -> None:
        self._root = root
        self._bin = root / "bin"
        self._mcp_homes = root / "mcp"  # the private homes of the stdio MCP servers
        self._model_env = dict(model_env)
        self._scrub = scrub_tool_env
        self._sandbox = sandbox
        self._cli: Path | None = None  # the CLI the launcher runs, and the launcher
        self._launcher: Path | None = None
        self._owner: orphans.Owner | None = None  # set by start: what every agent carries
        self._guard: orphans.Guard | None = None
        self.sdk_version: str = claude_agent_sdk.__version__
        self.cli_version = ""

    async def start(self) -> None:
        """Kill what a previous runtime on this root left running, start this one's guard,
        and install the launcher (``orphans``)."""
        self._owner = orphans.Owner.of_this_process(self._root)
        await asyncio.to_thread(orphans.reap, self._owner)
        self._guard = orphans.Guard.start(self._owner)
        self._cli = await asyncio.to_thread(process.bundled_cli)
        self._launcher = await asyncio.to_thread(process.install_launcher, self._bin)
        self.cli_version = await asyncio.to_thread(process.cli_version, self._cli)

    async def close(self) -> None:
        """After the last agent stopped: the guard ends, killing whatever outlived it."""
        if self._guard is not None:
            await self._guard.close()
            self._guard = None

    async def connect(self, spec: AgentSpec, gate: ToolGate) -> ClaudeClient:
        if self._sandbox is not None:
            # The session's two directories become the agent user's (files the runtime wrote
            # there, e.g. a fork's copies, included).
            await asyncio.to_thread(
                sandbox.prepare,
                self._sandbox,
                workspace=spec.workspace,
                config_dir=spec.config_dir,
            )
        bridges = await self._bridge_mcp_servers(spec)
        try:
            options = self.options(spec, gate, {b.name: c for b, c in bridges})
            client = ClaudeSDKClient(options)
            await client.connect()
        except ClaudeSDKError as exc:
            await mcp_bridge.close_all([bridge for bridge, _ in bridges])
            log.warning(
                "agent process failed to start", extra={"session": spec.session_id}, exc_info=True
            )
            if "No conversation found" in str(exc):
                raise TranscriptNotFound(f"the transcript {spec.resume!r} was not found") from exc
            raise ProcessFailed("the agent process could not be started") from exc
        except BaseException:
            await mcp_bridge.close_all([bridge for bridge, _ in bridges])
            raise
        return ClaudeClient(client, [bridge for bridge, _ in bridges])

    async def _bridge_mcp_servers(
        self, spec: AgentSpec
    ) -> list[tuple[mcp_bridge.McpBridge, McpSdkServerConfig]]:
        """Start the session's stdio MCP servers (each in its own sandbox, with its own
        environment) and bridge them; those that do not start are left out."""
        servers = [s for s in spec.options.mcp_servers if s.WhichOneof("transport") == "stdio"]
        bridges = await asyncio.gather(
            *(self._bridge(spec, index, server) for index, server in enumerate(servers))
        )
        configs = await asyncio.gather(*(bridge.start() for bridge in bridges))
        return [(b, c) for b, c in zip(bridges, configs, strict=True) if c is not None]

    async def _bridge(
        self, spec: AgentSpec, index: int, server: options_pb.McpServer
    ) -> mcp_bridge.McpBridge:
        home = self._mcp_homes / f"{spec.tag}-{index}"
        command = shutil.which(server.stdio.command, path=os.environ.get("PATH")) or (
            server.stdio.command
        )
        env = {name: os.environ[name] for name in process.PASSTHROUGH if name in os.environ}
        env.update(server.stdio.env)
        env.update({"HOME": str(home), process.TAG_VARIABLE: spec.tag, **self._marks()})
        argv: list[str] = []
        if self._sandbox is not None:
            env["TMPDIR"] = "/tmp"
            await asyncio.to_thread(
                sandbox.prepare, self._sandbox, workspace=spec.workspace, config_dir=home
            )
            argv = sandbox.command(
                self._sandbox,
                workspace=spec.workspace,
                config_dir=home,
                cli=Path(command),
                hostname="corral-mcp",
            )
        else:
            await asyncio.to_thread(home.mkdir, mode=0o700, parents=True, exist_ok=True)
        params = mcp_bridge.server_parameters(
            command, server.stdio.args, env, sandbox=argv, cwd=spec.workspace
        )
        return mcp_bridge.McpBridge(server.name, params, home=home)

    def options(
        self,
        spec: AgentSpec,
        gate: ToolGate,
        bridged: Mapping[str, McpSdkServerConfig] | None = None,
    ) -> ClaudeAgentOptions:
        """The CLI's options. Stdio MCP servers reach it only as ``bridged`` SDK servers (the
        runtime runs them): their environments never enter the CLI's configuration."""
        if self._cli is None or self._launcher is None:
            raise RuntimeError("ClaudeSdk.start() was not awaited")
        opts = spec.options
        mode = _MODES.get(opts.permission_mode, "default")
        runtime_env = {
            **self._model_env,
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            # Keeps the model credentials from the CLI's tools; the CLI needs bubblewrap for it.
            "CLAUDE_CODE_SUBPROCESS_ENV_SCRUB": "1" if self._scrub else "0",
            "CLAUDE_CONFIG_DIR": str(spec.config_dir),
            "HOME": str(spec.config_dir),
            process.TAG_VARIABLE: spec.tag,
            **self._marks(),
        }
        if mode == "bypassPermissions":
            runtime_env["IS_SANDBOX"] = "1"
        resume, new_id = spec.resume, spec.new_transcript_id
        return ClaudeAgentOptions(
            model=spec.model,
            system_prompt=_system_prompt(opts),
            allowed_tools=list(opts.allowed_tools),
            disallowed_tools=list(opts.disallowed_tools),
            permission_mode=mode,
            mcp_servers=_mcp_servers(opts, bridged or {}),
            strict_mcp_config=True,
            setting_sources=[],
            max_turns=opts.max_turns or None,
            max_budget_usd=opts.max_budget_usd_micros / 1e6 if opts.max_budget_usd_micros else None,
            thinking=(
                {"type": "enabled", "budget_tokens": opts.max_thinking_tokens}
                if opts.max_thinking_tokens > 0
                else {"type": "disabled"}
            ),
            env=process.cli_environment(
                self._cli, dict(opts.env), runtime_env, self._sandbox_command(spec)
            ),
            cwd=spec.workspace,
            cli_path=self._launcher,
            include_partial_messages=True,
            can_use_tool=_can_use_tool(gate),
            hooks={"PreToolUse": [HookMatcher(matcher=None, hooks=[_pre_tool_use(gate)])]},
            resume=resume or None,
            fork_session=bool(resume and new_id),
            session_id=new_id or None,
            stderr=lambda line: log.debug(
                "agent stderr: %s", line, extra={"session": spec.session_id}
            ),
        )

    def _marks(self) -> dict[str, str]:
        """Whose every agent process is: see ``orphans``."""
        if self._owner is None:
            raise RuntimeError("ClaudeSdk.start() was not awaited")
        return {orphans.OWNER_VARIABLE: self._owner.marker}

    def _sandbox_command(self, spec: AgentSpec) -> list[str]:
        if self._sandbox is None or self._cli is None:
            return []
        return sandbox.command(
            self._sandbox, workspace=spec.workspace, config_dir=spec.config_dir, cli=self._cli
        )


def _can_use_tool(gate: ToolGate) -> Any:
    async def can_use_tool(
        tool_name: str, tool_input: dict[str, Any], context: ToolPermissionContext
    ) -> PermissionResult:
        reason = context.decision_reason or context.title or f"{tool_name} needs approval"
        decision = await gate.ask(tool_name, tool_input, context.tool_use_id or "", reason)
        if decision.behavior is Behavior.ALLOW:
            updated = dict(decision.updated_input) if decision.updated_input is not None else None
            return PermissionResultAllow(updated_input=updated)
        return PermissionResultDeny(
            message=decision.message or f"{tool_name} was denied",
            interrupt=decision.source is DecisionSource.INTERRUPT,
        )

    return can_use_tool


def _pre_tool_use(gate: ToolGate) -> Any:
    async def pre_tool_use(
        hook_input: HookInput, tool_use_id: str | None, context: HookContext
    ) -> HookJSONOutput:
        tool_name = hook_input.get("tool_name")
        verdict = gate.rule_for(tool_name) if isinstance(tool_name, str) else None
        if verdict is None:
            return {}
        return {
            "hookSpecificOutput": {
                "hookEventName": "PreToolUse",
                "permissionDecision": verdict.action.value,
                "permissionDecisionReason": verdict.reason,
            }
        }

    return pre_tool_use


def _system_prompt(opts: options_pb.AgentOptions) -> Any:
    """A system prompt of its own replaces Claude Code's; an append alone extends it."""
    if opts.system_prompt:
        return "\n\n".join(p for p in (opts.system_prompt, opts.append_system_prompt) if p)
    if opts.append_system_prompt:
        return {"type": "preset", "preset": "claude_code", "append": opts.append_system_prompt}
    return None


def _mcp_servers(
    opts: options_pb.AgentOptions, bridged: Mapping[str, McpSdkServerConfig]
) -> dict[str, McpServerConfig]:
    servers: dict[str, McpServerConfig] = {}
    for server in opts.mcp_servers:
        if server.WhichOneof("transport") == "stdio":
            if server.name in bridged:
                servers[server.name] = bridged[server.name]
        else:
            servers[server.name] = _http_config(server)
    return servers


def _http_config(server: options_pb.McpServer) -> McpServerConfig:
    if server.http.protocol == options_pb.McpHttpTransport.PROTOCOL_SSE:
        return {"type": "sse", "url": server.http.url, "headers": dict(server.http.headers)}
    return {"type": "http", "url": server.http.url, "headers": dict(server.http.headers)}
