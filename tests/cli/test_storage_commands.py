"""`corral workspaces|files|reports` against the platform's real storage service (with identity
for its tokens and quotas): a report filed from a file, listed, shown and fetched byte for byte;
files put, listed, fetched (to a file, a directory and a pipe) and removed; a 24 MiB file there
and back byte-identical with the CLI's memory well under the file's size; transfers that lose
their connection midway (a proxy that drops it after so many bytes) resumed, not restarted; the
progress bar on a terminal only; another organisation's user refused NOT_FOUND and a viewer
PERMISSION_DENIED; --json parsed."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from corral.client import Client
from corral.identity.v1 import identity_service_pb2 as ipb
from corral.identity.v1 import organization_pb2, role_pb2, user_pb2
from corral.storage.v1 import storage_service_pb2 as pb
from corral.storage.v1 import workspace_pb2
from tests.cli.conftest import Platform, cli_env, corral
from tests.cli.cutting_proxy import CuttingProxy
from tests.support.platform import ADMIN

MiB = 1024 * 1024
ESC = "\x1b["
# Runs the CLI as `python -m corral.services.cli` does and, as it exits, writes its peak resident
# memory (VmHWM, of this process image only) where CORRAL_TEST_PEAK_FILE says.
PEAK_WRAPPER = """
import atexit, os, runpy, sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            open(os.environ["CORRAL_TEST_PEAK_FILE"], "w").write(line.split()[1])
atexit.register(peak)
sys.argv[0] = "corral"
runpy.run_module("corral.services.cli", run_name="__main__")
"""


@pytest.fixture(scope="module")
def storage(platform: Platform) -> dict[str, str]:
    """The env that points the CLI at the platform's storage service."""
    return {"CORRAL_STORAGE_TARGET": platform.settings.target_for("storage")}


@pytest.fixture(scope="module")
async def workspace(platform: Platform, storage: dict[str, str]) -> str:
    """A session's workspace owned by the admin, made as the session service makes it (a
    service principal)."""
    key = (platform.settings.data_dir / "service-api-key").read_text().strip()
    targets = {
        "identity": platform.settings.target_for("identity"),
        "storage": storage["CORRAL_STORAGE_TARGET"],
    }
    async with Client(targets) as service, Client(targets) as admin:
        await service.exchange_api_key(key)
        login = await admin.login(*ADMIN)
        made = await service.storage.CreateWorkspace(
            pb.CreateWorkspaceRequest(
                workspace=workspace_pb2.Workspace(
                    organization="organizations/default",
                    session="sessions/clifiles",
                    owner=login.user.name,
                )
            )
        )
    return made.workspace.name


@dataclass(frozen=True)
class Raw:
    code: int
    out: bytes
    err: str


async def corral_raw(
    platform: Platform, *args: str, env: Mapping[str, str], peak: Path | None = None
) -> Raw:
    """`corral ARGS...` with its standard output kept as bytes (optionally its peak memory)."""
    command = ["-c", PEAK_WRAPPER] if peak else ["-m", "corral.services.cli"]
    extra = {"CORRAL_TEST_PEAK_FILE": str(peak)} if peak else {}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**cli_env(platform), **env, **extra},
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return Raw(process.returncode, out, err.decode())


def _stderr_on_a_terminal(platform: Platform, args: list[str], env: Mapping[str, str]) -> str:
    """Run corral with its standard error on a pseudo-terminal (standard output to nowhere);
    returns what it wrote there."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "corral.services.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=follower,
        stdin=subprocess.DEVNULL,
        env={**cli_env(platform), **env},
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the process is done writing
            break
        if not chunk:
            break
        chunks.append(chunk)
    code = process.wait(timeout=120)
    os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    assert code == 0, text
    return text


def random_file(path: Path, size: int) -> Path:
    with path.open("wb") as out:
        for _ in range(0, size, MiB):
            out.write(os.urandom(min(MiB, size)))
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while block := source.read(MiB):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="module")
async def baseline_peak(
    platform: Platform,
    storage: dict[str, str],
    workspace: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> int:
    """The CLI's peak memory (bytes) putting a file of a few bytes."""
    folder = tmp_path_factory.mktemp("baseline")
    small = folder / "small.txt"
    small.write_text("small\n")
    peak = folder / "peak"
    ran = await corral_raw(
        platform, "files", "put", str(small), f"{workspace}:baseline/", env=storage, peak=peak
    )
    assert ran.code == 0, ran.err
    return int(peak.read_text()) * 1024


