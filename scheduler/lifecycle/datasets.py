"""DatasetService on the control plane: tenants upload labelled data, which is validated, stored once by content
and kept as immutable versions (aimass.v1.DatasetService; the proto says every rule).

The bytes go to the blob store as they arrive (never held in memory whole) under the tenant's storage quota; the
file is validated once complete (aimass.datasets, in a thread), and only a file that validates is recorded. Anything
refused leaves nothing behind: the blob is removed unless another dataset version already holds the same bytes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc

from aimass.datasets.parsing import DatasetError, ParsedDataset, parse_dataset, preview
from aimass.runtime.config import LifecycleConfig
from aimass.runtime.errors import InvalidArgument, NotFound, ResourceExhausted
from aimass.runtime.scope import current_scope
from aimass.store.blobs import BlobMismatch, BlobStore, BlobTooLarge
from aimass.store.records import DatasetVersionRecord, now_ms
from aimass.store.sql import QuotaExceeded, SqlStore
from aimass.tenancy.keys import check_tenant_id
from aimass.v1 import datasets_pb2, datasets_pb2_grpc
from scheduler.lifecycle.names import check_name

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

MAX_CHUNK_BYTES = 4 << 20
MAX_PREVIEW_ROWS = 50
DEFAULT_PREVIEW_ROWS = 5
TASK_NAMES = {
    datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION: "text-classification",
    datasets_pb2.TRAINING_TASK_IMAGE_CLASSIFICATION: "image-classification",
}


def caller() -> str:
    """The verified tenant of this call (the gateway attests it); anonymous callers own nothing."""
    return current_scope().tenant or "anonymous"


def version_message(record: DatasetVersionRecord) -> datasets_pb2.DatasetVersion:
    return datasets_pb2.DatasetVersion(
        version=record.version,
        sha256=record.sha256,
        size_bytes=record.size_bytes,
        rows=record.rows,
        classes=[datasets_pb2.ClassCount(label=label, count=count) for label, count in record.classes],
        created_unix_ms=record.created_unix_ms,
        format=record.format,
    )


def quota_refusal(used: int, quota: int, wanted: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"this upload ({wanted:,} bytes) would take the tenant's datasets past its storage quota: {used:,} of "
        f"{quota:,} bytes are in use; delete dataset versions you no longer need (aimass datasets delete)",
        reason="STORAGE_QUOTA",
        metadata={"used_bytes": str(used), "quota_bytes": str(quota)},
        retry_after_ms=-1,
        pushback_ms=-1,
    )


class DatasetServicer(datasets_pb2_grpc.DatasetServiceServicer):
    def __init__(self, store: SqlStore, blobs: BlobStore, config: LifecycleConfig) -> None:
        self.store = store
        self.blobs = blobs
        self.config = config
        # Uploads and deletes of the same bytes take turns: a failed upload must not remove a blob another upload
        # of the same file has just recorded.
        self._blob_locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    # -- upload ----------------------------------------------------------------------------------------------------

    async def UploadDataset(
        self, request_iterator: AsyncIterator[datasets_pb2.UploadDatasetRequest], context: Context
    ) -> datasets_pb2.UploadDatasetResponse:
        owner = caller()
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("the first message of UploadDataset must be the header (name, task, format)")
        header = first.header
        check_name("dataset", header.name)
        if header.task not in TASK_NAMES:
            raise InvalidArgument(
                "task is required: TRAINING_TASK_TEXT_CLASSIFICATION (CSV or JSONL) or "
                "TRAINING_TASK_IMAGE_CLASSIFICATION (a ZIP of one folder per label)"
            )
        if header.sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", header.sha256):
            raise InvalidArgument(
                f"sha256 {header.sha256[:80]!r} is not a SHA-256 (64 hex digits); send the file's or leave it empty"
            )
        if header.size_bytes < 0:
            raise InvalidArgument(f"size_bytes is {header.size_bytes}; send the file's size or 0 when unknown")
        quota = int(self.config.storage_quota_bytes)
        limit = int(self.config.max_upload_bytes)
        used = await asyncio.to_thread(self.store.storage_used, owner)
        if header.size_bytes > limit:
            raise ResourceExhausted(
                f"the file is {header.size_bytes:,} bytes; one upload may be at most {limit:,}",
                reason="UPLOAD_TOO_LARGE",
                retry_after_ms=-1,
                pushback_ms=-1,
            )
        # An upload stops as soon as it passes what the quota leaves, unless the header names bytes the tenant holds
        # already (a new name or a re-upload of the same file costs nothing; the store checks exactly at the end).
        owned = await self._owns_blob(owner, header.sha256.lower())
        if not owned and used + header.size_bytes > quota:
            raise quota_refusal(used, quota, header.size_bytes)
        room = quota if owned else max(quota - used, 0)
        sha256, size = await self._receive(request_iterator, header, max_bytes=min(limit, room), used=used)
        async with self._blob_locks[sha256]:
            try:
                return await self._record(owner, header, sha256, size)
            except BaseException:
                await self._forget_blob(sha256)
                raise

    async def _receive(
        self,
        requests: AsyncIterator[datasets_pb2.UploadDatasetRequest],
        header: datasets_pb2.UploadDatasetHeader,
        *,
        max_bytes: int,
        used: int,
    ) -> tuple[str, int]:
        """Writes the chunks to the blob store; (sha256, size) of the committed blob."""
        quota = int(self.config.storage_quota_bytes)
        received = 0
        with self.blobs.writer(max_bytes=max_bytes, expected_sha256=header.sha256.lower()) as writer:
            async for message in requests:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidArgument(
                        "only the first message of UploadDataset may be a header; later ones are chunks"
                    )
                if len(message.chunk) > MAX_CHUNK_BYTES:
                    raise InvalidArgument(f"a chunk is {len(message.chunk):,} bytes; send at most {MAX_CHUNK_BYTES:,}")
                received += len(message.chunk)
                try:
                    await asyncio.to_thread(writer.write, message.chunk)
                except BlobTooLarge:
                    limit = int(self.config.max_upload_bytes)
                    if received > limit:
                        raise ResourceExhausted(
                            f"the upload passed {limit:,} bytes, the most one upload may be",
                            reason="UPLOAD_TOO_LARGE",
                            retry_after_ms=-1,
                            pushback_ms=-1,
                        ) from None
                    raise quota_refusal(used, quota, received) from None
            if header.size_bytes and received != header.size_bytes:
                raise InvalidArgument(
                    f"the header announced {header.size_bytes:,} bytes but {received:,} arrived; nothing was stored"
                )
            if not received:
                raise InvalidArgument("the file is empty: send its bytes as chunks after the header")
            try:
                return await asyncio.to_thread(writer.commit)
            except BlobMismatch as e:
                raise InvalidArgument(
                    f"the bytes received do not match the header's sha256 ({e}); the file changed or was corrupted "
                    "on the way, nothing was stored: send it again"
                ) from None

    async def _record(
        self, owner: str, header: datasets_pb2.UploadDatasetHeader, sha256: str, size: int
    ) -> datasets_pb2.UploadDatasetResponse:
        text_column = header.text_column or "text"
        label_column = header.label_column or "label"
        try:
            parsed: ParsedDataset = await asyncio.to_thread(
                parse_dataset,
                self.blobs.path(sha256),
                task=header.task,
                fmt=header.format,
                text_column=text_column,
                label_column=label_column,
            )
        except DatasetError as e:
            raise InvalidArgument(f"dataset {header.name!r} was not stored: {e}", reason="INVALID_DATASET") from None
        record = DatasetVersionRecord(
            owner=owner,
            name=header.name,
            version=sha256[:12],
            sha256=sha256,
            size_bytes=size,
            rows=len(parsed.examples),
            task=header.task,
            format=datasets_pb2.DatasetFormat.ValueType(parsed.format),
            text_column=text_column,
            label_column=label_column,
            classes=[(c.label, c.count) for c in parsed.report.classes],
            report=parsed.report.SerializeToString(),
            created_unix_ms=now_ms(),
        )
        existing = await asyncio.to_thread(self.store.dataset_versions, owner, header.name)
        if existing and existing[0].task != header.task:
            raise InvalidArgument(
                f"dataset {header.name!r} holds {TASK_NAMES[existing[0].task]} data; upload this file under another "
                "name"
            )
        try:
            stored, already = await asyncio.to_thread(
                self.store.add_dataset_version, record, quota_bytes=int(self.config.storage_quota_bytes)
            )
        except QuotaExceeded as e:
            raise quota_refusal(e.used, e.quota, e.wanted) from None
        log.info(
            "dataset %s/%s version %s: %d rows kept of %d (%d bytes)%s",
            owner,
            header.name,
            stored.version,
            parsed.report.rows_kept,
            parsed.report.rows_read,
            size,
            " (already there)" if already else "",
        )
        return datasets_pb2.UploadDatasetResponse(
            dataset=await self._info(owner, owner, header.name),
            version=version_message(stored),
            report=parsed.report,
            already_existed=already,
        )

    async def _owns_blob(self, owner: str, sha256: str) -> bool:
        if not sha256:
            return False
        summaries = await asyncio.to_thread(self.store.visible_datasets, owner)
        return any(v.sha256 == sha256 for s in summaries if s.owner == owner for v in s.versions)

    async def _forget_blob(self, sha256: str) -> None:
        """Removes a blob no dataset version or model refers to (what a refused upload left)."""
        if not await asyncio.to_thread(self.store.sha256_referenced, sha256):
            await asyncio.to_thread(self.blobs.delete, sha256)

    # -- reading ---------------------------------------------------------------------------------------------------

    async def _info(self, viewer: str, owner: str, name: str) -> datasets_pb2.DatasetInfo:
        versions = await asyncio.to_thread(self.store.dataset_versions, owner, name)
        grants = await asyncio.to_thread(self.store.dataset_grants, owner, name) if viewer == owner else []
        return datasets_pb2.DatasetInfo(
            name=name,
            owner=owner,
            task=versions[0].task if versions else datasets_pb2.TRAINING_TASK_UNSPECIFIED,
            versions=[version_message(v) for v in versions],
            shared_with=sorted(grants),
        )

    async def ListDatasets(
        self, request: datasets_pb2.ListDatasetsRequest, context: Context
    ) -> datasets_pb2.ListDatasetsResponse:
        viewer = caller()
        summaries = await asyncio.to_thread(self.store.visible_datasets, viewer)
        return datasets_pb2.ListDatasetsResponse(
            datasets=[
                datasets_pb2.DatasetInfo(
                    name=s.name,
                    owner=s.owner,
                    task=s.task,
                    versions=[version_message(v) for v in s.versions],
                    shared_with=sorted(s.shared_with) if s.owner == viewer else [],
                )
                for s in sorted(summaries, key=lambda s: (s.owner, s.name))
            ]
        )

    async def resolve(self, viewer: str, ref: datasets_pb2.DatasetRef) -> DatasetVersionRecord:
        """The version ``ref`` names, as ``viewer`` may see it; NOT_FOUND (the same words whether it does not exist
        or is not shared with the viewer)."""
        check_name("dataset", ref.name)
        owner = ref.owner or viewer
        record = await asyncio.to_thread(self.store.get_dataset_version, viewer, owner, ref.name, ref.version or None)
        if record is None:
            whose = "" if owner == viewer else f" of tenant {owner!r}"
            version = f" version {ref.version!r}" if ref.version else ""
            raise NotFound(
                f"no dataset {ref.name!r}{version}{whose}; `aimass datasets list` shows those you can use",
                reason="DATASET_NOT_FOUND",
            )
        return record

    async def DescribeDataset(
        self, request: datasets_pb2.DescribeDatasetRequest, context: Context
    ) -> datasets_pb2.DescribeDatasetResponse:
        viewer = caller()
        if not 0 <= request.preview_rows <= MAX_PREVIEW_ROWS:
            raise InvalidArgument(f"preview_rows is {request.preview_rows}; send 0-{MAX_PREVIEW_ROWS}")
        record = await self.resolve(viewer, request.dataset)
        report = datasets_pb2.ValidationReport.FromString(record.report)
        rows = request.preview_rows or DEFAULT_PREVIEW_ROWS
        parsed = await asyncio.to_thread(
            parse_dataset,
            self.blobs.path(record.sha256),
            task=record.task,
            fmt=record.format,
            text_column=record.text_column,
            label_column=record.label_column,
        )
        return datasets_pb2.DescribeDatasetResponse(
            dataset=await self._info(viewer, record.owner, record.name),
            version=version_message(record),
            report=report,
            preview=preview(parsed, rows),
        )

    # -- owner's changes -------------------------------------------------------------------------------------------

    async def DeleteDataset(
        self, request: datasets_pb2.DeleteDatasetRequest, context: Context
    ) -> datasets_pb2.DeleteDatasetResponse:
        owner = caller()
        ref = request.dataset
        if ref.owner and ref.owner != owner:
            # Another tenant's dataset, shared or not, is not the caller's to delete: as if it did not exist.
            raise NotFound(
                f"no dataset {ref.name!r} of yours; only its owner may delete it", reason="DATASET_NOT_FOUND"
            )
        await self.resolve(owner, datasets_pb2.DatasetRef(name=ref.name, version=ref.version))
        deleted = await asyncio.to_thread(self.store.delete_dataset, owner, ref.name, ref.version or None)
        freed = 0
        for record in deleted:
            async with self._blob_locks[record.sha256]:
                if not await asyncio.to_thread(self.store.sha256_referenced, record.sha256):
                    freed += await asyncio.to_thread(self.blobs.delete, record.sha256)
        log.info("dataset %s/%s: deleted %d versions (%d bytes)", owner, ref.name, len(deleted), freed)
        return datasets_pb2.DeleteDatasetResponse(deleted_versions=[r.version for r in deleted], freed_bytes=freed)

    async def ShareDataset(
        self, request: datasets_pb2.ShareDatasetRequest, context: Context
    ) -> datasets_pb2.ShareDatasetResponse:
        owner = caller()
        await self.resolve(owner, datasets_pb2.DatasetRef(name=request.name))
        if not request.tenant:
            raise InvalidArgument("tenant is required: the tenant to share the dataset with")
        try:
            check_tenant_id(request.tenant)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        if request.tenant == owner:
            raise InvalidArgument("a dataset is always its owner's: name another tenant to share it with")
        if request.revoke:
            await asyncio.to_thread(self.store.revoke_dataset, owner, request.name, request.tenant)
        else:
            await asyncio.to_thread(self.store.grant_dataset, owner, request.name, request.tenant)
        return datasets_pb2.ShareDatasetResponse(dataset=await self._info(owner, owner, request.name))
