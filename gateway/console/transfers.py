"""The console's two file transfers, which JSON cannot carry well: a dataset upload (the file's bytes as the request
body, streamed to DatasetService.UploadDataset in chunks as they arrive: the page shows the upload's progress) and a
model's edge export (DeploymentService.ExportModel's chunks streamed back as a ZIP download)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from google.protobuf import json_format

from aimass.runtime.config import Settings
from aimass.v1 import datasets_pb2, datasets_pb2_grpc, deployments_pb2, deployments_pb2_grpc
from gateway.console.rpc import as_json, find_rpc, first_reply, parsed
from gateway.rest.errors import OpenAIError
from gateway.rest.upstream import Upstream, call_metadata, call_timeout, request_meta, upstream

router = APIRouter(prefix="/api")

# DatasetService takes chunks of at most 4 MiB.
CHUNK_BYTES: Final = 1 << 20


@router.post("/datasets/upload")
async def upload_dataset(
    request: Request,
    up: Annotated[Upstream, Depends(upstream)],
    name: Annotated[str, Query(max_length=63)],
    task: Annotated[str, Query(max_length=64)] = "",
    format: Annotated[str, Query(max_length=64)] = "",
    text_column: Annotated[str, Query(max_length=128)] = "",
    label_column: Annotated[str, Query(max_length=128)] = "",
) -> JSONResponse:
    """The body is the file (CSV, JSONL or a ZIP of images, one folder per label); the query names the dataset as
    UploadDatasetHeader does (task and format as their enum names, e.g. TRAINING_TASK_TEXT_CLASSIFICATION)."""
    settings: Settings = request.app.state.settings
    limit = int(settings.console.max_dataset_bytes)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise OpenAIError(413, f"the dataset is larger than {limit:,} bytes, this console's limit", code="too_large")
    fields: dict[str, Any] = {"name": name, "text_column": text_column, "label_column": label_column}
    fields |= {"task": task} if task else {}
    fields |= {"format": format} if format else {}
    if declared.isdigit():
        fields["size_bytes"] = int(declared)
    try:
        header = json_format.ParseDict(fields, datasets_pb2.UploadDatasetHeader())
    except json_format.ParseError as err:
        raise OpenAIError(400, f"the dataset's task or format is not one DatasetService knows: {err}") from None
    header.meta.CopyFrom(request_meta(request))

    async def parts() -> AsyncIterator[datasets_pb2.UploadDatasetRequest]:
        yield datasets_pb2.UploadDatasetRequest(header=header)
        pending = bytearray()
        received = 0
        async for piece in request.stream():
            received += len(piece)
            if received > limit:
                raise OpenAIError(413, f"the dataset is larger than {limit:,} bytes, this console's limit")
            pending += piece
            while len(pending) >= CHUNK_BYTES:
                yield datasets_pb2.UploadDatasetRequest(chunk=bytes(pending[:CHUNK_BYTES]))
                del pending[:CHUNK_BYTES]
        if pending:
            yield datasets_pb2.UploadDatasetRequest(chunk=bytes(pending))

    datasets = datasets_pb2_grpc.DatasetServiceStub(up.channel)
    reply = await datasets.UploadDataset(parts(), metadata=call_metadata(request), timeout=call_timeout(request))
    return JSONResponse(as_json(reply))


@router.post("/export")
async def export_model(request: Request, up: Annotated[Upstream, Depends(upstream)]) -> StreamingResponse:
    """The body is an ExportModelRequest as JSON; the answer is the ZIP (a file name and its size in the headers)."""
    rpc = find_rpc("DeploymentService", "ExportModel")
    message = await parsed(request, rpc)
    assert isinstance(message, deployments_pb2.ExportModelRequest)
    call = deployments_pb2_grpc.DeploymentServiceStub(up.channel).ExportModel(
        message, metadata=call_metadata(request), timeout=call_timeout(request)
    )
    first, chunks = await first_reply(call)
    if first is None:
        raise OpenAIError(502, "the export ended before its first chunk")
    filename = first.filename or "model.zip"
    headers = {"content-disposition": f"attachment; filename={json.dumps(filename)}", "cache-control": "no-store"}
    if first.total_bytes > 0:
        headers["content-length"] = str(first.total_bytes)

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first.data
            async for chunk in chunks:
                yield chunk.data
        finally:
            call.cancel()

    return StreamingResponse(body(), media_type="application/zip", headers=headers)
