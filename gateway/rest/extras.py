"""aimass's own endpoints where OpenAI has none, under ``/v1/aimass/``: text sentiment, entities and classification
(zero-shot labels, or a tenant's trained classifier by name), and image classification, faces and text (OCR).

Requests name the gRPC request's fields (``input`` is the texts: a string or a list of strings); answers are the
gRPC response as JSON, field for field (proto3's JSON mapping with the .proto's field names, every field present),
so the gRPC reference in protos/aimass/v1 documents them. Images come as multipart file parts named ``image``
(repeatable) or as JSON ``images``: base64 strings (a ``data:`` URL's base64 also works). The server never fetches
a URL. Errors are OpenAI-shaped like every other route; a bad key on an image upload is refused before its body is
read.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Request
from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic import BaseModel, ConfigDict

from aimass.v1 import common_pb2, nlp_pb2, vision_pb2
from gateway.rest.errors import OpenAIError
from gateway.rest.uploads import KEY_CHECKED, files_of, read_form, text_field
from gateway.rest.upstream import Upstream, call_metadata, call_timeout, request_meta, upstream

router = APIRouter(prefix="/v1/aimass")

# VisionService's own limit per request (protos/aimass/v1/vision.proto); checked there too.
MAX_IMAGES: Final = 16
INT32_MAX: Final = 2**31 - 1


def as_json(reply: Message) -> dict[str, Any]:
    """The gRPC response as JSON: the .proto's field names, defaults included (a score of 0 is a score)."""
    return json_format.MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def texts_of(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return value
    if value is None:
        raise OpenAIError(400, "'input' is required: a string or a list of strings", param="input")
    raise OpenAIError(400, "'input' must be a string or a non-empty list of strings", param="input")


def model_ref(name: str) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=name.strip())


# -- text -------------------------------------------------------------------------------------------------------


class TextBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Empty: the method's default model (vader, en_core_web_sm, all-MiniLM-L6-v2).
    model: str = ""
    input: Any = None


class ClassifyBody(TextBody):
    # Zero-shot candidate labels; leave out for a trained classifier, which has its own.
    labels: list[str] = []
    multi_label: bool = False
    hypothesis_template: str = ""


@router.post("/sentiment")
async def sentiment(body: TextBody, request: Request, up: Annotated[Upstream, Depends(upstream)]) -> dict[str, Any]:
    reply = await up.nlp.Sentiment(
        nlp_pb2.SentimentRequest(meta=request_meta(request), model=model_ref(body.model), texts=texts_of(body.input)),
        metadata=call_metadata(request),
        timeout=call_timeout(request),
    )
    return as_json(reply)


@router.post("/entities")
async def entities(body: TextBody, request: Request, up: Annotated[Upstream, Depends(upstream)]) -> dict[str, Any]:
    reply = await up.nlp.Entities(
        nlp_pb2.EntitiesRequest(meta=request_meta(request), model=model_ref(body.model), texts=texts_of(body.input)),
        metadata=call_metadata(request),
        timeout=call_timeout(request),
    )
    return as_json(reply)


@router.post("/classify")
async def classify(body: ClassifyBody, request: Request, up: Annotated[Upstream, Depends(upstream)]) -> dict[str, Any]:
    reply = await up.nlp.Classify(
        nlp_pb2.ClassifyRequest(
            meta=request_meta(request),
            model=model_ref(body.model),
            texts=texts_of(body.input),
            labels=body.labels,
            multi_label=body.multi_label,
            hypothesis_template=body.hypothesis_template,
        ),
        metadata=call_metadata(request),
        timeout=call_timeout(request),
    )
    return as_json(reply)


# -- images -----------------------------------------------------------------------------------------------------


def image_body(**fields: dict[str, Any]) -> dict[str, Any]:
    """/openapi.json's description of an image route's body (read by hand, after the key check)."""
    common = {"model": {"type": "string"}, **fields}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {"image": {"type": "array", "items": {"type": "string", "format": "binary"}}}
                        | common,
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["images"],
                        "properties": {
                            "images": {"type": "array", "items": {"type": "string", "description": "base64"}}
                        }
                        | common,
                    }
                },
            },
        }
    }


def _decoded(index: int, value: Any) -> vision_pb2.Image:
    """One JSON image: base64, or a data: URL's base64. A URL to fetch is refused, never fetched."""
    if not isinstance(value, str) or not value:
        raise OpenAIError(400, f"images[{index}] must be a non-empty base64 string", param=f"images[{index}]")
    text, mime = value.strip(), ""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise OpenAIError(400, f"images[{index}] is a data: URL without ;base64", param=f"images[{index}]")
        mime = header[5:].split(";")[0]
    elif text.startswith(("http://", "https://", "file:", "ftp://")):
        raise OpenAIError(
            400,
            f"images[{index}] is a URL; this server never fetches URLs: send the image's bytes (base64, or a multipart "
            "file part named 'image')",
            param=f"images[{index}]",
        )
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise OpenAIError(400, f"images[{index}] is not valid base64", param=f"images[{index}]") from None
    return vision_pb2.Image(data=data, mime_type=mime)