@pytest.fixture(scope="module")
async def big(
    platform: Platform,
    storage: dict[str, str],
    workspace: str,
    baseline_peak: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, str]]:
    """A 24 MiB file of random bytes, put in the workspace by the CLI; (local file, its JSON)."""
    local = random_file(tmp_path_factory.mktemp("big") / "big.bin", 24 * MiB)
    peak = local.with_name("put-peak")
    destination = f"{workspace}:big/big.bin"
    ran = await corral_raw(
        platform, "files", "put", str(local), destination, "--json", env=storage, peak=peak
    )
    assert ran.code == 0, ran.err
    assert "%" not in ran.err  # no progress bar into a pipe
    file = json.loads(ran.out)
    assert (file["path"], file["sizeBytes"]) == ("big/big.bin", str(24 * MiB))
    assert file["sha256"] == sha256_of(local)
    assert file["name"].startswith(f"{workspace}/files/")
    # Chunk by chunk: the CLI's peak memory grows by less than the file's size (it measured
    # 11 to 16 MiB more than a few bytes' put, for files of 8 to 128 MiB alike).
    assert int(peak.read_text()) * 1024 < baseline_peak + 24 * MiB
    return local, file


async def test_reports_create_ls_show_get(
    platform: Platform, storage: dict[str, str], tmp_path: Path
) -> None:
    source = tmp_path / "summary.md"
    source.write_text("# Weekly\n\nAll green.\n")
    created = await corral(
        platform, "reports", "create", str(source), "--title", "Weekly", "--json", env=storage
    )
    assert created.code == 0, created
    name = json.loads(created.out)["name"]
    assert name.startswith("reports/")

    listed = json.loads((await corral(platform, "reports", "ls", "--json", env=storage)).out)
    assert [r["title"] for r in listed["reports"] if r["name"] == name] == ["Weekly"]
    shown = await corral(platform, "reports", "show", name, env=storage)
    assert "Weekly" in shown.out and "All green." in shown.out
    fetched = tmp_path / "back.md"
    got = await corral(platform, "reports", "get", name, "-o", str(fetched), env=storage)
    assert got.code == 0, got
    assert fetched.read_bytes() == source.read_bytes()


async def test_files_put_ls_get_rm(
    platform: Platform, storage: dict[str, str], workspace: str, tmp_path: Path
) -> None:
    local = tmp_path / "result.txt"
    local.write_text("forty-two\n")
    put = await corral(platform, "files", "put", str(local), f"{workspace}:out/", env=storage)
    assert put.code == 0, put
    name = put.out.strip()  # the file's name, as files ls prints it

    listed = await corral(
        platform, "files", "ls", workspace, "--prefix", "out/", "--json", env=storage
    )
    assert listed.code == 0, listed
    (entry,) = json.loads(listed.out)["files"]
    assert (entry["name"], entry["path"], entry["sizeBytes"]) == (name, "out/result.txt", "10")
    assert name in (await corral(platform, "files", "ls", workspace, env=storage)).out

    by_name = await corral(platform, "files", "get", name, env=storage)
    by_path = await corral(platform, "files", "get", f"{workspace}:out/result.txt", env=storage)
    assert by_name.out == by_path.out == "forty-two\n"

    # There already: refused without --overwrite, replaced with it.
    local.write_text("forty-three\n")
    again = await corral(
        platform, "files", "put", str(local), f"{workspace}:out/result.txt", "--json", env=storage
    )
    assert again.code == 1
    assert json.loads(again.out)["error"] == {
        "code": "ALREADY_EXISTS",
        "reason": "FILE_EXISTS",
        "message": json.loads(again.out)["error"]["message"],
    }
    replaced = await corral(
        platform,
        "files",
        "put",
        str(local),
        f"{workspace}:out/result.txt",
        "--overwrite",
        "--json",
        env=storage,
    )
    assert replaced.code == 0, replaced
    assert json.loads(replaced.out)["name"] == name
    assert (await corral(platform, "files", "get", name, env=storage)).out == "forty-three\n"

    removed = await corral(platform, "files", "rm", f"{workspace}:out/result.txt", env=storage)
    assert removed.code == 0 and removed.out.strip() == f"{name} deleted"
    gone = await corral(platform, "files", "get", name, "-o", str(tmp_path / "x"), env=storage)
    assert gone.code == 1 and "NOT_FOUND" in gone.err
    assert not (tmp_path / "x").exists()
    gone = await corral(platform, "files", "rm", name, "--json", env=storage)
    assert gone.code == 1
    assert json.loads(gone.out)["error"]["reason"] == "FILE_NOT_FOUND"
    local.write_text("again\n")
    await corral(platform, "files", "put", str(local), f"{workspace}:out/", env=storage)
    removed = await corral(platform, "files", "rm", name, "--json", env=storage)
    assert json.loads(removed.out) == {"name": name, "deleted": True}

    workspaces = json.loads((await corral(platform, "workspaces", "ls", "--json", env=storage)).out)
    assert workspace in [w["name"] for w in workspaces["workspaces"]]


