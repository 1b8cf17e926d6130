"""The Open Inference Protocol v2 on the gateway port, with the real tritonclient against `aimass up`.

Every tensor-shaped model kind (embeddings, zero-shot and sentiment, image classification, transcription) is called
the way a Triton user calls it (``InferenceServerClient(gateway).infer(name, inputs, headers=...)``); results are
compared with the same aimass.v1 call; inputs are built from ModelMetadata alone; bad requests get the statuses
tritonclient reports. A tenant's own classifiers need a trainer (not in this mesh): their tensors are checked on
the catalogue entries the gateway builds for them (gateway.model_catalogue.custom_model_info).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any, cast

import grpc
import numpy as np
import pytest
import skimage.data as skimage_data
import tritonclient.grpc as triton  # type: ignore[import-untyped]
import tritonclient.grpc.aio as triton_aio  # type: ignore[import-untyped]
from PIL import Image
from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

from aimass.local_mesh import LocalMesh
from aimass.oip.v2 import grpc_predict_v2_pb2 as oip
from aimass.runtime.config import Settings
from aimass.runtime.errors import NotFound
from aimass.runtime.scope import RequestScope, entered
from aimass.tenancy import keys
from aimass.v1 import datasets_pb2, deployments_pb2, nlp_pb2, nlp_pb2_grpc, speech_pb2_grpc
from gateway.forwarder import Forwarder
from gateway.model_catalogue import ModelCatalogueServicer, custom_model_info
from gateway.oip.models import Kind, models_of
from gateway.oip.servicer import OipServicer
from gateway.oip.tensors import encode_bytes
from gateway.replicas import ReplicaSet
from gateway.router import make_router
from tests import test_models_service
from tests.metrics import scrape, value
from tests.security import key_for
from tests.test_models_service import FakeContext, with_own_models
from tests.test_speech import SENTENCE, synthesize, word_error_rate

EMBEDDER = "all-MiniLM-L6-v2"
TEXTS = ["I love this wonderful film", "The weather today is rainy and cold", "Stock prices fell sharply"]
MODELS = [EMBEDDER, f"{EMBEDDER}-zero-shot", "vader", "efficientnet-lite0", "whisper-base"]
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
# A real replica's ModelService, and one that does not answer (tests/test_models_service.py).
live_and_dead = test_models_service.live_and_dead


@pytest.fixture(scope="module")
def client(front_door_mesh: LocalMesh) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(front_door_mesh.gateway) as made:
        yield made


@pytest.fixture(scope="module")
def headers(front_door_mesh: LocalMesh) -> dict[str, str]:
    return {"authorization": f"Bearer {key_for('oip-user')}"}


@pytest.fixture(scope="module")
async def speech(front_door_mesh: LocalMesh) -> bytes:
    """A spoken SENTENCE (WAV), from the mesh's own speech synthesis."""
    async with front_door_mesh.aio_channel() as channel:
        wav, _, _ = await synthesize(speech_pb2_grpc.SpeechServiceStub(channel), SENTENCE)
    return wav


def jpeg(photo: str) -> bytes:
    """One of scikit-image's public-domain sample photos ("coffee", "chelsea": a cat, "astronaut") as a JPEG."""
    out = io.BytesIO()
    Image.fromarray(getattr(skimage_data, photo)()).save(out, "JPEG", quality=90)
    return out.getvalue()


def bytes_input(name: str, items: list[bytes], shape: list[int] | None = None) -> triton.InferInput:
    tensor = triton.InferInput(name, shape or [len(items)], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=object).reshape(shape or [len(items)]))
    return tensor


def texts(name: str = "TEXT", items: list[str] = TEXTS) -> triton.InferInput:
    return bytes_input(name, [text.encode() for text in items])


def refusal(call: object) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as refused:
        call()  # type: ignore[operator]
    return refused.value


