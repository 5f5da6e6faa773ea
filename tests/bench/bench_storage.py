"""Benchmark: moving bytes through storage. A file goes up through Envoy (gRPC: CreateUpload, 2 MiB
AppendUploadChunk calls, CommitUpload with its sha256) and comes down through Envoy (REST
``:download``, the raw bytes as google.api.HttpBody), each against a plain disk copy of the same
file on the same disk (``shutil.copyfile``) measured in the same run: the ratio is storage's
throughput over the copy's.

The storage service runs in a process of its own (``--serve``: the real service on SQLite and the
local blob store, identity's ledger and audit log faked at their ports as in tests/storage), so
its memory is read from ``/proc``: resident set before, and its peak (VmHWM) after moving
``--total-mib`` (1 GiB by default) up and down, which must stay bounded whatever the file size.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc

from corral.libs.config import Settings
from corral.libs.envoy import Envoy, write_config
from corral.storage.v1 import storage_service_pb2 as pb
from corral.storage.v1 import storage_service_pb2_grpc as rpc
from corral.storage.v1 import upload_pb2

CHUNK = 2 * 1024 * 1024  # the largest chunk AppendUploadChunk takes
MIB = 1024 * 1024


async def serve(directory: Path) -> None:
    """The storage service alone in this process; prints where it is, runs until stdin closes."""
    from corral.services.identity.jwks_http import JwksHttpServer
    from tests.storage.stack import running_stack
    from tests.support.keys import SigningKey

    key = SigningKey.generate()
    async with running_stack("sqlite", directory, key) as stack:

        async def keys() -> list[dict[str, str]]:
            return [key.jwk()]

        jwks = JwksHttpServer(keys, host="127.0.0.1", port=0, max_age=300)
        await jwks.start()
        workspace = await stack.workspace()
        print(
            json.dumps(
                {
                    "address": stack.address,
                    "jwks": f"http://127.0.0.1:{jwks.port}/.well-known/jwks.json",
                    "token": stack.token(),
                    "workspace": workspace.name,
                    "workspace_dir": str(stack.workspace_dir(workspace.name)),
                }
            ),
            flush=True,
        )
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await jwks.stop()


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            block = os.urandom(min(left, 8 * MIB))
            digest.update(block)
            out.write(block)
            left -= len(block)
    return digest.hexdigest()


def disk_copy(source: Path, target: Path) -> float:
    """MiB/s of a plain durable copy (fsync'd, as storage syncs what it accepts), the source warm
    in the page cache as it is for storage's reads."""
    started = time.perf_counter()
    shutil.copyfile(source, target)
    with target.open("rb") as f:
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - started
    target.unlink()
    return source.stat().st_size / MIB / elapsed


async def upload(
    stub: rpc.StorageServiceStub, auth: object, workspace: str, source: Path, size: int, sha: str
) -> tuple[float, str]:
    """MiB/s of one upload, and the file it made."""
    started = time.perf_counter()
    created = await stub.CreateUpload(
        pb.CreateUploadRequest(
            parent=workspace,
            upload=upload_pb2.Upload(path=f"bench/{uuid.uuid4().hex}.bin", size_bytes=size),
            request_id=str(uuid.uuid4()),
        ),
        metadata=auth,
    )
    offset = 0
    with source.open("rb") as f:
        while offset < size:
            data = f.read(CHUNK)
            reply = await stub.AppendUploadChunk(
                pb.AppendUploadChunkRequest(name=created.upload.name, offset=offset, data=data),
                metadata=auth,
            )
            offset = reply.committed_bytes
    committed = await stub.CommitUpload(
        pb.CommitUploadRequest(name=created.upload.name, sha256=sha), metadata=auth
    )
    elapsed = time.perf_counter() - started
    assert committed.file.size_bytes == size, committed
    return size / MIB / elapsed, committed.file.name


def download(edge: str, token: str, file: str, size: int, sha: str) -> float:
    started = time.perf_counter()
    connection = http.client.HTTPConnection(edge, timeout=120)
    digest = hashlib.sha256()
    got = 0
    try:
        connection.request(
            "GET", f"/v1/{file}:download", headers={"authorization": f"Bearer {token}"}
        )
        response = connection.getresponse()
        assert response.status == 200, response.read(300)
        while block := response.read(MIB):
            digest.update(block)
            got += len(block)
    finally:
        connection.close()
    elapsed = time.perf_counter() - started
    assert (got, digest.hexdigest()) == (size, sha), "the download differs from the upload"
    return size / MIB / elapsed


async def bench(file_mib: int, total_mib: int, workdir: Path) -> dict[str, float]:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.bench.bench_storage",
        "--serve",
        str(workdir / "service"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout and child.stdin
    info = json.loads(await child.stdout.readline())
    envoy = None
    try:
        settings = Settings(data_dir=workdir, edge_port=0, jwks_url=info["jwks"])
        config = write_config(
            settings,
            workdir / "envoy",
            upstreams={n: [info["address"]] for n in ("identity", "session", "task", "storage")},
            health_interval=0.25,
        )
        envoy = Envoy(config, log_file=workdir / "envoy.log")
        await envoy.start()
        await envoy.wait_healthy({("storage", info["address"])})
        edge = envoy.url.removeprefix("http://")
        source = workdir / "source.bin"
        sha = make_file(source, file_mib * MIB)
        before = memory_kib(child.pid)
        copies, ups, downs = [], [], []
        channel = grpc.aio.insecure_channel(
            edge, options=[("grpc.max_send_message_length", 4 * MIB)]
        )
        stub = rpc.StorageServiceStub(channel)
        auth = (("authorization", f"Bearer {info['token']}"),)
        moved = 0
        while moved < total_mib:
            copies.append(disk_copy(source, workdir / "copy.bin"))
            rate, file = await upload(stub, auth, info["workspace"], source, file_mib * MIB, sha)
            ups.append(rate)
            downs.append(
                await asyncio.to_thread(download, edge, info["token"], file, file_mib * MIB, sha)
            )
            moved += 2 * file_mib
            await stub.DeleteFile(pb.DeleteFileRequest(name=file), metadata=auth)
        await channel.close()
        after = memory_kib(child.pid)
    finally:
        if envoy:
            await envoy.stop()
        child.stdin.close()
        await child.wait()
    copy = sorted(copies)[len(copies) // 2]
    up = sorted(ups)[len(ups) // 2]
    down = sorted(downs)[len(downs) // 2]
    return {
        "copy": copy,
        "up": up,
        "down": down,
        "moved": moved,
        "rss_before": before["VmRSS"] / 1024,
        "peak": after["VmHWM"] / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file-mib", type=int, default=256)
    parser.add_argument("--total-mib", type=int, default=1024, help="bytes moved up and down")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(Path(args.serve)))
        return
    with tempfile.TemporaryDirectory(prefix="corral-bench-storage-") as tmp:
        r = asyncio.run(bench(args.file_mib, args.total_mib, Path(tmp)))
    print(f"storage: {args.file_mib} MiB files, {r['moved']} MiB moved through Envoy")
    print(f"  plain disk copy (baseline) {r['copy']:8.1f} MiB/s")
    print(f"  upload (gRPC chunks)       {r['up']:8.1f} MiB/s   ratio {r['up'] / r['copy']:.2f}")
    print(
        f"  download (REST :download)  {r['down']:8.1f} MiB/s   ratio {r['down'] / r['copy']:.2f}"
    )
    growth = r["peak"] - r["rss_before"]
    print(
        f"  storage process memory: {r['rss_before']:.0f} MiB before, peak {r['peak']:.0f} MiB "
        f"(growth {growth:.0f} MiB while moving {r['moved']} MiB)"
    )


if __name__ == "__main__":
    main()
