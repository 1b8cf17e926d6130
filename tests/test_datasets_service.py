"""DatasetService on the control plane, behind the runtime's scope and error interceptors as the scheduler serves
it, over a real store and blob store: what an upload past the quota, a corrupted transfer or a malformed stream
leaves behind (nothing), and what the caller is told."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

import grpc
import pytest
from pydantic import ByteSize

from aimass.datasets.samples import tickets_csv
from aimass.runtime.config import LifecycleConfig
from aimass.runtime.interceptors import ErrorMappingInterceptor, ScopeInterceptor
from aimass.runtime.scope import RequestScope
from aimass.store.blobs import BlobStore
from aimass.store.sql import SqlStore
from aimass.v1 import datasets_pb2, datasets_pb2_grpc
from scheduler.lifecycle.datasets import DatasetServicer

TEXT = datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION
ACME = RequestScope(tenant="acme").metadata()


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[datasets_pb2_grpc.DatasetServiceAsyncStub, SqlStore, Path]]:
    store = SqlStore.open(f"sqlite:///{tmp_path / 'store.db'}")
    blob_root = tmp_path / "blobs"
    config = LifecycleConfig(storage_quota_bytes=ByteSize(48 * 1024), max_upload_bytes=ByteSize(40 * 1024))
    server = grpc.aio.server(interceptors=[ScopeInterceptor(), ErrorMappingInterceptor()])
    datasets_pb2_grpc.add_DatasetServiceServicer_to_server(DatasetServicer(store, BlobStore(blob_root), config), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield datasets_pb2_grpc.DatasetServiceStub(channel), store, blob_root
    finally:
        await channel.close()
        await server.stop(None)
        store.close()


def blobs_in(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]


def messages(
    header: datasets_pb2.UploadDatasetHeader, chunks: Iterable[bytes]
) -> Iterator[datasets_pb2.UploadDatasetRequest]:
    yield datasets_pb2.UploadDatasetRequest(header=header)
    for chunk in chunks:
        yield datasets_pb2.UploadDatasetRequest(chunk=chunk)


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_an_upload_past_the_quota_stops_there_and_keeps_nothing(
    service: tuple[datasets_pb2_grpc.DatasetServiceAsyncStub, SqlStore, Path], tmp_path: Path
) -> None:
    stub, store, root = service
    small = tickets_csv(tmp_path / "small.csv", rows=300, seed=3).read_bytes()
    assert 20_000 < len(small) < 40_000
    first = await stub.UploadDataset(
        messages(datasets_pb2.UploadDatasetHeader(name="tickets", task=TEXT), [small]), metadata=ACME
    )
    assert first.version.size_bytes == len(small) and store.storage_used("acme") == len(small)
    # The same bytes again (named by their sha256, as the CLI sends it) cost nothing; other bytes that do not fit
    # are refused as they stream (no size announced).
    same = hashlib.sha256(small).hexdigest()
    again = await stub.UploadDataset(
        messages(datasets_pb2.UploadDatasetHeader(name="tickets-copy", task=TEXT, sha256=same), [small]), metadata=ACME
    )
    assert again.version.sha256 == first.version.sha256 and store.storage_used("acme") == len(small)
    bigger = tickets_csv(tmp_path / "big.csv", rows=400, seed=4).read_bytes()
    chunks = [bigger[i : i + 4096] for i in range(0, len(bigger), 4096)]
    err = await refused(
        stub.UploadDataset(messages(datasets_pb2.UploadDatasetHeader(name="more", task=TEXT), chunks), metadata=ACME)
    )
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "storage quota" in (err.details() or "")
    assert [p.name for p in blobs_in(root)] == [first.version.sha256]
    # Announced past the quota: refused before any byte; another tenant has its own quota.
    err = await refused(
        stub.UploadDataset(
            messages(datasets_pb2.UploadDatasetHeader(name="huge", task=TEXT, size_bytes=2 << 30), []), metadata=ACME
        )
    )
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    other = await stub.UploadDataset(
        messages(datasets_pb2.UploadDatasetHeader(name="more", task=TEXT), chunks),
        metadata=RequestScope(tenant="beta").metadata(),
    )
    assert other.dataset.owner == "beta"


async def test_a_corrupted_transfer_or_a_malformed_stream_stores_nothing(
    service: tuple[datasets_pb2_grpc.DatasetServiceAsyncStub, SqlStore, Path], tmp_path: Path
) -> None:
    stub, store, root = service
    data = tickets_csv(tmp_path / "t.csv", rows=200, seed=5).read_bytes()
    wrong = hashlib.sha256(b"something else").hexdigest()
    header = datasets_pb2.UploadDatasetHeader(name="tickets", task=TEXT, sha256=wrong)
    err = await refused(stub.UploadDataset(messages(header, [data]), metadata=ACME))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "do not match" in (err.details() or "")
    header = datasets_pb2.UploadDatasetHeader(name="tickets", task=TEXT, size_bytes=len(data) + 1)
    err = await refused(stub.UploadDataset(messages(header, [data]), metadata=ACME))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "announced" in (err.details() or "")
    for bad in (
        [datasets_pb2.UploadDatasetRequest(chunk=data)],  # no header first
        messages(datasets_pb2.UploadDatasetHeader(name="Bad Name!", task=TEXT), [data]),
        messages(datasets_pb2.UploadDatasetHeader(name="tickets"), [data]),  # no task
        messages(datasets_pb2.UploadDatasetHeader(name="tickets", task=TEXT, sha256="xyz"), [data]),
        messages(datasets_pb2.UploadDatasetHeader(name="tickets", task=TEXT), []),  # empty file
        [
            *messages(datasets_pb2.UploadDatasetHeader(name="tickets", task=TEXT), [data]),
            datasets_pb2.UploadDatasetRequest(header=datasets_pb2.UploadDatasetHeader(name="again")),
        ],
    ):
        err = await refused(stub.UploadDataset(iter(bad), metadata=ACME))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert err.details()
    assert blobs_in(root) == [] and store.visible_datasets("acme") == []