def test_server_endpoints(client: triton.InferenceServerClient, headers: dict[str, str]) -> None:
    assert client.is_server_live(headers=headers)
    assert client.is_server_ready(headers=headers)
    metadata = client.get_server_metadata(headers=headers)
    assert metadata.name == "aimass" and metadata.version
    assert all(client.is_model_ready(name, headers=headers) for name in MODELS)
    assert not client.is_model_ready("no-such-model", headers=headers)


def test_embeddings_equal_the_grpc_embed(
    front_door_mesh: LocalMesh, client: triton.InferenceServerClient, headers: dict[str, str]
) -> None:
    result = client.infer(EMBEDDER, [texts()], headers=headers, request_id="req-7")
    vectors = result.as_numpy("EMBEDDING")
    assert vectors.dtype == np.float32 and vectors.shape == (3, 384)
    assert result.get_response().id == "req-7" and result.get_response().model_name == EMBEDDER
    with front_door_mesh.channel() as channel:
        answer = nlp_pb2_grpc.NlpServiceStub(channel).Embed(nlp_pb2.EmbedRequest(texts=TEXTS), timeout=30)
    assert np.allclose(vectors, np.array([e.values for e in answer.embeddings]), atol=1e-6)
    # normalize as a request parameter, as on aimass.v1.
    unit = client.infer(EMBEDDER, [texts()], headers=headers, parameters={"normalize": True}).as_numpy("EMBEDDING")
    assert np.allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-4)


def test_typed_contents_give_what_raw_contents_give(front_door_mesh: LocalMesh, headers: dict[str, str]) -> None:
    tensor = oip.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[len(TEXTS)])
    typed = oip.ModelInferRequest(model_name=EMBEDDER, inputs=[tensor])
    typed.inputs[0].contents.bytes_contents.extend(text.encode() for text in TEXTS)
    raw = oip.ModelInferRequest(
        model_name=EMBEDDER, inputs=[tensor], raw_input_contents=[encode_bytes([t.encode() for t in TEXTS])]
    )
    with front_door_mesh.channel() as channel:
        infer = channel.unary_unary(
            MODEL_INFER,
            request_serializer=oip.ModelInferRequest.SerializeToString,
            response_deserializer=oip.ModelInferResponse.FromString,
        )
        answers = [infer(request, timeout=30) for request in (typed, raw)]
    assert answers[0].raw_output_contents == answers[1].raw_output_contents
    assert list(answers[0].outputs[0].shape) == [3, 384]


def test_sentiment_and_zero_shot(client: triton.InferenceServerClient, headers: dict[str, str]) -> None:
    result = client.infer("vader", [texts(items=["I love it, wonderful!", "awful, I hate it"])], headers=headers)
    assert result.as_numpy("LABEL").tolist() == [b"positive", b"negative"]
    compound = result.as_numpy("COMPOUND")
    assert compound[0] > 0.5 > -0.5 > compound[1]
    candidates = bytes_input("CANDIDATE_LABELS", [b"finance", b"weather", b"cinema"])
    result = client.infer(f"{EMBEDDER}-zero-shot", [texts(), candidates], headers=headers)
    best = result.as_numpy("LABELS")[:, 0].tolist()
    assert best == [b"cinema", b"weather", b"finance"]
    scores = result.as_numpy("SCORES")
    assert scores.shape == (3, 3) and np.all(np.diff(scores, axis=1) <= 0)  # best first, as aimass.v1 ranks
    # Only the outputs asked for.
    only = client.infer(
        f"{EMBEDDER}-zero-shot", [texts(), candidates], headers=headers, outputs=[triton.InferRequestedOutput("SCORES")]
    )
    assert [o.name for o in only.get_response().outputs] == ["SCORES"]


