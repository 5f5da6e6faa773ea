"""The blob-store contract: every adapter (``blob_stores.ADAPTERS``) must pass all of it."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from corral.services.storage.blob_local import LocalBlobStore
from corral.services.storage.blobs import (
    BlobNotFound,
    BlobRangeError,
    BlobStore,
    BlobTooLarge,
    InvalidParts,
    MultipartNotFound,
    PartInfo,
    check_key,
)


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def read(store: BlobStore, key: str, offset: int = 0, length: int | None = None) -> bytes:
    return b"".join([block async for block in await store.get(key, offset=offset, length=length)])


async def keys(store: BlobStore, prefix: str = "", start_after: str = "") -> list[str]:
    return [info.key async for info in store.list(prefix, start_after=start_after)]


def sha(*parts: bytes) -> str:
    return hashlib.sha256(b"".join(parts)).hexdigest()


async def test_put_streams_and_reports_size_and_sha256(blob_store: BlobStore) -> None:
    data = [os.urandom(70_000), b"", os.urandom(3)]
    info = await blob_store.put("reports/acme/r1", chunks(*data))
    assert (info.key, info.size, info.sha256) == ("reports/acme/r1", 70_003, sha(*data))
    assert await read(blob_store, "reports/acme/r1") == b"".join(data)
    stat = await blob_store.stat("reports/acme/r1")
    assert stat.size == 70_003
    assert stat.sha256 in {None, info.sha256}


async def test_an_empty_object(blob_store: BlobStore) -> None:
    info = await blob_store.put("empty", chunks())
    assert (info.size, info.sha256) == (0, sha(b""))
    assert await read(blob_store, "empty") == b""


async def test_put_replaces_an_object(blob_store: BlobStore) -> None:
    await blob_store.put("a/b", chunks(b"first version"))
    await blob_store.put("a/b", chunks(b"second"))
    assert await read(blob_store, "a/b") == b"second"
    assert await keys(blob_store) == ["a/b"]


async def test_a_failed_put_keeps_nothing_and_leaves_the_old_object(blob_store: BlobStore) -> None:
    await blob_store.put("kept", chunks(b"old"))

    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        raise ConnectionError("the client went away")

    with pytest.raises(ConnectionError):
        await blob_store.put("kept", broken())
    with pytest.raises(ConnectionError):
        await blob_store.put("fresh", broken())
    assert await read(blob_store, "kept") == b"old"
    with pytest.raises(BlobNotFound):
        await blob_store.stat("fresh")
    assert await keys(blob_store) == ["kept"]


async def test_max_bytes_refuses_and_keeps_nothing(blob_store: BlobStore) -> None:
    info = await blob_store.put("exact", chunks(b"12345"), max_bytes=5)
    assert info.size == 5
    with pytest.raises(BlobTooLarge):
        await blob_store.put("over", chunks(b"123", b"456"), max_bytes=5)
    with pytest.raises(BlobNotFound):
        await blob_store.stat("over")
    assert await keys(blob_store) == ["exact"]


async def test_ranges(blob_store: BlobStore) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one read chunk
    await blob_store.put("big", chunks(data))
    assert await read(blob_store, "big", 10) == data[10:]
    assert await read(blob_store, "big", 10, 100) == data[10:110]
    assert await read(blob_store, "big", len(data) - 5, 100) == data[-5:]
    assert (
        await read(blob_store, "big", 1024 * 1024 - 1, 2 * 1024 * 1024)
        == (data[1024 * 1024 - 1 : 3 * 1024 * 1024 - 1])
    )
    assert await read(blob_store, "big", 0, 0) == b""
    assert await read(blob_store, "big", len(data)) == b""
    with pytest.raises(BlobRangeError):
        await blob_store.get("big", offset=len(data) + 1)


async def test_missing_objects_fail_before_the_first_byte(blob_store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await blob_store.get("nope")
    with pytest.raises(BlobNotFound):
        await blob_store.stat("nope")
    with pytest.raises(BlobNotFound):
        await blob_store.copy("nope", "other")


async def test_a_reader_left_early_does_not_block_a_delete(blob_store: BlobStore) -> None:
    await blob_store.put("doc", chunks(os.urandom(3 * 1024 * 1024)))
    reader = await blob_store.get("doc")
    first = await anext(aiter(reader))
    assert first
    await reader.aclose()  # type: ignore[attr-defined]
    assert await blob_store.delete("doc") is True


async def test_delete_is_idempotent(blob_store: BlobStore) -> None:
    await blob_store.put("d/x", chunks(b"1"))
    assert await blob_store.delete("d/x") is True
    assert await blob_store.delete("d/x") is False
    assert await blob_store.delete("never/was") is False
    with pytest.raises(BlobNotFound):
        await blob_store.get("d/x")
    assert await keys(blob_store) == []


async def test_list_is_a_string_prefix_in_key_order(blob_store: BlobStore) -> None:
    names = ["a/b", "a-c", "a/b/c", "ab", "reports/x", "report-1", "z"]
    for name in names:
        await blob_store.put(name, chunks(name.encode()))
    assert await keys(blob_store) == sorted(names, key=str.encode)
    assert await keys(blob_store, "a") == ["a-c", "a/b", "a/b/c", "ab"]
    assert await keys(blob_store, "a/") == ["a/b", "a/b/c"]
    assert await keys(blob_store, "a/b/") == ["a/b/c"]
    assert await keys(blob_store, "rep") == ["report-1", "reports/x"]
    assert await keys(blob_store, "reports/") == ["reports/x"]
    assert await keys(blob_store, "a/b/c") == ["a/b/c"]
    assert await keys(blob_store, "nothing/") == []
    assert await keys(blob_store, start_after="ab") == ["report-1", "reports/x", "z"]
    listed = [info async for info in blob_store.list("z")]
    assert [(info.key, info.size) for info in listed] == [("z", 1)]


async def test_copy_is_independent_of_its_source(blob_store: BlobStore) -> None:
    original = await blob_store.put("src", chunks(b"payload"))
    copied = await blob_store.copy("src", "dst/copy")
    assert (copied.key, copied.size, copied.sha256) == ("dst/copy", 7, original.sha256)
    await blob_store.put("src", chunks(b"changed"))
    await blob_store.delete("src")
    assert await read(blob_store, "dst/copy") == b"payload"


async def upload_parts(
    store: BlobStore, key: str, upload_id: str, parts: Iterable[bytes]
) -> list[PartInfo]:
    done = []
    for number, data in enumerate(parts, start=1):
        done.append(await store.put_part(key, upload_id, number, chunks(data)))
    return done


async def test_multipart_joins_parts_in_order(blob_store: BlobStore) -> None:
    size = blob_store.min_part_size
    parts = [os.urandom(size), os.urandom(size), os.urandom(1234)]
    upload_id = await blob_store.begin_multipart("uploads/u1")
    assert [u.upload_id async for u in blob_store.list_multipart("uploads/")] == [upload_id]
    infos = await upload_parts(blob_store, "uploads/u1", upload_id, parts)
    assert [info.size for info in infos] == [size, size, 1234]
    assert await keys(blob_store) == []  # not an object before it completes
    info = await blob_store.complete_multipart("uploads/u1", upload_id, infos)
    assert (info.size, info.sha256) == (2 * size + 1234, sha(*parts))
    assert await read(blob_store, "uploads/u1") == b"".join(parts)
    assert [u async for u in blob_store.list_multipart()] == []
    with pytest.raises(MultipartNotFound):
        await blob_store.put_part("uploads/u1", upload_id, 4, chunks(b"late"))


async def test_a_part_uploaded_again_replaces_the_first(blob_store: BlobStore) -> None:
    size = blob_store.min_part_size
    upload_id = await blob_store.begin_multipart("k")
    await blob_store.put_part("k", upload_id, 1, chunks(b"lost"))
    first = await blob_store.put_part("k", upload_id, 1, chunks(b"a" * size))
    last = await blob_store.put_part("k", upload_id, 2, chunks(b"tail"))
    info = await blob_store.complete_multipart("k", upload_id, [first, last])
    assert info.size == size + 4
    assert await read(blob_store, "k", size) == b"tail"


async def test_multipart_refuses_bad_parts(blob_store: BlobStore) -> None:
    size = blob_store.min_part_size
    upload_id = await blob_store.begin_multipart("k")
    small = await blob_store.put_part("k", upload_id, 1, chunks(b"small"))
    tail = await blob_store.put_part("k", upload_id, 2, chunks(b"tail"))
    with pytest.raises(InvalidParts):
        await blob_store.complete_multipart("k", upload_id, [small, tail])  # too small
    big = await blob_store.put_part("k", upload_id, 1, chunks(b"b" * size))
    with pytest.raises(InvalidParts):
        await blob_store.complete_multipart("k", upload_id, [tail, big])  # out of order
    with pytest.raises(InvalidParts):
        await blob_store.complete_multipart("k", upload_id, [])
    with pytest.raises(BlobTooLarge):
        await blob_store.put_part("k", upload_id, 3, chunks(b"123456"), max_bytes=5)
    info = await blob_store.complete_multipart("k", upload_id, [big, tail])
    assert info.size == size + 4


async def test_abort_discards_the_upload(blob_store: BlobStore) -> None:
    upload_id = await blob_store.begin_multipart("gone")
    part = await blob_store.put_part("gone", upload_id, 1, chunks(b"data"))
    await blob_store.abort_multipart("gone", upload_id)
    await blob_store.abort_multipart("gone", upload_id)  # twice is fine
    assert [u async for u in blob_store.list_multipart()] == []
    with pytest.raises(MultipartNotFound):
        await blob_store.put_part("gone", upload_id, 2, chunks(b"more"))
    with pytest.raises(MultipartNotFound):
        await blob_store.complete_multipart("gone", upload_id, [part])
    with pytest.raises(BlobNotFound):
        await blob_store.stat("gone")


async def test_an_upload_id_belongs_to_its_key(blob_store: BlobStore) -> None:
    upload_id = await blob_store.begin_multipart("mine")
    with pytest.raises(MultipartNotFound):
        await blob_store.put_part("theirs", upload_id, 1, chunks(b"x"))
    with pytest.raises(MultipartNotFound):
        await blob_store.put_part("mine", "0" * 32, 1, chunks(b"x"))
    await blob_store.abort_multipart("mine", upload_id)


async def test_concurrent_puts_leave_one_whole_object(blob_store: BlobStore) -> None:
    versions = [bytes([n]) * 300_000 for n in range(6)]
    await asyncio.gather(*(blob_store.put("race", chunks(v)) for v in versions))
    assert await read(blob_store, "race") in versions


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/abs",
        "a//b",
        "a/",
        "../x",
        "a/../b",
        "./a",
        "a/.",
        "a\0b",
        "a\nb",
        "a b",
        "a\\b",
        "é",
        "x" * 1025,
    ],
)
async def test_bad_keys_are_a_programming_error(blob_store: BlobStore, key: str) -> None:
    with pytest.raises(ValueError, match="blob key"):
        check_key(key)
    with pytest.raises(ValueError, match="blob key"):
        await blob_store.put(key, chunks(b"x"))
    with pytest.raises(ValueError, match="blob key"):
        await blob_store.get(key)


# -- the local adapter's own promises -----------------------------------------------------------


async def test_local_store_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not yours")
    objects = tmp_path / "blobs" / "objects"
    (objects / "link-dir").symlink_to(outside, target_is_directory=True)
    (outside / "secret~").write_bytes(b"not yours")
    (objects / "link-file~").symlink_to(outside / "secret")
    for key in ("link-dir/secret", "link-file"):
        with pytest.raises(BlobNotFound):
            await store.get(key)
    with pytest.raises(PermissionError):
        await store.put("link-dir/planted", chunks(b"escape"))
    assert sorted(p.name for p in outside.iterdir()) == ["secret", "secret~"]
    assert await keys(store) == []  # links are not objects
    await store.put("link-file", chunks(b"mine"))  # replaces the link itself, not its target
    assert (outside / "secret").read_bytes() == b"not yours"
    assert await read(store, "link-file") == b"mine"


async def test_local_store_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs", min_part_size=4)

    async def broken() -> AsyncIterator[bytes]:
        yield b"abc"
        raise ConnectionError

    with pytest.raises(ConnectionError):
        await store.put("k", broken())
    with pytest.raises(BlobTooLarge):
        await store.put("k", chunks(b"abcdef"), max_bytes=2)
    upload_id = await store.begin_multipart("m")
    parts = [
        await store.put_part("m", upload_id, 1, chunks(b"1234")),
        await store.put_part("m", upload_id, 2, chunks(b"5")),
    ]
    await store.complete_multipart("m", upload_id, parts)
    await store.delete("m")
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []
    assert list((tmp_path / "blobs" / "multipart").iterdir()) == []
    assert list((tmp_path / "blobs" / "objects").iterdir()) == []
