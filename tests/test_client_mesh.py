"""The typed client against a mesh of every modality (`aimass up`: nlp, vision, speech, llm), as a user calls it:
one call per modality through the blocking and the asyncio client, the generated methods and the conveniences."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import skimage.data as skimage_data

from aimass.client import AsyncClient, Client, error_info
from aimass.datasets.samples import tickets_csv
from aimass.local_mesh import LocalMesh
from aimass.tenancy import keys
from aimass.v1 import common_pb2, llm_pb2, models_pb2, speech_pb2, vision_pb2
from tests.conftest import ROOT
from tests.security import admin_key, key_for
from tests.test_speech import ESPEAK_SENTENCE, word_error_rate
from tests.test_vision import ESPRESSO, Photo, encode

CAPITAL = "What is the capital of France?"


def coffee() -> Photo:
    """skimage's espresso photo (public domain), typed."""
    photo: Photo = skimage_data.coffee()  # type: ignore[no-untyped-call]
    return photo


@pytest.fixture(scope="module")
def client(front_door_mesh: LocalMesh) -> Iterator[Client]:
    # No api_key: the client finds the session's admin key file as it would on a user's machine.
    with Client(front_door_mesh.gateway, timeout_s=120) as c:
        yield c


@pytest.fixture(scope="module")
def espeak_wav(client: Client, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ESPEAK_SENTENCE spoken by espeak-ng through the mesh (SpeechService.Synthesize, a server stream), as a file."""
    pieces = list(client.speech.synthesize(text=ESPEAK_SENTENCE, model="espeak-ng", voice="en-us"))
    assert [p.WhichOneof("event") for p in pieces][-1] == "end"
    assert pieces[-1].end.model.name == "espeak-ng"
    wav = b"".join(p.audio.data for p in pieces if p.WhichOneof("event") == "audio")
    assert wav[:4] == b"RIFF"
    path = tmp_path_factory.mktemp("speech") / "espeak.wav"
    path.write_bytes(wav)
    return path


@pytest.fixture(scope="module")
def espeak_audio(espeak_wav: Path) -> bytes:
    return espeak_wav.read_bytes()


# -- blocking client ------------------------------------------------------------------------------------------------


def test_nlp(client: Client) -> None:
    reply = client.nlp.embed(texts=["A man plays a guitar.", "Someone strums a guitar."], normalize=True)
    assert reply.dimensions == 384 and len(reply.embeddings) == 2
    assert all(math.isclose(math.hypot(*e.values), 1.0, abs_tol=1e-3) for e in reply.embeddings)
    assert client.nlp.sentiment(texts=["I love this"]).results[0].label == "positive"
    found = {(e.text, e.label) for e in client.nlp.entities(texts=["Barack Obama visited Paris"]).documents[0].entities}
    assert ("Barack Obama", "PERSON") in found and ("Paris", "GPE") in found
    classified = client.nlp.classify(texts=["Book me a flight to Rome"], labels=["travel", "cooking", "finance"])
    assert classified.results[0].scores[0].label == "travel"


def test_vision_classifies_a_real_photo(client: Client) -> None:
    photo = vision_pb2.Image(data=encode(coffee()))
    reply = client.vision.classify(images=[photo], top_k=3)
    assert len(reply.results[0].labels) == 3
    assert reply.results[0].labels[0].class_index == ESPRESSO and reply.results[0].labels[0].label == "espresso"


def test_speech_transcribes_espeak_audio_from_a_file(client: Client, espeak_wav: Path) -> None:
    reply = client.transcribe(espeak_wav, language="en")
    assert word_error_rate(ESPEAK_SENTENCE, reply.text) <= 0.15, reply.text
    voices = client.speech.list_voices(model="espeak-ng", language="de")
    assert voices.voices and voices.voices[0].model.name == "espeak-ng"


def test_llm_chat_streams_text(client: Client) -> None:
    pieces = list(client.chat(CAPITAL, temperature=0, max_tokens=20))
    assert "Paris" in "".join(p.delta for p in pieces)
    assert pieces[-1].usage.completion_tokens > 0
    message = llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_USER, content=CAPITAL)
    counted = client.llm.count_tokens(messages=[message])
    assert counted.token_count > 5 and counted.context_length == 1024  # the mesh's AIMASS_LLM__MAX_MODEL_LEN


def test_models_admin_and_datasets(client: Client) -> None:
    listed = client.models.list_models(modality=models_pb2.MODALITY_LLM)
    assert listed.models and all(m.modality == models_pb2.MODALITY_LLM for m in listed.models)
    names = {m.name for m in client.models.list_models().models}
    assert {"all-MiniLM-L6-v2", "efficientnet-lite0"} <= names, names
    me = client.admin.who_am_i()
    assert keys.SCOPE_TENANTS_ADMIN in me.scopes
    assert all(d.name and d.owner for d in client.datasets.list_datasets().datasets)


def test_upload_a_dataset_from_a_file_with_progress(front_door_mesh: LocalMesh, tmp_path: Path) -> None:
    csv = tickets_csv(tmp_path / "tickets.csv", rows=200, seed=11)
    seen: list[tuple[int, int]] = []
    tenant_key = key_for("client-datasets", [keys.SCOPE_INFER, keys.SCOPE_MODELS_TRAIN])
    with Client(front_door_mesh.gateway, api_key=tenant_key, timeout_s=120) as tenant:
        uploaded = tenant.upload_dataset(csv, name="tickets", progress=lambda done, total: seen.append((done, total)))
        assert uploaded.report.rows_kept == 200 and uploaded.dataset.owner == "client-datasets"
        assert seen[-1] == (csv.stat().st_size, csv.stat().st_size)
        listed = tenant.datasets.list_datasets()
        assert [d.name for d in listed.datasets if d.owner == "client-datasets"] == ["tickets"]
        described = tenant.datasets.describe_dataset(dataset="tickets", preview_rows=2)
        assert described.dataset.name == "tickets"
        with pytest.raises(grpc.RpcError) as caught:
            tenant.datasets.describe_dataset(dataset="no-such-dataset")
    assert isinstance(caught.value, grpc.Call) and caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_error_reaches_the_caller_with_its_detail(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.nlp.embed(texts=["fine", "   "])
    assert isinstance(caught.value, grpc.Call) and caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert info is not None and info.reason == "EMPTY_TEXT"


# -- asyncio client -------------------------------------------------------------------------------------------------


async def test_async_client_every_modality(front_door_mesh: LocalMesh, espeak_audio: bytes) -> None:
    async with AsyncClient(front_door_mesh.gateway, timeout_s=120) as client:
        embedded, sentiment, entities, classified = await asyncio.gather(
            client.embeddings(["one", "two"], normalize=True),
            client.nlp.sentiment(texts=["This is terrible"]),
            client.entities(["Angela Merkel spoke in Berlin"]),
            client.classify(["Stir the sauce and bake for an hour"], ["travel", "cooking"]),
        )
        assert [len(v) for v in embedded] == [384, 384]
        assert sentiment.results[0].label == "negative"
        assert ("Berlin", "GPE") in {(e.text, e.label) for e in entities.documents[0].entities}
        assert classified.results[0].scores[0].label == "cooking"

        photo = vision_pb2.Image(data=encode(coffee(), "PNG"))
        request = vision_pb2.VisionServiceClassifyRequest(images=[photo], top_k=1)
        assert (await client.vision.classify(request)).results[0].labels[0].label == "espresso"

        heard = await client.transcribe(espeak_audio, language="en")
        assert word_error_rate(ESPEAK_SENTENCE, heard.text) <= 0.15, heard.text
        spoken = [
            reply.audio.sample_rate_hz
            async for reply in client.speech.synthesize(
                text="Hello there.", encoding=speech_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000
            )
            if reply.WhichOneof("event") == "audio"
        ]
        assert spoken and set(spoken) == {16000}

        text = "".join([p.delta async for p in client.chat(CAPITAL, temperature=0, max_tokens=20)])
        assert "Paris" in text
        generated = [
            r
            async for r in client.llm.generate(
                prompt="The capital of France is",
                sampling=llm_pb2.SamplingParams(max_tokens=5, temperature=0),
                priority=common_pb2.PRIORITY_HIGH,
            )
        ]
        assert generated and generated[-1].finish_reason

        assert (await client.models.list_models(modality=models_pb2.MODALITY_TEXT)).models
        me = await client.admin.who_am_i()
        assert keys.SCOPE_TENANTS_ADMIN in me.scopes
        await client.datasets.list_datasets()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.models.describe_model(model="no-such-model")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_async_key_from_the_environment(front_door_mesh: LocalMesh, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIMASS_API_KEY", key_for("client-env"))
    async with AsyncClient(front_door_mesh.gateway, timeout_s=60) as client:
        me = await client.admin.who_am_i()
    assert me.tenant_id == "client-env" and list(me.scopes) == [keys.SCOPE_INFER]


# -- the README's examples, as written ------------------------------------------------------------------------------


def readme_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Python\n") : text.index("### Any other language\n")]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


def test_the_readme_examples_run(
    front_door_mesh: LocalMesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocking, asynchronous = readme_examples()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "espresso.jpg").write_bytes(encode(coffee()))
    tickets_csv(tmp_path / "tickets.csv", rows=200, seed=12)
    # The examples as a user copies them, pointed at this mesh (and its admin key where they show a placeholder).
    for example in (blocking, asynchronous):
        source = example.replace("127.0.0.1:50051", front_door_mesh.gateway)
        exec(compile(source.replace('"aimass_..."', repr(admin_key())), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    for seen in ("positive", "('Barack Obama', 'PERSON')", "travel", "espresso", "Paris", "smollm2", "'tickets'"):
        assert seen in printed, printed
    assert "Hello" in printed or "hello" in printed, printed  # the transcription of the synthesized greeting