async def test_a_24_mib_file_there_and_back(
    platform: Platform,
    storage: dict[str, str],
    baseline_peak: int,
    big: tuple[Path, dict[str, str]],
    tmp_path: Path,
) -> None:
    local, file = big
    into = tmp_path / "copy.bin"
    peak = tmp_path / "peak"
    got = await corral_raw(
        platform, "files", "get", file["name"], "-o", str(into), env=storage, peak=peak
    )
    assert got.code == 0, got.err
    assert got.out == b"" and "%" not in got.err
    assert into.read_bytes() == local.read_bytes()
    # Streamed to the disk: the CLI never holds the file (as for the put, in the fixture).
    assert int(peak.read_text()) * 1024 < baseline_peak + 24 * MiB
    assert [n for n in os.listdir(tmp_path) if n.endswith(".part")] == []

    # Into a directory, by its path, with the file's metadata as JSON.
    folder = tmp_path / "folder"
    folder.mkdir()
    described = await corral_raw(
        platform, "files", "get", f"{file['name']}", "-o", str(folder), "--json", env=storage
    )
    assert described.code == 0, described.err
    assert json.loads(described.out)["sha256"] == file["sha256"]
    assert (folder / "big.bin").read_bytes() == local.read_bytes()

    # To a pipe: the bytes on standard output, nothing else there.
    piped = await corral_raw(platform, "files", "get", file["name"], env=storage)
    assert piped.code == 0, piped.err
    assert piped.out == local.read_bytes()
    assert piped.err == ""


async def test_get_with_json_needs_an_output_file(
    platform: Platform, storage: dict[str, str], big: tuple[Path, dict[str, str]]
) -> None:
    ran = await corral_raw(platform, "files", "get", big[1]["name"], "--json", env=storage)
    assert (ran.code, ran.out) == (2, b"")
    assert "-o" in ran.err


