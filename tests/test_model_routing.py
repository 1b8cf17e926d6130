"""The gateway reads the requested model from raw request bytes without deserialising the request, and knows each
replica's default model (for requests that name none) from its registry labels."""

from __future__ import annotations

import re

import pytest

from aimass.runtime.catalogue import default_model_label, default_model_labels, model_info
from aimass.v1 import common_pb2, llm_pb2, models_pb2, nlp_pb2, vision_pb2
from gateway.model_routing import model_field_number, requested_model


def test_finds_the_model_among_other_fields() -> None:
    request = llm_pb2.ChatRequest(
        meta=common_pb2.RequestMeta(request_id="r1", priority=common_pb2.PRIORITY_HIGH, labels={"app": "x"}),
        model=common_pb2.ModelRef(name="smollm2-twin", version="1"),
        messages=[llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_USER, content="hi " * 1000)],
        sampling=llm_pb2.SamplingParams(temperature=0.5, seed=-3, max_tokens=7, stop=["x"]),
    )
    number = model_field_number(llm_pb2.ChatRequest.DESCRIPTOR)
    assert number == 2
    assert requested_model(request.SerializeToString(), number) == "smollm2-twin"


def test_large_binary_fields_are_skipped() -> None:
    request = vision_pb2.VisionServiceClassifyRequest(
        images=[vision_pb2.Image(data=bytes(range(256)) * 4000)], model=common_pb2.ModelRef(name="efficientnet-lite0")
    )
    number = model_field_number(vision_pb2.VisionServiceClassifyRequest.DESCRIPTOR)
    assert number is not None
    assert requested_model(request.SerializeToString(), number) == "efficientnet-lite0"


@pytest.mark.parametrize(
    "data", [b"", b"\xff", b"\x12\x05ab", b"\x0f\x01", nlp_pb2.EmbedRequest(texts=["a"]).SerializeToString()]
)
def test_absent_or_unreadable_means_no_model(data: bytes) -> None:
    assert requested_model(data, 2) == ""


def test_messages_without_a_model_field() -> None:
    assert model_field_number(common_pb2.RequestMeta.DESCRIPTOR) is None


def test_default_models_are_named_by_registry_labels_consul_accepts() -> None:
    def info(name: str, methods: tuple[str, ...], *, is_default: bool) -> models_pb2.ModelInfo:
        return model_info(
            name,
            description="",
            modality=models_pb2.MODALITY_SPEECH,
            service="SpeechService",
            methods=methods,
            is_default=is_default,
        )

    labels = default_model_labels(
        [
            info("piper-amy", ("Synthesize", "ListVoices"), is_default=False),
            info("piper-lessac", ("Synthesize", "ListVoices"), is_default=True),
            info("whisper-base", ("Transcribe",), is_default=True),
        ]
    )
    assert labels == {
        "default-model-SpeechService-Synthesize": "piper-lessac",
        "default-model-SpeechService-ListVoices": "piper-lessac",
        "default-model-SpeechService-Transcribe": "whisper-base",
    }
    # The gateway finds the same label from the method path it forwards.
    assert default_model_label("/aimass.v1.SpeechService/Transcribe") in labels
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", f"label-{key}") for key in labels)
