"""Every NLP method through the gateway of a mesh started by `aimass up`, on the real models, and every kind of bad
input answered with the right status and a message a person understands."""

from __future__ import annotations

import re
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from aimass.client import error_info
from aimass.local_mesh import LocalMesh
from aimass.v1 import common_pb2, nlp_pb2, nlp_pb2_grpc


@pytest.fixture(scope="module")
def channel(mesh: LocalMesh) -> Iterator[grpc.Channel]:
    # Every call carries the session's admin key, as any caller of the gateway must.
    with mesh.channel() as opened:
        yield opened


@pytest.fixture(scope="module")
def nlp(channel: grpc.Channel) -> nlp_pb2_grpc.NlpServiceStub:
    return nlp_pb2_grpc.NlpServiceStub(channel)


def cosine(a: nlp_pb2.Embedding, b: nlp_pb2.Embedding) -> float:
    x, y = np.asarray(a.values), np.asarray(b.values)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def test_embed_similar_sentences_are_closer_than_unrelated(nlp: nlp_pb2_grpc.NlpServiceStub) -> None:
    reply = nlp.Embed(
        nlp_pb2.EmbedRequest(
            texts=["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
        ),
        timeout=30,
    )
    assert reply.dimensions == 384 and len(reply.embeddings) == 3
    assert reply.model.name == "all-MiniLM-L6-v2"
    similar = cosine(reply.embeddings[0], reply.embeddings[1])
    unrelated = cosine(reply.embeddings[0], reply.embeddings[2])
    assert similar > 0.6 > unrelated


def test_embed_normalize_gives_unit_vectors(nlp: nlp_pb2_grpc.NlpServiceStub) -> None:
    reply = nlp.Embed(nlp_pb2.EmbedRequest(texts=["unit length please"], normalize=True), timeout=30)
    assert np.linalg.norm(np.asarray(reply.embeddings[0].values)) == pytest.approx(1.0, abs=1e-4)


def test_embed_counts_the_tokens_the_model_read(nlp: nlp_pb2_grpc.NlpServiceStub) -> None:
    # [CLS] hello world [SEP]; a long text counts only the 256 tokens of the model's window it reads.
    reply = nlp.Embed(nlp_pb2.EmbedRequest(texts=["hello world"]), timeout=30)
    assert reply.input_tokens == 4
    reply = nlp.Embed(nlp_pb2.EmbedRequest(texts=["hello world", "word " * 1000]), timeout=30)
    assert reply.input_tokens == 4 + 256


def test_sentiment(nlp: nlp_pb2_grpc.NlpServiceStub) -> None:
    reply = nlp.Sentiment(
        nlp_pb2.SentimentRequest(texts=["I love this", "This is the worst day ever", "The box is brown"]), timeout=30
    )
    assert [r.label for r in reply.results] == ["positive", "negative", "neutral"]
    assert reply.results[0].compound > 0.5 > -0.5 > reply.results[1].compound


def test_entities(nlp: nlp_pb2_grpc.NlpServiceStub) -> None:
    text = "Barack Obama visited Paris"
    reply = nlp.Entities(nlp_pb2.EntitiesRequest(texts=[text]), timeout=30)
    found = {(e.text, e.label) for e in reply.documents[0].entities}
    assert {("Barack Obama", "PERSON"), ("Paris", "GPE")} <= found
    for entity in reply.documents[0].entities:
        assert text[entity.start_char : entity.end_char] == entity.text


def test_zero_shot_classify(nlp: nlp_pb2_grpc.NlpServiceStub) -> None:
    reply = nlp.Classify(
        nlp_pb2.ClassifyRequest(
            texts=["The striker scored twice in the final", "Bake the bread for forty minutes"],
            labels=["sports", "cooking", "politics"],
        ),
        timeout=30,
    )
    assert [r.scores[0].label for r in reply.results] == ["sports", "cooking"]
    for result in reply.results:
        assert sum(s.score for s in result.scores) == pytest.approx(1.0, abs=1e-4)
    multi = nlp.Classify(
        nlp_pb2.ClassifyRequest(texts=["Pasta with tomato sauce"], labels=["food"], multi_label=True), timeout=30
    )
    assert multi.results[0].scores[0].score > 0.5


def test_request_id_is_echoed_and_filled_in(nlp: nlp_pb2_grpc.NlpServiceStub) -> None:
    _, call = nlp.Sentiment.with_call(
        nlp_pb2.SentimentRequest(texts=["hi"]), metadata=(("x-request-id", "ticket-42"),), timeout=30
    )
    assert ("x-request-id", "ticket-42") in tuple(call.trailing_metadata())
    _, call = nlp.Sentiment.with_call(nlp_pb2.SentimentRequest(texts=["hi"]), timeout=30)
    assigned = dict(call.trailing_metadata())["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", str(assigned))


def rpc_error(call: object, *args: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        ([], "texts is empty; send between 1 and 256 texts"),
        (["fine", "   "], "texts[1] is empty"),
        (["x" * 10_001], "texts[0] is 10001 characters; the limit is 10000"),
        (["t"] * 257, "texts has 257 items; the limit is 256 per request"),
    ],
)
def test_bad_texts_are_invalid_argument(nlp: nlp_pb2_grpc.NlpServiceStub, texts: list[str], message: str) -> None:
    for method, request in [
        (nlp.Embed, nlp_pb2.EmbedRequest(texts=texts)),
        (nlp.Sentiment, nlp_pb2.SentimentRequest(texts=texts)),
        (nlp.Entities, nlp_pb2.EntitiesRequest(texts=texts)),
    ]:
        err = rpc_error(method, request, timeout=30)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (err.details() or "")


