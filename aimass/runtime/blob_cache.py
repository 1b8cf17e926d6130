"""A local cache of the control plane's blobs (aimass.v1.BlobService), for trainers and replicas on any host: dataset
files and trained heads are fetched over gRPC once, checked against their SHA-256, and kept on local disk under the
blob store's layout (``cache_dir/ab/abcdef...``). No shared filesystem is assumed.

A fetch streams into a temporary file and is renamed into place only once complete and verified, so a cached file is
always whole. Concurrent requests for one blob share one transfer; a stream that breaks (the server restarting, a
network blip) resumes once from the byte it reached. ``put_blob`` goes the other way: it stores bytes (a trained head,
an export) in the control plane's blob store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Final

import grpc

from aimass.runtime.errors import NotFound, Unavailable
from aimass.store.blobs import blob_path, check_sha256, fsync_dir, new_temp_file, remove_stale_temp_files
from aimass.v1 import lifecycle_pb2, lifecycle_pb2_grpc

log = logging.getLogger(__name__)

CHUNK_BYTES: Final = 1 << 20
# A broken stream is resumed (once) on these; any other status is the answer.
RESUMABLE: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED}
)


def _append(file: IO[bytes], digest: hashlib._Hash, data: bytes) -> None:
    file.write(data)
    digest.update(data)


def _finish(file: IO[bytes], temp: Path, target: Path) -> None:
    file.flush()
    os.fsync(file.fileno())
    file.close()
    target.parent.mkdir(mode=0o700, exist_ok=True)
    os.replace(temp, target)
    fsync_dir(target.parent)


def _discard(file: IO[bytes], temp: Path) -> None:
    file.close()
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()


class BlobCache:
    """Blobs fetched from the BlobService on ``channel``, kept in ``cache_dir`` (created owner-only). ``timeout_s``
    bounds each FetchBlob stream (None: no deadline; the channel's keepalive still notices a dead server)."""

    def __init__(self, cache_dir: Path, channel: grpc.aio.Channel, *, timeout_s: float | None = None) -> None:
        self.root = Path(cache_dir)
        self.temp_dir = self.root / "tmp"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.temp_dir.mkdir(mode=0o700, exist_ok=True)
        remove_stale_temp_files(self.temp_dir)
        self._stub = lifecycle_pb2_grpc.BlobServiceStub(channel)
        self._timeout_s = timeout_s
        self._fetches: dict[str, asyncio.Task[Path]] = {}

    async def path(self, sha256: str) -> Path:
        """The blob's local file, fetched first when absent. NotFound when the blob service has no such blob;
        Unavailable (nothing cached) when it cannot be fetched whole, or its bytes do not hash to ``sha256``."""
        target = blob_path(self.root, sha256)
        if await asyncio.to_thread(target.is_file):
            return target
        fetch = self._fetches.get(sha256)
        if fetch is None:
            fetch = asyncio.create_task(self._fetch(sha256, target), name=f"fetch blob {sha256[:12]}")
            self._fetches[sha256] = fetch
            fetch.add_done_callback(lambda done: self._fetched(sha256, done))
        # Shielded: one caller giving up (cancelled) does not stop the transfer the others wait for.
        return await asyncio.shield(fetch)

    def _fetched(self, sha256: str, done: asyncio.Task[Path]) -> None:
        if self._fetches.get(sha256) is done:
            del self._fetches[sha256]
        if not done.cancelled():
            done.exception()  # retrieved here: a failure every waiter gave up on is not logged as unhandled

    async def read_bytes(self, sha256: str) -> bytes:
        """The blob's bytes (fetched first when absent)."""
        return await asyncio.to_thread((await self.path(sha256)).read_bytes)

    async def _fetch(self, sha256: str, target: Path) -> Path:
        temp, file = await asyncio.to_thread(new_temp_file, self.temp_dir)
        try:
            digest = hashlib.sha256()
            received, total = await self._stream(sha256, file, digest)
            actual = digest.hexdigest()
            if received != total or actual != sha256:
                raise Unavailable(
                    f"blob {sha256} arrived as {received:,} bytes with SHA-256 {actual} (the blob service announced "
                    f"{total:,} bytes): it is corrupt in the blob store or was damaged on the way; nothing was cached",
                    reason="BLOB_CORRUPT",
                )
            await asyncio.to_thread(_finish, file, temp, target)
        except BaseException:
            await asyncio.to_thread(_discard, file, temp)
            raise
        log.debug("blob %s fetched (%d bytes)", sha256, received)
        return target

    async def _stream(self, sha256: str, file: IO[bytes], digest: hashlib._Hash) -> tuple[int, int]:
        """Writes the blob's bytes to ``file``: (bytes received, bytes the server announced)."""
        check_sha256(sha256)
        received = total = 0
        resumed = False
        while True:
            try:
                call = self._stub.FetchBlob(
                    lifecycle_pb2.FetchBlobRequest(sha256=sha256, offset=received), timeout=self._timeout_s
                )
                async for chunk in call:
                    total = chunk.total_bytes
                    if received + len(chunk.data) > total:
                        raise Unavailable(
                            f"the blob service sent more of blob {sha256} than the {total:,} bytes it announced; "
                            "nothing was cached",
                            reason="BLOB_CORRUPT",
                        )
                    if chunk.data:
                        await asyncio.to_thread(_append, file, digest, chunk.data)
                        received += len(chunk.data)
                    if chunk.sha256:
                        if chunk.sha256 != sha256:
                            raise Unavailable(
                                f"asked for blob {sha256}, the blob service sent {chunk.sha256}; nothing was cached",
                                reason="BLOB_CORRUPT",
                            )
                        return received, total
                broken = f"the stream ended at byte {received:,} of {total:,} without the last chunk"
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    raise NotFound(f"blob {sha256} is not in the blob store", reason="BLOB_NOT_FOUND") from None
                if error.code() not in RESUMABLE:
                    raise Unavailable(
                        f"could not fetch blob {sha256}: {error.code().name}: {error.details()}",
                        reason="BLOB_UNAVAILABLE",
                    ) from None
                broken = f"{error.code().name}: {error.details()}"
            if resumed:
                raise Unavailable(
                    f"could not fetch blob {sha256}: the transfer broke twice, the last time at byte {received:,} "
                    f"({broken}); nothing was cached",
                    reason="BLOB_UNAVAILABLE",
                )
            resumed = True
            log.warning("fetching blob %s broke at byte %d (%s); resuming from there", sha256, received, broken)


async def put_blob(channel: grpc.aio.Channel, data: bytes, *, timeout_s: float | None = None) -> str:
    """Stores ``data`` in the control plane's blob store (BlobService.PutBlob, 1 MiB chunks); returns its SHA-256.
    Refusals come as grpc.aio.AioRpcError (RESOURCE_EXHAUSTED past the service's limit)."""
    sha256 = hashlib.sha256(data).hexdigest()

    async def requests() -> AsyncIterator[lifecycle_pb2.PutBlobRequest]:
        yield lifecycle_pb2.PutBlobRequest(header=lifecycle_pb2.PutBlobHeader(sha256=sha256, size_bytes=len(data)))
        view = memoryview(data)
        for start in range(0, len(data), CHUNK_BYTES):
            yield lifecycle_pb2.PutBlobRequest(chunk=bytes(view[start : start + CHUNK_BYTES]))

    stub = lifecycle_pb2_grpc.BlobServiceStub(channel)
    response = await stub.PutBlob(requests(), timeout=timeout_s)
    if response.sha256 != sha256:
        raise Unavailable(f"the blob service stored {response.sha256} for bytes whose SHA-256 is {sha256}")
    return sha256