def test_image_classification(client: triton.InferenceServerClient, headers: dict[str, str]) -> None:
    images = bytes_input("IMAGE", [jpeg("coffee"), jpeg("chelsea")])
    result = client.infer("efficientnet-lite0", [images], headers=headers, parameters={"top_k": 3})
    labels = result.as_numpy("LABELS")
    assert labels.shape == (2, 3) and labels[0, 0] == b"espresso" and b"cat" in labels[1, 0]
    assert result.as_numpy("SCORES")[0, 0] > 0.5
    assert result.as_numpy("CLASS_INDEX").dtype == np.int32


def test_transcription(client: triton.InferenceServerClient, headers: dict[str, str], speech: bytes) -> None:
    result = client.infer("whisper-base", [bytes_input("AUDIO", [speech])], headers=headers, client_timeout=120)
    heard = result.as_numpy("TEXT")[0].decode()
    assert word_error_rate(SENTENCE, heard) < 0.25, heard
    assert result.as_numpy("LANGUAGE").tolist() == [b"en"]


def sample(spec: object, speech: bytes) -> list[bytes]:
    """Two elements for an input named ``spec.name`` (what the model takes under that name)."""
    name = getattr(spec, "name")  # noqa: B009
    return {
        "TEXT": [b"a fine day", b"a dreadful day"],
        "CANDIDATE_LABELS": [b"good", b"bad"],
        "IMAGE": [jpeg("coffee"), jpeg("astronaut")],
        "AUDIO": [speech, speech],
    }[name]


def test_metadata_describes_what_infer_takes_and_gives(
    client: triton.InferenceServerClient, headers: dict[str, str], speech: bytes
) -> None:
    """For every model: inputs built from ModelMetadata alone are taken, and every output it lists comes back with
    its datatype and its shape (-1: any size)."""
    for name in MODELS:
        metadata = client.get_model_metadata(name, headers=headers)
        inputs = []
        for spec in metadata.inputs:
            assert spec.datatype == "BYTES" and list(spec.shape) == [-1], (name, spec)
            inputs.append(bytes_input(spec.name, sample(spec, speech)))
        result = client.infer(name, inputs, headers=headers, client_timeout=120).get_response()
        assert [o.name for o in result.outputs] == [o.name for o in metadata.outputs], name
        for got, spec in zip(result.outputs, metadata.outputs, strict=True):
            assert got.datatype == spec.datatype, (name, got.name)
            assert len(got.shape) == len(spec.shape) and got.shape[0] == 2, (name, got.name)
            assert all(want in (-1, size) for want, size in zip(spec.shape, got.shape, strict=True)), (name, got)
    embedder = client.get_model_metadata(EMBEDDER, headers=headers)
    assert list(embedder.outputs[0].shape) == [-1, 384]  # the width is the model's


async def test_the_aio_client(front_door_mesh: LocalMesh, headers: dict[str, str]) -> None:
    async with triton_aio.InferenceServerClient(front_door_mesh.gateway) as client:
        assert await client.is_model_ready(EMBEDDER, headers=headers)
        result = await client.infer(EMBEDDER, [texts()], headers=headers)
    assert result.as_numpy("EMBEDDING").shape == (3, 384)


