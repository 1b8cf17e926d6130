"""Content-addressed blobs on local disk: dataset files and trained heads, each named by the SHA-256 of its bytes.

Layout: ``root/ab/abcdef...`` (the first two hex digits as a directory, the whole hash as the file name), and
``root/tmp/`` for blobs being written. A blob appears under its name only complete and verified: a writer streams
into a temporary file, hashing as it goes, then fsyncs and renames it into place (atomic on one filesystem); a writer
left without commit removes its temporary file, so nothing is ever half-stored. Blobs are never modified in place.

Synchronous, like the SQL store: async callers run reads and writes with ``asyncio.to_thread``. Holds tenants' data,
so the directories are owner-only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Final

SHA256_PATTERN: Final = re.compile(r"^[0-9a-f]{64}$")
# Temporary files older than this were left by a process that died mid-write; the next BlobStore removes them.
STALE_TEMP_S: Final = 3600.0
_TEMP_DIR: Final = "tmp"


class BlobError(Exception):
    """Base of the blob store's errors."""


class BlobNotFound(BlobError, FileNotFoundError):
    """An absent blob: a FileNotFoundError too, as code reading files expects."""

    def __init__(self, sha256: str) -> None:
        super().__init__(f"blob {sha256} is not in the blob store")
        self.sha256 = sha256


class BlobTooLarge(BlobError, ValueError):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"the blob passed {max_bytes:,} bytes, the most this write may hold")
        self.max_bytes = max_bytes


class BlobMismatch(BlobError, ValueError):
    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"expected SHA-256 {expected}, the bytes have {actual}")
        self.expected = expected
        self.actual = actual


def check_sha256(sha256: str) -> str:
    """``sha256`` when it is 64 lowercase hex digits, else ValueError (before it is ever used as a file name)."""
    if not isinstance(sha256, str) or not SHA256_PATTERN.match(sha256):
        shown = sha256[:80] if isinstance(sha256, str) else type(sha256).__name__
        raise ValueError(f"{shown!r} is not a SHA-256: send 64 lowercase hex digits")
    return sha256


def blob_path(root: Path, sha256: str) -> Path:
    """Where the blob ``sha256`` lives under ``root`` (the layout the blob store and caches share)."""
    check_sha256(sha256)
    return root / sha256[:2] / sha256


def fsync_dir(path: Path) -> None:
    """Makes a rename into ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_temp_file(temp_dir: Path) -> tuple[Path, IO[bytes]]:
    """A new owner-only file in ``temp_dir``, open for writing."""
    path = temp_dir / f"{secrets.token_hex(8)}.part"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    return path, os.fdopen(fd, "wb")


def remove_stale_temp_files(temp_dir: Path, older_than_s: float = STALE_TEMP_S) -> int:
    """Removes temporary files not written for ``older_than_s`` (a dead writer's); returns how many."""
    removed = 0
    cutoff = time.time() - older_than_s
    for leftover in temp_dir.glob("*.part"):
        with contextlib.suppress(FileNotFoundError):
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
                removed += 1
    return removed


class BlobWriter:
    """Streams one blob into the store (``BlobStore.writer``): ``write`` chunks, then ``commit``. Used as a context
    manager; leaving the block without a commit (an error, a cancelled upload) removes what was written."""

    def __init__(self, store: BlobStore, max_bytes: int, expected_sha256: str = "") -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes is {max_bytes}; it must be 0 or more")
        if expected_sha256:
            check_sha256(expected_sha256)
        self._store = store
        self.max_bytes = max_bytes
        self.expected_sha256 = expected_sha256
        self.size = 0
        self._hash = hashlib.sha256()
        self._temp, self._file = new_temp_file(store.temp_dir)
        self._done = False

    def write(self, chunk: bytes) -> None:
        """Appends ``chunk``; BlobTooLarge (nothing of the chunk written) when it would pass ``max_bytes``."""
        if self._done:
            raise BlobError("this blob writer is closed")
        if self.size + len(chunk) > self.max_bytes:
            raise BlobTooLarge(self.max_bytes)
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def commit(self) -> tuple[str, int]:
        """Makes the blob durable under its name; returns (sha256, size). BlobMismatch (and nothing kept) when
        ``expected_sha256`` was given and the bytes differ."""
        if self._done:
            raise BlobError("this blob writer is closed")
        sha256 = self._hash.hexdigest()
        if self.expected_sha256 and sha256 != self.expected_sha256:
            self.abort()
            raise BlobMismatch(self.expected_sha256, sha256)
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            target = self._store.path_for(sha256)
            target.parent.mkdir(mode=0o700, exist_ok=True)
            # The same bytes may be there already (stored twice): replacing them with identical ones is harmless.
            os.replace(self._temp, target)
            fsync_dir(target.parent)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return sha256, self.size

    def abort(self) -> None:
        """Drops what was written (a no-op after commit)."""
        if self._done:
            return
        self._done = True
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self._temp.unlink()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.abort()


class BlobStore:
    """Blobs under ``root`` (created owner-only when absent); see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.temp_dir = self.root / _TEMP_DIR
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.temp_dir.mkdir(mode=0o700, exist_ok=True)
        remove_stale_temp_files(self.temp_dir)

    def path_for(self, sha256: str) -> Path:
        """Where the blob ``sha256`` is or would be (ValueError for a malformed hash)."""
        return blob_path(self.root, sha256)

    def writer(self, max_bytes: int, expected_sha256: str = "") -> BlobWriter:
        """A writer of one blob of at most ``max_bytes``, checked against ``expected_sha256`` when given."""
        return BlobWriter(self, max_bytes, expected_sha256)

    def put_bytes(self, data: bytes) -> str:
        """Stores ``data``; returns its SHA-256."""
        with self.writer(len(data)) as writer:
            writer.write(data)
            sha256, _ = writer.commit()
        return sha256

    def has(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def path(self, sha256: str) -> Path:
        """The blob's file (to read, never to change); BlobNotFound when absent."""
        path = self.path_for(sha256)
        if not path.is_file():
            raise BlobNotFound(sha256)
        return path

    def size(self, sha256: str) -> int:
        try:
            return self.path_for(sha256).stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(sha256) from None

    def read_bytes(self, sha256: str) -> bytes:
        try:
            return self.path_for(sha256).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(sha256) from None

    def delete(self, sha256: str) -> int:
        """Removes the blob; returns the bytes freed (0 when it was not there)."""
        path = self.path_for(sha256)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size