def test_oversize_text_carries_error_info(nlp: nlp_pb2_grpc.NlpServiceStub) -> None:
    err = rpc_error(nlp.Embed, nlp_pb2.EmbedRequest(texts=["x" * 20_000]), timeout=30)
    info = error_info(err)
    assert info is not None
    assert info.reason == "TEXT_TOO_LONG" and info.metadata["limit"] == "10000"


@pytest.mark.parametrize(
    ("labels", "multi_label", "template", "message"),
    [
        (["only"], False, "", "labels has 1 items; send between 2 and 64"),
        (["a", "a"], False, "", "labels contains duplicates"),
        (["a", " "], False, "", "labels contains an empty label"),
        (["a", "b"], False, "no placeholder", "hypothesis_template must contain '{}' exactly once"),
    ],
)
def test_bad_classify_labels(
    nlp: nlp_pb2_grpc.NlpServiceStub, labels: list[str], multi_label: bool, template: str, message: str
) -> None:
    request = nlp_pb2.ClassifyRequest(
        texts=["hello"], labels=labels, multi_label=multi_label, hypothesis_template=template
    )
    err = rpc_error(nlp.Classify, request, timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (err.details() or "")


def test_unknown_model_is_not_found(nlp: nlp_pb2_grpc.NlpServiceStub) -> None:
    request = nlp_pb2.EmbedRequest(texts=["x"], model=common_pb2.ModelRef(name="bert-large"))
    err = rpc_error(nlp.Embed, request, timeout=30)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == ("model 'bert-large' is not served by NlpService.Embed; available: all-MiniLM-L6-v2")
    info = error_info(err)
    assert info is not None and info.reason == "MODEL_NOT_FOUND"


def test_unknown_method_and_service_are_unimplemented(channel: grpc.Channel) -> None:
    err = rpc_error(channel.unary_unary("/aimass.v1.NlpService/Translate"), b"", timeout=10)
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "aimass.v1.NlpService has no method 'Translate'; it has Embed, Sentiment" in (err.details() or "")
    err = rpc_error(channel.unary_unary("/acme.v1.Nope/Do"), b"", timeout=10)
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "unknown service 'acme.v1.Nope'" in (err.details() or "")


def test_malformed_bytes_through_gateway_are_invalid_argument(channel: grpc.Channel) -> None:
    err = rpc_error(channel.unary_unary("/aimass.v1.NlpService/Sentiment"), b"\x1a\x05ab", timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid aimass.v1.SentimentRequest" in (err.details() or "")


def test_service_without_replicas_is_unavailable_with_a_reason(channel: grpc.Channel) -> None:
    # The test mesh runs no speech replica.
    err = rpc_error(channel.unary_unary("/aimass.v1.SpeechService/ListVoices"), b"", timeout=10)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "no healthy replica serves aimass.v1.SpeechService" in (err.details() or "")


def test_deadline_passes_through_the_gateway(nlp: nlp_pb2_grpc.NlpServiceStub) -> None:
    err = rpc_error(nlp.Embed, nlp_pb2.EmbedRequest(texts=["slow " * 500] * 64), timeout=0.005)
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_still_serving_after_all_the_bad_input(nlp: nlp_pb2_grpc.NlpServiceStub) -> None:
    reply = nlp.Sentiment(nlp_pb2.SentimentRequest(texts=["Still works, great!"]), timeout=30)
    assert reply.results[0].label == "positive"
