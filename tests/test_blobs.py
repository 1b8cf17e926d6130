"""Blobs: the content-addressed store on disk (aimass.store.blobs), served by BlobService (scheduler.lifecycle.blobs)
on a real grpc.aio server, and fetched, verified and cached by BlobCache (aimass.runtime.blob_cache) as trainers and
replicas on other hosts do."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import stat
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest

from aimass.runtime.blob_cache import BlobCache, put_blob
from aimass.runtime.errors import NotFound, Unavailable
from aimass.runtime.interceptors import ErrorMappingInterceptor
from aimass.store.blobs import BlobMismatch, BlobNotFound, BlobStore, BlobTooLarge
from aimass.v1 import lifecycle_pb2, lifecycle_pb2_grpc
from scheduler.lifecycle.blobs import BlobServicer

MiB = 1 << 20
MAX_PUT = 4 * MiB


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- the store on disk


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def test_blobs_are_stored_by_content(store: BlobStore) -> None:
    data = b"text,label\nrefund please,billing\n"
    digest = store.put_bytes(data)
    assert digest == sha(data)
    path = store.path(digest)
    assert path == store.root / digest[:2] / digest
    assert path.read_bytes() == data and store.read_bytes(digest) == data
    assert store.has(digest) and store.size(digest) == len(data)
    assert store.put_bytes(data) == digest  # the same bytes again: the same blob
    assert files_under(store.root) == [path]
    # Tenants' data: owner-only.
    assert mode(store.root) == 0o700
    assert mode(path.parent) == 0o700
    assert mode(path) == 0o600

    assert store.delete(digest) == len(data)
    assert store.delete(digest) == 0
    assert not store.has(digest)
    for read in (store.path, store.size, store.read_bytes):
        with pytest.raises(BlobNotFound, match=f"blob {digest} is not in the blob store"):
            read(digest)
    with pytest.raises(FileNotFoundError):  # what code that reads files expects
        store.path(digest)


def test_a_writer_stores_only_whole_verified_blobs(store: BlobStore) -> None:
    data = os.urandom(3000)
    with store.writer(max_bytes=3000, expected_sha256=sha(data)) as writer:
        for start in range(0, len(data), 1000):
            writer.write(data[start : start + 1000])
        # In flight: a temporary file, not a blob.
        assert [path.parent for path in files_under(store.root)] == [store.temp_dir]
        assert not store.has(sha(data))
        assert writer.commit() == (sha(data), 3000)
    assert store.read_bytes(sha(data)) == data

    # Past max_bytes: refused, and nothing left once the block is left.
    with pytest.raises(BlobTooLarge, match="2,000 bytes"), store.writer(max_bytes=2000) as writer:
        writer.write(data[:1500])
        writer.write(data[1500:])
    # Bytes that do not match the expected hash: nothing kept.
    other = os.urandom(100)
    with pytest.raises(BlobMismatch, match=sha(other)), store.writer(100, expected_sha256=sha(data)) as writer:
        writer.write(other)
        writer.commit()
    assert not store.has(sha(other))
    # Left without a commit (an error, a cancelled upload): nothing stored.
    with store.writer(100) as writer:
        writer.write(other)
    assert not store.has(sha(other))
    assert files_under(store.root) == [store.path(sha(data))]


def test_malformed_hashes_never_touch_the_filesystem(store: BlobStore, tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.write_bytes(b"not a blob")
    for bad in ("../../secret", "AB" * 32, "ab" * 31, "", "ab" * 32 + "/", "../" + "a" * 61):
        for use in (store.has, store.path, store.read_bytes, store.delete):
            with pytest.raises(ValueError, match="not a SHA-256"):
                use(bad)
        with pytest.raises(ValueError, match="not a SHA-256"):
            store.writer(10, expected_sha256=bad if bad else "x")
    assert outside.read_bytes() == b"not a blob"


def test_a_dead_writers_leftovers_are_removed_by_the_next_store(store: BlobStore) -> None:
    stale = store.temp_dir / "0123456789abcdef.part"
    stale.write_bytes(b"half a file")
    os.utime(stale, (1, 1))
    fresh = store.temp_dir / "fedcba9876543210.part"
    fresh.write_bytes(b"a writer in another process, still writing")
    BlobStore(store.root)
    assert not stale.exists() and fresh.exists()


# -- BlobService and the cache, over gRPC


class RecordingBlobServicer(BlobServicer):
    """The real servicer, noting each FetchBlob's offset, and breaking the next ``breaks`` streams (UNAVAILABLE) after
    two chunks, as a restarting server or a network failure would; while ``gate`` is set and not open, a stream waits
    for it before its first chunk (``started`` says one is waiting)."""

    def __init__(self, store: BlobStore, max_put_bytes: int) -> None:
        super().__init__(store, max_put_bytes)
        self.offsets: list[int] = []
        self.breaks = 0
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def FetchBlob(
        self, request: lifecycle_pb2.FetchBlobRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[lifecycle_pb2.FetchBlobResponse]:
        self.offsets.append(request.offset)
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        chunks = cast(AsyncGenerator[lifecycle_pb2.FetchBlobResponse], super().FetchBlob(request, context))
        async with contextlib.aclosing(chunks):
            sent = 0
            async for chunk in chunks:
                if self.breaks and sent == 2:
                    self.breaks -= 1
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")
                yield chunk
                sent += 1


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[RecordingBlobServicer, grpc.aio.Channel]]:
    servicer = RecordingBlobServicer(BlobStore(tmp_path / "server-blobs"), MAX_PUT)
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()])
    lifecycle_pb2_grpc.add_BlobServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield servicer, channel
    await channel.close()
    await server.stop(0)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "cache"


async def test_the_cache_fetches_a_large_blob_once_and_verified(
    service: tuple[RecordingBlobServicer, grpc.aio.Channel], cache_dir: Path
) -> None:
    servicer, channel = service
    data = os.urandom(5 * MiB + 12345)
    digest = servicer.store.put_bytes(data)
    cache = BlobCache(cache_dir, channel)

    path = await cache.path(digest)
    assert path == cache_dir / digest[:2] / digest
    assert path.read_bytes() == data
    assert servicer.offsets == [0]
    assert mode(cache_dir) == 0o700
    # Cached: no second transfer, even after the server lost it.
    servicer.store.delete(digest)
    assert await cache.read_bytes(digest) == data
    assert servicer.offsets == [0]
    assert files_under(cache_dir) == [path]


async def test_fetch_blob_streams_chunks_from_an_offset(
    service: tuple[RecordingBlobServicer, grpc.aio.Channel],
) -> None:
    servicer, channel = service
    data = os.urandom(2 * MiB + 10)
    digest = servicer.store.put_bytes(data)
    stub = lifecycle_pb2_grpc.BlobServiceStub(channel)

    chunks = [chunk async for chunk in stub.FetchBlob(lifecycle_pb2.FetchBlobRequest(sha256=digest))]
    assert [len(chunk.data) for chunk in chunks] == [MiB, MiB, 10]
    assert {chunk.total_bytes for chunk in chunks} == {len(data)}
    assert [chunk.sha256 for chunk in chunks] == ["", "", digest]
    assert b"".join(chunk.data for chunk in chunks) == data

    tail = [c async for c in stub.FetchBlob(lifecycle_pb2.FetchBlobRequest(sha256=digest, offset=len(data) - 4))]
    assert [(c.data, c.sha256) for c in tail] == [(data[-4:], digest)]
    end = [c async for c in stub.FetchBlob(lifecycle_pb2.FetchBlobRequest(sha256=digest, offset=len(data)))]
    assert [(c.data, c.total_bytes, c.sha256) for c in end] == [(b"", len(data), digest)]
    empty = servicer.store.put_bytes(b"")
    assert [
        (c.data, c.total_bytes, c.sha256) async for c in stub.FetchBlob(lifecycle_pb2.FetchBlobRequest(sha256=empty))
    ] == [(b"", 0, empty)]

    for request, code, message in (
        (lifecycle_pb2.FetchBlobRequest(sha256=digest, offset=len(data) + 1), "INVALID_ARGUMENT", "offset"),
        (lifecycle_pb2.FetchBlobRequest(sha256=digest, offset=-1), "INVALID_ARGUMENT", "offset"),
        (lifecycle_pb2.FetchBlobRequest(sha256="../../etc/passwd"), "INVALID_ARGUMENT", "not a SHA-256"),
        (lifecycle_pb2.FetchBlobRequest(sha256=sha(b"never stored")), "NOT_FOUND", "not in the blob store"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            _ = [chunk async for chunk in stub.FetchBlob(request)]
        assert refused.value.code().name == code and message in (refused.value.details() or "")


async def test_a_blob_corrupt_on_the_server_is_refused_by_the_cache(
    service: tuple[RecordingBlobServicer, grpc.aio.Channel], cache_dir: Path
) -> None:
    servicer, channel = service
    data = os.urandom(3 * MiB)
    digest = servicer.store.put_bytes(data)
    on_disk = servicer.store.path(digest)
    corrupt = bytearray(data)
    corrupt[MiB + 7] ^= 0x01  # one bit, in the middle
    on_disk.write_bytes(bytes(corrupt))
    cache = BlobCache(cache_dir, channel)

    with pytest.raises(Unavailable, match="corrupt") as refused:
        await cache.path(digest)
    assert refused.value.reason == "BLOB_CORRUPT"
    assert files_under(cache_dir) == [], "nothing cached, not even a temporary file"
    # Once the server has the right bytes again, the cache fetches them.
    on_disk.write_bytes(data)
    assert await cache.read_bytes(digest) == data


async def test_an_unknown_blob_is_not_found(
    service: tuple[RecordingBlobServicer, grpc.aio.Channel], cache_dir: Path
) -> None:
    _, channel = service
    cache = BlobCache(cache_dir, channel)
    with pytest.raises(NotFound, match="not in the blob store"):
        await cache.path(sha(b"never stored"))
    with pytest.raises(ValueError, match="not a SHA-256"):
        await cache.path("../escape")
    assert files_under(cache_dir) == []


async def test_concurrent_fetches_of_one_blob_make_one_transfer(
    service: tuple[RecordingBlobServicer, grpc.aio.Channel], cache_dir: Path
) -> None:
    servicer, channel = service
    data = os.urandom(4 * MiB)
    digest = servicer.store.put_bytes(data)
    other = servicer.store.put_bytes(b"another blob")
    cache = BlobCache(cache_dir, channel)

    paths = await asyncio.gather(*(cache.path(digest) for _ in range(10)), cache.path(other))
    assert len(set(paths[:10])) == 1 and paths[0].read_bytes() == data
    assert paths[10].read_bytes() == b"another blob"
    assert sorted(servicer.offsets) == [0, 0], "one transfer per blob"

    # A caller that gives up does not stop the transfer others wait for.
    third = servicer.store.put_bytes(os.urandom(3 * MiB))
    servicer.gate, servicer.started = asyncio.Event(), asyncio.Event()
    impatient = asyncio.create_task(cache.path(third))
    patient = asyncio.create_task(cache.path(third))
    await asyncio.wait_for(servicer.started.wait(), 10)  # the transfer has started
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    servicer.gate.set()
    assert (await patient).read_bytes() == servicer.store.read_bytes(third)
    assert servicer.offsets.count(0) == 3


async def test_a_broken_transfer_resumes_once_from_where_it_stopped(
    service: tuple[RecordingBlobServicer, grpc.aio.Channel], cache_dir: Path
) -> None:
    servicer, channel = service
    data = os.urandom(5 * MiB)
    digest = servicer.store.put_bytes(data)
    cache = BlobCache(cache_dir, channel)

    servicer.breaks = 1
    assert await cache.read_bytes(digest) == data
    assert servicer.offsets == [0, 2 * MiB], "the second stream starts at the byte the first reached"

    # Broken twice: given up, nothing cached.
    again = servicer.store.put_bytes(os.urandom(5 * MiB))
    servicer.offsets.clear()
    servicer.breaks = 2
    with pytest.raises(Unavailable, match="broke twice"):
        await cache.path(again)
    assert servicer.offsets == [0, 2 * MiB]
    assert files_under(cache_dir) == [cache_dir / digest[:2] / digest]


async def test_put_blob_round_trip(service: tuple[RecordingBlobServicer, grpc.aio.Channel], cache_dir: Path) -> None:
    servicer, channel = service
    data = os.urandom(3 * MiB + 1)
    digest = await put_blob(channel, data)
    assert digest == sha(data)
    assert servicer.store.read_bytes(digest) == data
    assert await put_blob(channel, data) == digest  # twice: the same blob
    assert await put_blob(channel, b"") == sha(b"")
    # What one process stored, another fetches.
    assert await BlobCache(cache_dir, channel).read_bytes(digest) == data
    assert files_under(servicer.store.temp_dir) == []


def put_requests(header: lifecycle_pb2.PutBlobHeader, *chunks: bytes) -> list[lifecycle_pb2.PutBlobRequest]:
    return [lifecycle_pb2.PutBlobRequest(header=header)] + [lifecycle_pb2.PutBlobRequest(chunk=c) for c in chunks]


async def test_put_blob_refuses_wrong_or_oversize_bytes_and_keeps_nothing(
    service: tuple[RecordingBlobServicer, grpc.aio.Channel],
) -> None:
    servicer, channel = service
    stub = lifecycle_pb2_grpc.BlobServiceStub(channel)
    data = os.urandom(MiB + 5)
    big = os.urandom(MAX_PUT + 1)
    header = lifecycle_pb2.PutBlobHeader
    cases = [
        # Bytes that are not the header's.
        (put_requests(header(sha256=sha(b"other"), size_bytes=len(data)), data), "INVALID_ARGUMENT", "not the header"),
        (put_requests(header(sha256=sha(data), size_bytes=len(data)), data[:-1] + b"!"), "INVALID_ARGUMENT", "not the"),
        # Fewer bytes than announced.
        (put_requests(header(sha256=sha(data), size_bytes=len(data)), data[:MiB]), "INVALID_ARGUMENT", "announced"),
        # Past the header's size, past the limit announced or not.
        (put_requests(header(sha256=sha(data), size_bytes=MiB), data[:MiB], data[MiB:]), "RESOURCE_EXHAUSTED", "size"),
        (put_requests(header(sha256=sha(big), size_bytes=len(big))), "RESOURCE_EXHAUSTED", "at most 4,194,304"),
        (
            put_requests(header(sha256=sha(big)), *(big[i : i + MiB] for i in range(0, len(big), MiB))),
            "RESOURCE_EXHAUSTED",
            "at most 4,194,304",
        ),
        # Malformed.
        ([lifecycle_pb2.PutBlobRequest(chunk=data)], "INVALID_ARGUMENT", "first message"),
        (put_requests(header(sha256="../x", size_bytes=1), b"x"), "INVALID_ARGUMENT", "not a SHA-256"),
        (put_requests(header(sha256=sha(data), size_bytes=-1)), "INVALID_ARGUMENT", "size_bytes"),
    ]
    for requests, code, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.PutBlob(iter(requests))
        assert refused.value.code().name == code, refused.value.details()
        assert message in (refused.value.details() or ""), refused.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as too_big:
        await put_blob(channel, big)
    assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert files_under(servicer.store.root) == [], "nothing stored, no temporary file left"