def test_bad_requests_get_the_statuses_triton_clients_expect(
    client: triton.InferenceServerClient, headers: dict[str, str]
) -> None:
    unknown = refusal(lambda: client.infer("no-such-model", [texts()], headers=headers))
    assert unknown.status() == "StatusCode.NOT_FOUND"
    assert "no-such-model" in unknown.message() and EMBEDDER in unknown.message()  # lists some that exist

    missing = refusal(lambda: client.infer(f"{EMBEDDER}-zero-shot", [texts()], headers=headers))
    assert missing.status() == "StatusCode.INVALID_ARGUMENT" and "CANDIDATE_LABELS" in missing.message()

    numbers = triton.InferInput("TEXT", [2], "FP32")
    numbers.set_data_from_numpy(np.zeros(2, dtype=np.float32))
    datatype = refusal(lambda: client.infer(EMBEDDER, [numbers], headers=headers))
    assert datatype.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'TEXT'" in datatype.message() and "BYTES" in datatype.message()

    square = bytes_input("TEXT", [b"a", b"b", b"c", b"d"], shape=[2, 2])
    shape = refusal(lambda: client.infer(EMBEDDER, [square], headers=headers))
    assert shape.status() == "StatusCode.INVALID_ARGUMENT" and "[2, 2]" in shape.message()

    extra = refusal(lambda: client.infer(EMBEDDER, [texts(), texts("EXTRA")], headers=headers))
    assert extra.status() == "StatusCode.INVALID_ARGUMENT" and "'EXTRA'" in extra.message()

    parameter = refusal(lambda: client.infer(EMBEDDER, [texts()], headers=headers, parameters={"normalise": True}))
    assert parameter.status() == "StatusCode.INVALID_ARGUMENT" and "normalize" in parameter.message()

    output = refusal(
        lambda: client.infer(EMBEDDER, [texts()], headers=headers, outputs=[triton.InferRequestedOutput("SCORES")])
    )
    assert output.status() == "StatusCode.INVALID_ARGUMENT" and "EMBEDDING" in output.message()

    # A replica's own refusal comes back as it gave it (an empty text, a file that is not audio).
    empty = refusal(lambda: client.infer("vader", [texts(items=[""])], headers=headers))
    assert empty.status() == "StatusCode.INVALID_ARGUMENT"
    noise = refusal(
        lambda: client.infer("whisper-base", [bytes_input("AUDIO", [b"not audio at all"])], headers=headers)
    )
    assert noise.status() == "StatusCode.INVALID_ARGUMENT"


def test_metrics_name_the_oip_methods(
    front_door_mesh: LocalMesh, client: triton.InferenceServerClient, headers: dict[str, str]
) -> None:
    client.infer("vader", [texts()], headers=headers)
    samples = scrape(front_door_mesh.metrics_address("gateway"))
    assert value(samples, "aimass_requests_total", method=MODEL_INFER, code="OK") >= 1


