"""aimass.client against the real mesh (`aimass up` with real models), plus in-process servers for retries/metadata."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from aimass.client import RETRIED_SERVICES, AsyncClient, Client, channel_options, error_info
from aimass.local_mesh import LocalMesh, free_port
from aimass.v1 import nlp_pb2
from tests.security import admin_key, key_for

SIMILAR = ("A man is playing a guitar.", "Someone is strumming a guitar.")
UNRELATED = "The central bank raised interest rates again this quarter."


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def check_embeddings(response: nlp_pb2.EmbedResponse) -> None:
    assert response.dimensions == 384
    vectors = [list(e.values) for e in response.embeddings]
    assert [len(v) for v in vectors] == [384, 384, 384]
    similar, unrelated = cosine(vectors[0], vectors[1]), cosine(vectors[0], vectors[2])
    assert similar > unrelated, f"cosine(similar)={similar:.3f} <= cosine(unrelated)={unrelated:.3f}"


@pytest.fixture(scope="module")
def client(mesh: LocalMesh) -> Iterator[Client]:
    with Client(mesh.gateway, timeout_s=30) as c:
        yield c


# -- sync client on the mesh --------------------------------------------------------------------------------------


def test_embed_similarity(client: Client) -> None:
    check_embeddings(client.embed([*SIMILAR, UNRELATED]))


def test_embeddings_normalized_lists(client: Client) -> None:
    vectors = client.embeddings([*SIMILAR, UNRELATED], normalize=True)
    assert len(vectors) == 3
    assert all(isinstance(x, float) for x in vectors[0])
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, abs_tol=1e-3) for v in vectors)


def test_sentiment_positive(client: Client) -> None:
    response = client.sentiment(["I love this"])
    assert len(response.results) == 1
    assert response.results[0].label == "positive"
    assert response.results[0].compound > 0


def test_entities(client: Client) -> None:
    text = "Barack Obama visited Paris"
    response = client.entities([text])
    entities = response.documents[0].entities
    found = {(e.text, e.label) for e in entities}
    assert ("Barack Obama", "PERSON") in found, found
    assert ("Paris", "GPE") in found, found
    assert all(text[e.start_char : e.end_char] == e.text for e in entities)


def test_classify_top_label(client: Client) -> None:
    response = client.classify(["I want to book a flight to Rome"], ["travel", "cooking", "finance"])
    scores = response.results[0].scores
    assert scores[0].label == "travel", [(s.label, s.score) for s in scores]
    assert [s.score for s in scores] == sorted((s.score for s in scores), reverse=True)


def test_api_key_and_request_id_pass_through_the_mesh(mesh: LocalMesh) -> None:
    # A tenant's own key (not the admin key the other tests find by themselves): the gateway serves the call as
    # that tenant and says so in a trailer, next to the request id the client sent.
    with Client(mesh.gateway, api_key=key_for("client-test")) as keyed:
        assert keyed.sentiment(["fine"], request_id="req-ok").results[0].label
        _, call = keyed.nlp.stub.Sentiment.with_call(
            nlp_pb2.SentimentRequest(texts=["fine"]), **keyed.call_options(request_id="req-trailers")
        )
    trailers = dict(call.trailing_metadata() or ())
    assert trailers["x-aimass-tenant"] == "client-test"
    assert trailers["x-request-id"] == "req-trailers"


def test_a_key_the_mesh_does_not_know_is_unauthenticated(mesh: LocalMesh) -> None:
    with Client(mesh.gateway, api_key="test-key") as keyed, pytest.raises(grpc.RpcError) as caught:
        keyed.sentiment(["fine"])
    err = caught.value
    assert isinstance(err, grpc.Call)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "the API key is not in the form aimass_<key id>_<secret>" in (err.details() or "")
    info = error_info(err)
    assert info is not None and info.reason == "KEY_MALFORMED"


# -- errors -------------------------------------------------------------------------------------------------------


def test_empty_text_is_invalid_argument(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.embed(["hello", "   "], request_id="req-empty-text")
    err = caught.value
    assert isinstance(err, grpc.Call)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "texts[1] is empty" in (err.details() or "")
    info = error_info(err)
    assert info is not None and info.reason == "EMPTY_TEXT"
    # The replica echoes the request id the client sent, through the gateway.
    assert ("x-request-id", "req-empty-text") in tuple(err.trailing_metadata() or ())


def test_unknown_model_is_not_found(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.embed(["hello"], model="no-such-model")
    err = caught.value
    assert isinstance(err, grpc.Call)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in (err.details() or "")
    info = error_info(err)
    assert info is not None and info.reason == "MODEL_NOT_FOUND"


@pytest.mark.parametrize("method", ["embed", "embeddings", "sentiment", "entities"])
def test_bare_string_is_type_error(method: str) -> None:
    with Client(f"127.0.0.1:{free_port()}") as c, pytest.raises(TypeError, match="sequence of str, not a single str"):
        getattr(c, method)("Barack Obama visited Paris")


def test_bare_string_labels_is_type_error() -> None:
    with Client(f"127.0.0.1:{free_port()}") as c, pytest.raises(TypeError, match="labels must be a sequence"):
        c.classify(["a text"], "travel")  # a str is a Sequence[str] to mypy: only the runtime check catches it
    with Client(f"127.0.0.1:{free_port()}") as c, pytest.raises(TypeError, match=r"texts\[1\] must be str"):
        c.embed(["ok", b"bytes"])  # type: ignore[list-item]


def test_invalid_settings_rejected() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        Client(max_attempts=6)
    with pytest.raises(ValueError, match="max_attempts"):
        Client(max_attempts=0)
    with pytest.raises(ValueError, match="timeout_s"):
        Client(timeout_s=0)


# -- async client on the mesh -------------------------------------------------------------------------------------


async def test_async_embed_similarity(mesh: LocalMesh) -> None:
    async with AsyncClient(mesh.gateway) as aclient:
        check_embeddings(await aclient.embed([*SIMILAR, UNRELATED]))
        assert len(await aclient.embeddings(["one", "two"])) == 2


async def test_async_concurrent_embeds(mesh: LocalMesh) -> None:
    async with AsyncClient(mesh.gateway) as aclient:
        texts = [[f"sentence number {i}", f"another sentence {i}"] for i in range(16)]
        responses = await asyncio.gather(*(aclient.embed(t, request_id=f"req-{i}") for i, t in enumerate(texts)))
    assert len(responses) == 16
    assert all(len(r.embeddings) == 2 and r.dimensions == 384 for r in responses)


async def test_async_other_methods_and_errors(mesh: LocalMesh) -> None:
    async with AsyncClient(mesh.gateway) as aclient:
        assert (await aclient.sentiment(["I love this"])).results[0].label == "positive"
        found = {
            (e.text, e.label) for e in (await aclient.entities(["Barack Obama visited Paris"])).documents[0].entities
        }
        assert ("Paris", "GPE") in found
        classified = await aclient.classify(["I want to book a flight to Rome"], ["travel", "cooking", "finance"])
        assert classified.results[0].scores[0].label == "travel"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await aclient.sentiment([""])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = error_info(caught.value)
        assert info is not None and info.reason == "EMPTY_TEXT"
        with pytest.raises(grpc.RpcError) as not_found:
            await aclient.entities(["hello"], model="no-such-model")
        assert isinstance(not_found.value, grpc.aio.AioRpcError)
        assert not_found.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(TypeError, match="not a single str"):
            await aclient.embed("a bare string")


# -- retries via the service config -------------------------------------------------------------------------------


def test_nothing_listening_fails_fast() -> None:
    started = time.monotonic()
    with Client(f"127.0.0.1:{free_port()}", timeout_s=0.5) as c, pytest.raises(grpc.RpcError) as caught:
        c.embed(["hello"])
    assert isinstance(caught.value, grpc.Call)
    assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("max_attempts", [2, 4, 5])
def test_channel_options_carry_retry_policy(max_attempts: int) -> None:
    with Client(f"127.0.0.1:{free_port()}", max_attempts=max_attempts) as c:
        options = dict(c.channel_options)
    assert options["grpc.enable_retries"] == 1
    config = json.loads(str(options["grpc.service_config"]))
    method_config, unretried = config["methodConfig"]
    assert {"service": "aimass.v1.DatasetService", "method": "UploadDataset"} in unretried["name"]
    assert "retryPolicy" not in unretried  # client streams: see test_client_generated
    assert {entry["service"] for entry in method_config["name"]} == set(RETRIED_SERVICES)
    assert "aimass.v1.NlpService" in RETRIED_SERVICES
    assert method_config["retryPolicy"] == {
        "maxAttempts": max_attempts,
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }


def test_single_attempt_has_no_retry_policy() -> None:
    config = json.loads(str(dict(channel_options(1))["grpc.service_config"]))
    assert "retryPolicy" not in config["methodConfig"][0]


@dataclass
class FlakyNlp:
    """A real gRPC server whose Embed fails the first ``failures`` calls with ``code``, recording what it got."""

    failures: int
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    calls: int = 0
    metadata: list[dict[str, str]] = field(default_factory=list)
    requests: list[nlp_pb2.EmbedRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def embed(self, request: nlp_pb2.EmbedRequest, context: grpc.ServicerContext) -> nlp_pb2.EmbedResponse:
        with self.lock:
            self.calls += 1
            attempt = self.calls
            self.requests.append(request)
            self.metadata.append({k: str(v) for k, v in context.invocation_metadata()})
        if attempt <= self.failures:
            context.abort(self.code, f"attempt {attempt} refused on purpose")
        return nlp_pb2.EmbedResponse(
            embeddings=[nlp_pb2.Embedding(values=[1.0, 0.0]) for _ in request.texts], dimensions=2
        )


@pytest.fixture
def flaky_server() -> Iterator[tuple[str, FlakyNlp]]:
    state = FlakyNlp(failures=0)
    handler: Any = grpc.unary_unary_rpc_method_handler(
        state.embed,
        request_deserializer=nlp_pb2.EmbedRequest.FromString,
        response_serializer=nlp_pb2.EmbedResponse.SerializeToString,
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("aimass.v1.NlpService", {"Embed": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", state
    server.stop(grace=None)


@pytest.mark.parametrize(("max_attempts", "failures", "succeeds"), [(4, 3, True), (3, 3, False), (1, 1, False)])
def test_unavailable_is_retried_up_to_max_attempts(
    flaky_server: tuple[str, FlakyNlp], max_attempts: int, failures: int, succeeds: bool
) -> None:
    address, state = flaky_server
    state.failures = failures
    with Client(address, max_attempts=max_attempts, timeout_s=10) as c:
        if succeeds:
            assert c.embeddings(["x"]) == [[1.0, 0.0]]
        else:
            with pytest.raises(grpc.RpcError) as caught:
                c.embed(["x"])
            assert isinstance(caught.value, grpc.Call)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert state.calls == min(max_attempts, failures + 1)


def test_resource_exhausted_is_retried(flaky_server: tuple[str, FlakyNlp]) -> None:
    # A full queue or a tenant's quota: worth another try after a pause, like UNAVAILABLE.
    address, state = flaky_server
    state.failures, state.code = 2, grpc.StatusCode.RESOURCE_EXHAUSTED
    with Client(address, max_attempts=3, timeout_s=10) as c:
        assert c.embeddings(["x"]) == [[1.0, 0.0]]
    assert state.calls == 3


def test_other_codes_are_not_retried(flaky_server: tuple[str, FlakyNlp]) -> None:
    address, state = flaky_server
    state.failures, state.code = 1, grpc.StatusCode.INVALID_ARGUMENT
    with Client(address, max_attempts=4) as c, pytest.raises(grpc.RpcError):
        c.embed(["x"])
    assert state.calls == 1


async def test_async_client_retries_unavailable(flaky_server: tuple[str, FlakyNlp]) -> None:
    address, state = flaky_server
    state.failures = 2
    async with AsyncClient(address, max_attempts=3) as aclient:
        assert await aclient.embeddings(["x", "y"]) == [[1.0, 0.0], [1.0, 0.0]]
    assert state.calls == 3


def test_metadata_sent(flaky_server: tuple[str, FlakyNlp], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    address, state = flaky_server
    with Client(address, api_key="sk-test") as keyed:
        keyed.embed(["x"], request_id="req-123")
    # No api_key: $AIMASS_API_KEY, else the admin key file of this host's mesh (the test session's).
    monkeypatch.setenv("AIMASS_API_KEY", "sk-from-env")
    with Client(address) as from_env:
        from_env.embed(["x"])
    monkeypatch.delenv("AIMASS_API_KEY")
    with Client(address) as from_file:
        from_file.embed(["x"])
    session_key = admin_key()
    # No key anywhere (a state directory without an admin key): the calls carry none.
    monkeypatch.setenv("AIMASS_STATE_DIR", str(tmp_path))
    with Client(address) as anonymous:
        anonymous.embed(["x"])
    assert state.metadata[0]["authorization"] == "Bearer sk-test"
    assert state.metadata[0]["x-request-id"] == "req-123"
    assert state.requests[0].meta.request_id == "req-123"
    assert state.metadata[1]["authorization"] == "Bearer sk-from-env"
    assert state.metadata[2]["authorization"] == f"Bearer {session_key}"
    assert "authorization" not in state.metadata[3]
    assert "x-request-id" not in state.metadata[3]