async def _images_and_options(request: Request) -> tuple[list[vision_pb2.Image], dict[str, Any]]:
    """The images and the other fields, from a multipart form (files named ``image``, fields as text) or a JSON
    body (``images`` as base64). JSON fields keep their JSON types; form fields are converted by ``_option``."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/"):
        form = await read_form(request, max_files=MAX_IMAGES)
        try:
            uploads = files_of(form, "image") + files_of(form, "images")
            if len(uploads) > MAX_IMAGES:
                raise OpenAIError(400, f"{len(uploads)} images; at most {MAX_IMAGES} per request", param="image")
            if not uploads:
                raise _no_image()
            images = [
                vision_pb2.Image(data=await upload.read(), mime_type=upload.content_type or "") for upload in uploads
            ]
            options: dict[str, Any] = {key: text_field(form, key) for key in form if key not in ("image", "images")}
        finally:
            await form.close()
    else:
        try:
            body = json.loads(await request.body())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise OpenAIError(
                400,
                f"send JSON with base64 'images' or a multipart form with 'image' files ({err})",
                code="invalid_json",
            ) from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "the body must be a JSON object", code="invalid_json")
        raw = body.pop("images", None)
        if raw is not None and not isinstance(raw, list):
            raw = [raw]
        if raw is not None and len(raw) > MAX_IMAGES:
            raise OpenAIError(400, f"{len(raw)} images; at most {MAX_IMAGES} per request", param="images")
        images = [_decoded(i, value) for i, value in enumerate(raw or [])]
        options = body
    if not images:
        raise _no_image()
    return images, options


def _no_image() -> OpenAIError:
    return OpenAIError(
        400, "'image' is required: a multipart file part named 'image', or JSON 'images' (base64)", param="image"
    )


def _option(options: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    """A field of either body, as ``kind``; a form's text is converted, a wrong JSON type refused."""
    value = options.pop(name, None)
    if value is None or value == "":
        return default
    try:
        if kind is list:
            if isinstance(value, str):
                return [part.strip() for part in value.split(",") if part.strip()]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
            raise ValueError
        if isinstance(value, (bool, list, dict)):
            raise ValueError
        converted = kind(value)
        if kind is int and not -INT32_MAX <= converted <= INT32_MAX:
            raise ValueError
        return converted
    except (TypeError, ValueError):
        wanted = {int: "an integer", float: "a number", str: "a string", list: "a list of strings"}[kind]
        raise OpenAIError(400, f"'{name}' must be {wanted}", param=name) from None


def _no_more(options: dict[str, Any]) -> None:
    if options:
        raise OpenAIError(400, f"unknown field(s): {', '.join(sorted(options))}", param=sorted(options)[0])


async def _vision_call(request: Request) -> tuple[list[vision_pb2.Image], dict[str, Any], common_pb2.ModelRef]:
    images, options = await _images_and_options(request)
    model = model_ref(_option(options, "model", str, ""))
    return images, options, model


@router.post("/vision/classify", dependencies=[KEY_CHECKED], openapi_extra=image_body(top_k={"type": "integer"}))
async def vision_classify(request: Request, up: Annotated[Upstream, Depends(upstream)]) -> dict[str, Any]:
    images, options, model = await _vision_call(request)
    top_k = _option(options, "top_k", int, 0)
    _no_more(options)
    reply = await up.vision.Classify(
        vision_pb2.VisionServiceClassifyRequest(meta=request_meta(request), model=model, images=images, top_k=top_k),
        metadata=call_metadata(request),
        timeout=call_timeout(request),
    )
    return as_json(reply)


@router.post(
    "/vision/faces",
    dependencies=[KEY_CHECKED],
    openapi_extra=image_body(min_score={"type": "number"}, max_faces={"type": "integer"}),
)
async def vision_faces(request: Request, up: Annotated[Upstream, Depends(upstream)]) -> dict[str, Any]:
    images, options, model = await _vision_call(request)
    min_score = _option(options, "min_score", float, 0.0)
    max_faces = _option(options, "max_faces", int, 0)
    _no_more(options)
    reply = await up.vision.DetectFaces(
        vision_pb2.DetectFacesRequest(
            meta=request_meta(request), model=model, images=images, min_score=min_score, max_faces=max_faces
        ),
        metadata=call_metadata(request),
        timeout=call_timeout(request),
    )
    return as_json(reply)


@router.post(
    "/vision/ocr",
    dependencies=[KEY_CHECKED],
    openapi_extra=image_body(
        languages={"type": "array", "items": {"type": "string"}}, min_confidence={"type": "number"}
    ),
)
async def vision_ocr(request: Request, up: Annotated[Upstream, Depends(upstream)]) -> dict[str, Any]:
    images, options, model = await _vision_call(request)
    languages = _option(options, "languages", list, [])
    min_confidence = _option(options, "min_confidence", float, 0.0)
    _no_more(options)
    reply = await up.vision.ReadText(
        vision_pb2.ReadTextRequest(
            meta=request_meta(request), model=model, images=images, languages=languages, min_confidence=min_confidence
        ),
        metadata=call_metadata(request),
        timeout=call_timeout(request),
    )
    return as_json(reply)