async def test_progress_bar_on_a_terminal_only(
    platform: Platform, storage: dict[str, str], big: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    local, file = big
    get = ["files", "get", file["name"], "-o", str(tmp_path / "copy.bin")]
    shown = await asyncio.to_thread(_stderr_on_a_terminal, platform, get, storage)
    last = shown.rstrip().rsplit("\r", 1)[-1]
    assert "24.0 MiB / 24.0 MiB  100% [###" in last and last.endswith("/s"), shown
    assert ESC not in shown  # plain text: no colour or cursor codes
    # Not a colour: NO_COLOR leaves it on.
    plain = await asyncio.to_thread(
        _stderr_on_a_terminal, platform, get, {**storage, "NO_COLOR": "1"}
    )
    assert "100%" in plain and ESC not in plain
    for quiet in ([*get, "--quiet"], [*get, "--json"]):
        assert "%" not in await asyncio.to_thread(_stderr_on_a_terminal, platform, quiet, storage)

    put = ["files", "put", str(local), f"{file['name'].split('/files/')[0]}:bar/", "--overwrite"]
    shown = await asyncio.to_thread(_stderr_on_a_terminal, platform, put, storage)
    last = shown.rstrip().rsplit("\r", 1)[-1]
    assert last.startswith("bar/big.bin") and "24.0 MiB / 24.0 MiB  100% [###" in last, shown
    # A small file: no bar even on a terminal.
    small = tmp_path / "small.txt"
    small.write_text("tiny\n")
    put = ["files", "put", str(small), f"{file['name'].split('/files/')[0]}:bar/", "--overwrite"]
    assert "%" not in await asyncio.to_thread(_stderr_on_a_terminal, platform, put, storage)


async def test_an_upload_that_loses_its_connection_resumes(
    platform: Platform,
    storage: dict[str, str],
    workspace: str,
    big: tuple[Path, dict[str, str]],
) -> None:
    local, _ = big
    port = int(storage["CORRAL_STORAGE_TARGET"].rsplit(":", 1)[1])
    async with CuttingProxy(port, cut_upstream_after=9 * MiB) as proxy:
        ran = await corral_raw(
            platform,
            "files",
            "put",
            str(local),
            f"{workspace}:resumed/up.bin",
            "--json",
            env={"CORRAL_STORAGE_TARGET": proxy.target},
        )
    assert ran.code == 0, ran.err
    assert proxy.cuts == 1
    assert json.loads(ran.out)["sha256"] == sha256_of(local)
    # Resumed where the server was: a restart would have carried 9 + 24 MiB.
    assert proxy.carried["up"] < 24 * MiB + 5 * MiB


async def test_a_download_that_loses_its_connection_resumes(
    platform: Platform, big: tuple[Path, dict[str, str]], storage: dict[str, str], tmp_path: Path
) -> None:
    local, file = big
    port = int(storage["CORRAL_STORAGE_TARGET"].rsplit(":", 1)[1])
    into = tmp_path / "copy.bin"
    async with CuttingProxy(port, cut_downstream_after=9 * MiB) as proxy:
        ran = await corral_raw(
            platform,
            "files",
            "get",
            file["name"],
            "-o",
            str(into),
            env={"CORRAL_STORAGE_TARGET": proxy.target},
        )
    assert ran.code == 0, ran.err
    assert proxy.cuts == 1
    assert into.read_bytes() == local.read_bytes()
    assert proxy.carried["down"] < 24 * MiB + 5 * MiB


async def _member(platform: Platform, organization: str, role: int) -> dict[str, str]:
    """A new user of ``organization`` (made if need be); the env that signs the CLI in as them."""
    identity, root = platform.identity, platform.auth
    org_id = organization.removeprefix("organizations/")
    if org_id != "default":
        await identity.CreateOrganization(
            ipb.CreateOrganizationRequest(
                organization=organization_pb2.Organization(display_name=org_id.title()),
                organization_id=org_id,
            ),
            metadata=root,
        )
    email, password = f"{uuid.uuid4().hex[:8]}@{org_id}.test", "a-long-enough-password"
    await identity.CreateUser(
        ipb.CreateUserRequest(
            parent=organization,
            user=user_pb2.User(email=email, role=role, password=password),  # type: ignore[arg-type]
        ),
        metadata=root,
    )
    return {"CORRAL_EMAIL": email, "CORRAL_PASSWORD": password}


async def test_others_are_refused(
    platform: Platform,
    storage: dict[str, str],
    workspace: str,
    big: tuple[Path, dict[str, str]],
    tmp_path: Path,
) -> None:
    """Another organisation's user can neither put, get nor remove (NOT_FOUND: it cannot even
    learn the workspace exists); a viewer of the organisation reads but cannot write."""
    local, file = big
    small = tmp_path / "small.txt"
    small.write_text("not yours\n")
    outsider = {**storage, **await _member(platform, "organizations/globexcli", role_pb2.ROLE_USER)}
    attempts = [
        ["files", "put", str(small), f"{workspace}:intruder.txt"],
        ["files", "put", str(local), f"{workspace}:intruder.bin"],  # a chunked upload
        ["files", "get", file["name"], "-o", str(tmp_path / "stolen")],
        ["files", "get", f"{workspace}:big/big.bin", "-o", str(tmp_path / "stolen")],
        ["files", "rm", file["name"]],
        ["files", "ls", workspace],
    ]
    for attempt in attempts:
        ran = await corral_raw(platform, *attempt, "--json", env=outsider)
        assert ran.code == 1, (attempt, ran)
        assert json.loads(ran.out)["error"]["code"] == "NOT_FOUND", (attempt, ran)
    assert not (tmp_path / "stolen").exists()

    viewer = {**storage, **await _member(platform, "organizations/default", role_pb2.ROLE_VIEWER)}
    for attempt in (attempts[0], attempts[1], attempts[4]):
        ran = await corral_raw(platform, *attempt, "--json", env=viewer)
        error = json.loads(ran.out)["error"]
        assert (ran.code, error["code"], error["reason"]) == (
            1,
            "PERMISSION_DENIED",
            "READ_ONLY_ACCESS",
        ), (attempt, ran)
    read = await corral_raw(platform, *attempts[2][:3], "-o", str(tmp_path / "read"), env=viewer)
    assert read.code == 0, read.err
    assert (tmp_path / "read").read_bytes() == local.read_bytes()  # and still there


async def test_a_local_file_that_cannot_be_read(
    platform: Platform, storage: dict[str, str], workspace: str, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.txt"
    ran = await corral(platform, "files", "put", str(missing), workspace, "--json", env=storage)
    assert ran.code == 1
    assert json.loads(ran.out)["error"]["reason"] == "ENOENT"
    assert "No such file" in ran.err
