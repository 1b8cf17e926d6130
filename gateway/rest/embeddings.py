"""POST /v1/embeddings (OpenAI's shape) over NlpService.Embed.

Vectors are unit length, as OpenAI's are (Embed with normalize=true). ``encoding_format: base64`` is the vector's
little-endian float32 bytes, as OpenAI sends them (the openai SDK asks for it by default and decodes it).
``usage`` is the tokens the model read, as the NLP replica counts them (EmbedResponse.input_tokens: its own
tokenizer, special tokens included, after truncation at its window).
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict

from aimass.v1 import common_pb2, nlp_pb2
from gateway.rest.errors import OpenAIError
from gateway.rest.upstream import Upstream, call_metadata, call_timeout, upstream

router = APIRouter()

EMBED_MODEL = "all-MiniLM-L6-v2"
# Known sizes, so a wrong ``dimensions`` is refused before any work; other models are checked on their answer.
DIMENSIONS = {EMBED_MODEL: 384}


class EmbeddingsBody(BaseModel):
    # An argument OpenAI does not know is refused, as OpenAI refuses it.
    model_config = ConfigDict(extra="forbid")

    model: str = ""
    # Checked by hand below, so a wrong type gets a message about embeddings, not a pydantic union dump.
    input: Any = None
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None


def texts_of(value: Any) -> list[str]:
    """The texts of ``input``: a string or a list of strings. Token-id arrays are refused: the mesh's models take
    text, and token ids of another model's tokenizer would embed as nonsense."""
    if value is None:
        raise OpenAIError(400, "'input' is required: a string or a list of strings", param="input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if not value:
            raise OpenAIError(400, "'input' is an empty list; give at least one string", param="input")
        if all(isinstance(item, str) for item in value):
            return value
        if all(isinstance(item, (int, list)) for item in value):
            raise OpenAIError(
                400,
                "'input' as token ids is not supported: the mesh's embedding models read text; send strings",
                param="input",
            )
    raise OpenAIError(400, "'input' must be a string or a list of strings", param="input")


@router.post("/v1/embeddings")
async def create_embeddings(
    body: EmbeddingsBody, request: Request, up: Annotated[Upstream, Depends(upstream)]
) -> dict[str, Any]:
    texts = texts_of(body.input)
    if body.encoding_format not in ("float", "base64"):
        raise OpenAIError(
            400,
            f"encoding_format {body.encoding_format!r} is not supported; use 'float' or 'base64'",
            param="encoding_format",
        )
    fmt: Literal["float", "base64"] = "base64" if body.encoding_format == "base64" else "float"
    if not body.model:
        raise OpenAIError(400, f"'model' is required, e.g. {EMBED_MODEL!r}", param="model")
    if body.dimensions is not None and body.dimensions != DIMENSIONS.get(body.model, body.dimensions):
        raise _wrong_dimensions(body.model, DIMENSIONS[body.model])
    reply: nlp_pb2.EmbedResponse = await up.nlp.Embed(
        nlp_pb2.EmbedRequest(model=common_pb2.ModelRef(name=body.model), texts=texts, normalize=True),
        metadata=call_metadata(request),
        timeout=call_timeout(request),
    )
    # No embedding model here can shorten its vectors (truncating one not trained for it loses its meaning), so
    # only its own size is accepted; a model of unknown size is checked on its answer.
    if body.dimensions is not None and body.dimensions != reply.dimensions:
        raise _wrong_dimensions(reply.model.name or body.model, reply.dimensions)
    vectors = np.asarray([list(e.values) for e in reply.embeddings], dtype="<f4").reshape(len(texts), -1)
    tokens = reply.input_tokens
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encoded(vector, fmt)} for i, vector in enumerate(vectors)
        ],
        "model": reply.model.name or body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _wrong_dimensions(model: str, size: int) -> OpenAIError:
    return OpenAIError(
        400,
        f"{model} gives {size}-dimensional embeddings and cannot shorten them; leave 'dimensions' out or set it "
        f"to {size}",
        param="dimensions",
    )


def _encoded(vector: np.ndarray[Any, Any], fmt: Literal["float", "base64"]) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    floats: list[float] = vector.tolist()
    return floats