def test_malformed_raw_contents_are_invalid_argument(front_door_mesh: LocalMesh, headers: dict[str, str]) -> None:
    tensor = oip.ModelInferRequest.InferInputTensor(name="TEXT", datatype="BYTES", shape=[1])
    lie = oip.ModelInferRequest(model_name=EMBEDDER, inputs=[tensor], raw_input_contents=[b"\xff\xff\x00\x00abc"])
    with front_door_mesh.channel() as channel:
        infer = channel.unary_unary(
            MODEL_INFER,
            request_serializer=oip.ModelInferRequest.SerializeToString,
            response_deserializer=oip.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as refused:
            infer(lie, timeout=30)
        with pytest.raises(grpc.RpcError) as garbage:
            channel.unary_unary(MODEL_INFER, request_serializer=bytes, response_deserializer=bytes)(
                b"\xff\xff", timeout=30
            )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "65535 bytes long, but only 3 bytes follow" in str(refused.value.details())
    assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_keys_scopes_and_quotas(client: triton.InferenceServerClient) -> None:
    none = refusal(lambda: client.infer(EMBEDDER, [texts()]))
    assert none.status() == "StatusCode.UNAUTHENTICATED"
    bad = refusal(lambda: client.is_server_live(headers={"authorization": "Bearer aimass_nope_nope"}))
    assert bad.status() == "StatusCode.UNAUTHENTICATED"
    trainer_only = {"authorization": f"Bearer {key_for('oip-trainer', [keys.SCOPE_MODELS_TRAIN])}"}
    denied = refusal(lambda: client.get_model_metadata(EMBEDDER, headers=trainer_only))
    assert denied.status() == "StatusCode.PERMISSION_DENIED" and "infer" in denied.message()
    limited = {"authorization": f"Bearer {key_for('oip-rate-limited', requests_per_second=1)}"}
    codes = []
    for _ in range(5):
        try:
            client.infer("vader", [texts()], headers=limited)
            codes.append("OK")
        except InferenceServerException as err:
            codes.append(err.status())
    assert codes[0] == "OK" and "StatusCode.RESOURCE_EXHAUSTED" in codes


def test_a_tenants_own_classifiers_tensors_come_from_its_labels() -> None:
    """A trained text classifier answers LABELS and SCORES [n, k] over its own k labels; an image one ranks its
    top_k; both under their own names (the catalogue lists them to their tenant alone)."""
    labels = ["billing", "bug", "praise"]
    version = deployments_pb2.CustomModelVersion(version="2", labels=labels)
    text = deployments_pb2.CustomModel(
        name="acme-tickets",
        owner="acme",
        task=datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION,
        method="aimass.v1.NlpService/Classify",
        versions=[deployments_pb2.CustomModelVersion(version="1", labels=["x"]), version],
        deployment=deployments_pb2.Deployment(default_version="2"),
    )
    (model,) = models_of(custom_model_info(text), {})
    assert (model.name, model.kind, model.model) == ("acme-tickets", Kind.TEXT_CLASSIFIER, "acme-tickets")
    assert [(s.name, s.shape) for s in model.outputs] == [("LABELS", (-1, 3)), ("SCORES", (-1, 3))]
    assert [s.name for s in model.inputs] == ["TEXT"] and model.versions == ("1", "2")
    image = deployments_pb2.CustomModel(
        name="acme-parts",
        owner="acme",
        task=datasets_pb2.TRAINING_TASK_IMAGE_CLASSIFICATION,
        method="aimass.v1.VisionService/Classify",
        versions=[version],
    )
    (model,) = models_of(custom_model_info(image), {})
    assert model.kind is Kind.IMAGE_CLASSIFIER and [s.name for s in model.inputs] == ["IMAGE"]


async def test_a_tenants_own_classifier_is_its_own_alone(live_and_dead: ReplicaSet) -> None:
    """The OIP sees the catalogue the caller sees (gateway.model_catalogue over a scheduler that lists acme's
    ticket-router to acme alone, as tests/test_models_service.py sets it up), and its cached views are per tenant:
    acme's listing, fresh, never answers another tenant or acme's key without models:train."""
    async with with_own_models(live_and_dead) as (replicas, _):
        catalogue = ModelCatalogueServicer(replicas, replica_timeout_s=1.0)
        forwarder = Forwarder(replicas, make_router("round_robin"), local_services=frozenset())
        servicer = OipServicer(forwarder, catalogue, Settings())
        context = cast(Any, FakeContext())
        ticket_router = oip.ModelMetadataRequest(name="ticket-router")
        with entered(RequestScope(tenant="acme", key_id="k1", scopes=frozenset({keys.SCOPE_MODELS_TRAIN}))):
            metadata = await servicer.ModelMetadata(ticket_router, context)
            assert [i.name for i in metadata.inputs] == ["TEXT"]
            assert [o.name for o in metadata.outputs] == ["LABELS", "SCORES"]
            assert (await servicer.ModelReady(oip.ModelReadyRequest(name="ticket-router"), context)).ready
        for scope in (
            RequestScope(tenant="beta", key_id="k2", scopes=frozenset({keys.SCOPE_MODELS_TRAIN})),
            RequestScope(tenant="acme", key_id="k3", scopes=frozenset({keys.SCOPE_INFER})),
        ):
            with entered(scope):
                with pytest.raises(NotFound, match=r"no model 'ticket-router'.*models: vader$"):
                    await servicer.ModelMetadata(ticket_router, context)
                request = oip.ModelInferRequest(model_name="ticket-router")
                with pytest.raises(NotFound, match="no model 'ticket-router'"):
                    await servicer.ModelInfer(request, context)
                assert not (await servicer.ModelReady(oip.ModelReadyRequest(name="ticket-router"), context)).ready
