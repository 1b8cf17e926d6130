"""/v1/embeddings of the OpenAI-compatible REST front door, called with the openai SDK on a mesh started by
`aimass up`: the vectors are the gRPC Embed's, in both encodings, and refusals come with the statuses and error
shapes the SDK maps to its exception classes."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from aimass.local_mesh import LocalMesh
from aimass.tenancy import keys
from aimass.v1 import common_pb2, nlp_pb2, nlp_pb2_grpc
from tests.security import key_for

MODEL = "all-MiniLM-L6-v2"
TEXTS = ["The cat sat on the mat.", "Quarterly revenue grew by twelve percent.", "Der Hund bellt."]


def client(mesh: LocalMesh, api_key: str | None = None) -> openai.OpenAI:
    # No automatic retries: a test must see each answer as it came.
    return openai.OpenAI(base_url=mesh.rest_url, api_key=api_key or mesh.api_key, max_retries=0, timeout=120)


def grpc_embed(mesh: LocalMesh, texts: list[str]) -> np.ndarray[Any, Any]:
    with mesh.channel() as channel:
        reply = nlp_pb2_grpc.NlpServiceStub(channel).Embed(
            nlp_pb2.EmbedRequest(model=common_pb2.ModelRef(name=MODEL), texts=texts, normalize=True), timeout=60
        )
    return np.asarray([list(e.values) for e in reply.embeddings], dtype=np.float32)


def test_embeddings_equal_the_grpc_embed_in_both_encodings(front_door_mesh: LocalMesh) -> None:
    expected = grpc_embed(front_door_mesh, TEXTS)
    c = client(front_door_mesh)
    as_floats = c.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    # The SDK asks for base64 by default and decodes it itself.
    as_base64 = c.embeddings.create(model=MODEL, input=TEXTS)
    for reply in (as_floats, as_base64):
        assert reply.object == "list" and reply.model == MODEL
        assert [d.index for d in reply.data] == [0, 1, 2]
        vectors = np.asarray([d.embedding for d in reply.data], dtype=np.float32)
        assert vectors.shape == (3, 384)
        np.testing.assert_allclose(vectors, expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)  # unit length, as OpenAI's
        assert reply.usage.prompt_tokens == reply.usage.total_tokens > 3 * 2

    # One string is one embedding; the raw base64 is little-endian float32, exactly the float answer's values.
    raw = httpx.post(
        f"{front_door_mesh.rest_url}/embeddings",
        json={"model": MODEL, "input": "hello world", "encoding_format": "base64", "dimensions": 384, "user": "u1"},
        headers={"authorization": f"Bearer {front_door_mesh.api_key}"},
        timeout=60,
    )
    assert raw.status_code == 200, raw.text
    body = raw.json()
    decoded = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, grpc_embed(front_door_mesh, ["hello world"])[0], rtol=0, atol=1e-6)
    # [CLS] hello world [SEP]: the WordPiece tokens the model reads.
    assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 4}


def test_refusals_have_the_status_and_shape_the_sdk_expects(front_door_mesh: LocalMesh) -> None:
    c = client(front_door_mesh)
    with pytest.raises(openai.NotFoundError) as unknown:
        c.embeddings.create(model="text-embedding-3-small", input="hi")
    assert "text-embedding-3-small" in unknown.value.message
    assert unknown.value.type == "invalid_request_error"

    # OpenAI's error shape, field for field, naming the missing field.
    missing = httpx.post(
        f"{front_door_mesh.rest_url}/embeddings",
        json={"model": MODEL},
        headers={"authorization": f"Bearer {front_door_mesh.api_key}"},
        timeout=60,
    )
    assert missing.status_code == 400
    error = missing.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == "input" and "'input' is required" in error["message"]
    assert error["type"] == "invalid_request_error"

    with pytest.raises(openai.BadRequestError) as token_ids:
        c.embeddings.create(model=MODEL, input=[[101, 7592, 102]])
    assert "token ids" in token_ids.value.message

    with pytest.raises(openai.BadRequestError) as dims:
        c.embeddings.create(model=MODEL, input="hi", dimensions=256)
    assert "384" in dims.value.message and dims.value.param == "dimensions"

    with pytest.raises(openai.BadRequestError) as unknown_argument:
        c.embeddings.create(model=MODEL, input="hi", extra_body={"truncate": True})
    assert unknown_argument.value.param == "truncate"

    with pytest.raises(openai.BadRequestError) as empty:
        c.embeddings.create(model=MODEL, input=[""])
    assert "character" in empty.value.message  # the service's own limit, named

    with pytest.raises(openai.AuthenticationError) as bad_key:
        client(front_door_mesh, "not-a-key").embeddings.create(model=MODEL, input="hi")
    assert bad_key.value.status_code == 401

    no_infer = key_for("rest-embed-train-only", scopes=(keys.SCOPE_MODELS_TRAIN,))
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client(front_door_mesh, no_infer).embeddings.create(model=MODEL, input="hi")
    assert "infer" in denied.value.message


def test_a_tenant_over_its_rate_gets_429_with_retry_after(front_door_mesh: LocalMesh) -> None:
    c = client(front_door_mesh, key_for("rest-embed-limited", requests_per_second=1))
    with pytest.raises(openai.RateLimitError) as limited:
        for _ in range(5):
            c.embeddings.create(model=MODEL, input="once a second")
    headers = limited.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 2
    assert "rest-embed-limited" in limited.value.message
