"""aimass.v1.BlobService: the control plane's blob store (aimass.store.blobs) served over the mesh, so trainers and
replicas on other hosts fetch dataset files and trained heads (and trainers store what they made) without a shared
filesystem.

FetchBlob streams a blob from an offset (a broken transfer resumes where it stopped) in 1 MiB chunks, each with the
blob's size, the last with its SHA-256: the name it is stored under, which the fetcher checks the bytes against.
PutBlob takes a header (SHA-256, size) then chunks, and keeps the blob only when the bytes match the header: a
refused or interrupted upload leaves nothing behind. Disk reads and writes run in threads: the event loop never
waits on the disk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, BinaryIO, Final

import grpc

from aimass.runtime.errors import InvalidArgument, NotFound, ResourceExhausted
from aimass.store.blobs import BlobMismatch, BlobStore, BlobTooLarge, check_sha256
from aimass.v1 import lifecycle_pb2, lifecycle_pb2_grpc

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

CHUNK_BYTES: Final = 1 << 20


def _sha256_of(what: str, value: str) -> str:
    try:
        return check_sha256(value)
    except ValueError:
        raise InvalidArgument(
            f"{what} {value[:80]!r} is not a SHA-256: send the 64 lowercase hex digits of the blob's hash"
        ) from None


class BlobServicer(lifecycle_pb2_grpc.BlobServiceServicer):
    """Serves ``store``; a PutBlob may hold at most ``max_put_bytes``."""

    def __init__(self, store: BlobStore, max_put_bytes: int) -> None:
        if max_put_bytes < 0:
            raise ValueError(f"max_put_bytes is {max_put_bytes}; it must be 0 or more")
        self.store = store
        self.max_put_bytes = max_put_bytes

    async def FetchBlob(
        self, request: lifecycle_pb2.FetchBlobRequest, context: Context
    ) -> AsyncIterator[lifecycle_pb2.FetchBlobResponse]:
        sha256 = _sha256_of("sha256", request.sha256)
        try:
            handle: BinaryIO = await asyncio.to_thread(self.store.path_for(sha256).open, "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {sha256} is not in the blob store", reason="BLOB_NOT_FOUND") from None
        try:
            # The size of the file open now: a blob is never changed in place, and a deleted one stays readable.
            total = await asyncio.to_thread(lambda: handle.seek(0, 2))
            if not 0 <= request.offset <= total:
                raise InvalidArgument(
                    f"offset {request.offset} is outside blob {sha256}, which has {total} bytes: send 0-{total}"
                )
            await asyncio.to_thread(handle.seek, request.offset)
            position = request.offset
            while True:
                data = await asyncio.to_thread(handle.read, CHUNK_BYTES)
                position += len(data)
                last = position >= total or not data
                yield lifecycle_pb2.FetchBlobResponse(data=data, total_bytes=total, sha256=sha256 if last else "")
                if last:
                    return
        finally:
            await asyncio.to_thread(handle.close)

    async def PutBlob(
        self, request_iterator: AsyncIterator[lifecycle_pb2.PutBlobRequest], context: Context
    ) -> lifecycle_pb2.PutBlobResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("the first message of PutBlob must be the header (sha256, size_bytes)")
        header = first.header
        sha256 = _sha256_of("header.sha256", header.sha256)
        if header.size_bytes < 0:
            raise InvalidArgument(f"header.size_bytes is {header.size_bytes}; send the blob's size, or 0 when unknown")
        if header.size_bytes > self.max_put_bytes:
            raise self._too_large(header.size_bytes)
        # Known size: not a byte past it; unknown (0): up to the limit.
        limit = header.size_bytes or self.max_put_bytes
        with self.store.writer(limit, expected_sha256=sha256) as writer:
            async for message in request_iterator:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidArgument("only the first message of PutBlob may be a header; later ones are chunks")
                try:
                    await asyncio.to_thread(writer.write, message.chunk)
                except BlobTooLarge:
                    if header.size_bytes:
                        raise ResourceExhausted(
                            f"more bytes arrived than the header's size_bytes ({header.size_bytes:,}); nothing was "
                            "stored",
                            reason="BLOB_TOO_LARGE",
                            retry_after_ms=-1,
                            pushback_ms=-1,
                        ) from None
                    raise self._too_large(writer.size + len(message.chunk)) from None
            if header.size_bytes and writer.size != header.size_bytes:
                raise InvalidArgument(
                    f"the header announced {header.size_bytes:,} bytes but {writer.size:,} arrived; nothing was stored"
                )
            try:
                stored, size = await asyncio.to_thread(writer.commit)
            except BlobMismatch as mismatch:
                raise InvalidArgument(
                    f"the bytes received have SHA-256 {mismatch.actual}, not the header's {sha256}: they changed or "
                    "were corrupted on the way; nothing was stored, send them again",
                    reason="BLOB_MISMATCH",
                ) from None
        log.debug("blob %s stored (%d bytes)", stored, size)
        return lifecycle_pb2.PutBlobResponse(sha256=stored, size_bytes=size)

    def _too_large(self, size: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"the blob is {size:,} bytes or more; one PutBlob may hold at most {self.max_put_bytes:,}",
            reason="BLOB_TOO_LARGE",
            metadata={"limit_bytes": str(self.max_put_bytes)},
            retry_after_ms=-1,
            pushback_ms=-1,
        )
