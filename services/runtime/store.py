"""The runtime's sessions on disk: a config directory per session, and the working directory
storage assigned it.

``<root>/sessions/<session>/`` is the session's ``CLAUDE_CONFIG_DIR`` (and ``HOME``): the CLI
keeps its transcripts there, at ``projects/<cwd, sanitised>/<transcript>.jsonl``. The runtime
keeps what survives a restart (whose session it is) in ``<root>/state/<session>.json``, out of
the agent's reach: the agent may write anything in its own two directories.

The working directory is the storage service's workspace, ``<workspaces>/<session>/`` on the
filesystem both services share (``CORRAL_STORAGE_ROOT/workspaces``): storage makes it when the
session is created, copies it on a fork and deletes it with the session; the runtime only runs
agents in it, and refuses a turn whose workspace storage never made (WORKSPACE_UNAVAILABLE), so
nothing an agent writes escapes storage's accounts. Ids are in the shared id alphabet
(``libs.names``), so they are safe as file names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from corral.services.runtime.domain import CostMeter, WorkspaceUnavailable

if TYPE_CHECKING:
    from corral.services.runtime.turn import Turn

SESSION_FILE = "corral-session.json"
log = logging.getLogger("corral.runtime")


@dataclass(eq=False)
class SessionState:
    session_id: str
    organization: str
    config_dir: Path
    workspace_id: str = ""  # where its agent last worked
    transcript_id: str = ""  # the transcript the session's live process is on
    cost: CostMeter | None = None  # None: not known here yet (read from the transcript)
    turn: Turn | None = None

    def has_run(self) -> bool:
        """Whether the CLI ever wrote a transcript for it (else there is nothing to resume)."""
        return (self.config_dir / "projects").exists()


class SessionStore:
    """The sessions this replica knows: in memory once used, else found on disk. ``start``
    creates the runtime's directories and counts the sessions a previous run left;
    ``workspaces`` is storage's folder of workspaces."""

    def __init__(self, root: Path, workspaces: Path) -> None:
        self._sessions_dir = root / "sessions"
        self._workspaces_dir = workspaces
        self._state_dir = root / "state"
        self._sessions: dict[str, SessionState] = {}
        self._known: set[str] = set()

    async def start(self) -> None:
        self._sessions_dir.mkdir(parents=True, exist_ok=True)
        self._state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._known = {p.name for p in self._sessions_dir.iterdir() if p.is_dir()}

    @property
    def open_sessions(self) -> int:
        return len(self._known)

    def loaded(self, session_id: str) -> SessionState | None:
        """The session's state if it is in memory (a session with a turn always is)."""
        return self._sessions.get(session_id)

    def session(self, session_id: str, organization: str, *, create: bool) -> SessionState | None:
        """The session's state: in memory, else from its directory, else (``create``) new.
        None for an unknown session (``create`` false) or an unreadable one (nobody may touch
        it)."""
        state = self._sessions.get(session_id)
        if state is not None:
            return state
        config_dir = self._sessions_dir / session_id
        marker = self._marker(session_id)
        state = SessionState(session_id, organization, config_dir)
        legacy = config_dir / SESSION_FILE  # where earlier versions kept it
        if not marker.exists() and legacy.exists():
            with contextlib.suppress(OSError):
                marker.write_text(legacy.read_text())
                legacy.unlink()
        if marker.exists():
            try:
                saved = json.loads(marker.read_text())
                state.organization = str(saved["organization"])
            except (OSError, ValueError, KeyError):
                return None
            state.workspace_id = session_id
        elif create:
            config_dir.mkdir(parents=True, exist_ok=True)
            self.save(state)
        else:
            return None
        self._sessions[session_id] = state
        self._known.add(session_id)
        return state

    def _marker(self, session_id: str) -> Path:
        return self._state_dir / f"{session_id}.json"

    def save(self, state: SessionState) -> None:
        """What survives a restart: whose session it is (authorisation)."""
        self._marker(state.session_id).write_text(
            json.dumps({"organization": state.organization, "workspace": state.workspace_id})
        )

    def forget(self, state: SessionState) -> None:
        """A deleted session: its transcripts go (its workspace is storage's to delete)."""
        shutil.rmtree(state.config_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self._marker(state.session_id).unlink()
        self._sessions.pop(state.session_id, None)
        self._known.discard(state.session_id)

    def workspace(self, workspace_id: str) -> Path:
        """The workspace storage made, a directory (not a link); WORKSPACE_UNAVAILABLE when
        there is none (storage never made it or deleted it, or its volume is not mounted)."""
        path = self._workspaces_dir / workspace_id
        if path.is_symlink() or not path.is_dir():
            log.warning("workspace %r is not a directory at %s", workspace_id, path)
            raise WorkspaceUnavailable(  # the server's paths stay in its log
                f"workspace {workspace_id!r} does not exist in storage:"
                " storage makes it when the session is created"
            )
        return path

    def transcript(self, state: SessionState, transcript_id: str) -> Path | None:
        """The CLI keeps transcripts at ``projects/<cwd, sanitised>/<id>.jsonl`` (and finds one
        to resume in any project directory)."""
        return next(iter((state.config_dir / "projects").glob(f"*/{transcript_id}.jsonl")), None)

    def adopt(self, state: SessionState, transcript_id: str) -> Path | None:
        """A forked session's first turn branches from its parent: copy in the parent's
        transcript (storage copied its files when the fork was made). The parent must be a
        session of the same organisation on this replica."""
        for found in self._sessions_dir.glob(f"*/projects/*/{transcript_id}.jsonl"):
            parent = self.session(found.parents[2].name, "", create=False)
            if parent is None or parent is state or parent.organization != state.organization:
                continue
            target = state.config_dir / "projects" / found.parent.name / found.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(found, target)
            extras = found.with_suffix("")  # the transcript's own directory (subagents)
            if extras.is_dir():
                shutil.copytree(extras, target.with_suffix(""), dirs_exist_ok=True)
            return target
        return None


def saved_cost(transcript: Path) -> float:
    """The cumulative cost the CLI saved in a transcript (its last ``cost-state`` entry)."""
    total = 0.0
    with contextlib.suppress(OSError), transcript.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if '"cost-state"' not in line:
                continue
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("type") == "cost-state":
                    total = float(entry.get("totalCostUSD") or 0.0)
    return total
