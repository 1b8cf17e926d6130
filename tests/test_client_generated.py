"""The generated half of aimass.client: every public RPC has a typed method on both clients with its streaming shape,
the generated module is what the protos give today, and the keyword/request rules hold (in-process servers only)."""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from mypy import api as mypy_api

from aimass.client import RETRIED_SERVICES, AsyncClient, Client, codegen, generated
from aimass.client.calls import build
from aimass.local_mesh import free_port
from aimass.runtime import contract
from aimass.v1 import admin_pb2, common_pb2, datasets_pb2, llm_pb2, nlp_pb2, speech_pb2
from gateway.app import INTERNAL_SERVICES
from tests.conftest import ROOT


def public_methods() -> list[tuple[str, str, bool, bool]]:
    """(service, method, client streaming, server streaming) for every public RPC, from the live descriptors."""
    return [
        (name, method.name, method.client_streaming, method.server_streaming)
        for name, service in sorted(contract.services().items())
        if name not in INTERNAL_SERVICES
        for method in service.methods
    ]


def test_the_generator_knows_the_gateways_internal_services() -> None:
    assert codegen.INTERNAL_SERVICES == INTERNAL_SERVICES
    assert set(generated.PUBLIC_SERVICES) == {name for name, *_ in public_methods()}
    assert set(RETRIED_SERVICES) == set(generated.PUBLIC_SERVICES)
    assert len(public_methods()) >= 42  # 9 services today


def test_every_public_rpc_has_a_method_of_its_shape_on_both_clients() -> None:
    with Client(f"127.0.0.1:{free_port()}") as client:
        missing: list[str] = []
        for service, rpc, client_streaming, server_streaming in public_methods():
            group = generated.PUBLIC_SERVICES[service]
            name = codegen.snake(rpc)
            sync = getattr(getattr(client, group), name, None)
            async_class = inspect.get_annotations(generated.AsyncServices)[group]  # what AsyncClient.<group> is
            async_method = getattr(getattr(generated, async_class), name, None)
            if sync is None or async_method is None:
                missing.append(f"{service}/{rpc}")
                continue
            assert inspect.isgeneratorfunction(sync) == server_streaming, f"{service}/{rpc}"
            assert inspect.isasyncgenfunction(async_method) == server_streaming, f"{service}/{rpc}"
            assert inspect.iscoroutinefunction(async_method) == (not server_streaming), f"{service}/{rpc}"
            first = next(iter(list(inspect.signature(sync).parameters.values())))
            assert first.name == ("requests" if client_streaming else "request"), f"{service}/{rpc}"
            assert first.kind is inspect.Parameter.POSITIONAL_ONLY
            for method in (sync, async_method):
                parameters = inspect.signature(method).parameters
                assert {"timeout_s", "request_id"} <= set(parameters), f"{service}/{rpc}"
        assert not missing, f"no client method for {missing}"


def test_generated_module_is_current() -> None:
    # setup.py writes it on every build; this catches a proto or generator change without a rebuild.
    current = (ROOT / codegen.OUTPUT).read_text()
    assert current == codegen.render(codegen.descriptor_set(ROOT)), "stale: run python aimass/client/codegen.py"


def test_method_docstrings_come_from_the_protos() -> None:
    doc = inspect.getdoc(generated.NlpService.embed) or ""
    assert doc.startswith("Dense sentence embeddings")
    assert "normalize: Scale each vector to unit length" in doc
    assert "only until the server answers" in (inspect.getdoc(generated.AsyncLlmService.chat) or "")


def test_snake_case_names() -> None:
    assert [codegen.snake(n) for n in ("WhoAmI", "ListAuditEvents", "Embed", "CountTokens", "StreamTranscribe")] == [
        "who_am_i",
        "list_audit_events",
        "embed",
        "count_tokens",
        "stream_transcribe",
    ]


# -- building requests from keywords ---------------------------------------------------------------------------


def test_keywords_build_the_request() -> None:
    built = build(
        nlp_pb2.EmbedRequest,
        None,
        {"model": "minilm", "texts": ["a", "b"], "normalize": True},
        request_id="r-1",
        priority=common_pb2.PRIORITY_HIGH,
    )
    assert built == nlp_pb2.EmbedRequest(
        meta=common_pb2.RequestMeta(request_id="r-1", priority=common_pb2.PRIORITY_HIGH),
        model=common_pb2.ModelRef(name="minilm"),
        texts=["a", "b"],
        normalize=True,
    )
    # Defaults leave fields unset; a dataset is named by a plain str as a model is.
    assert build(datasets_pb2.DescribeDatasetRequest, None, {"dataset": "tickets", "preview_rows": 0}) == (
        datasets_pb2.DescribeDatasetRequest(dataset=datasets_pb2.DatasetRef(name="tickets"))
    )


def test_a_whole_request_is_sent_as_given_and_not_changed() -> None:
    request = llm_pb2.CountTokensRequest(prompt="hello")
    assert build(llm_pb2.CountTokensRequest, request, {"prompt": "", "messages": ()}) is request
    tagged = build(llm_pb2.CountTokensRequest, request, {"prompt": ""}, request_id="r-2")
    assert tagged.meta.request_id == "r-2" and tagged.prompt == "hello"
    assert not request.HasField("meta")


def test_mistakes_are_refused_before_sending() -> None:
    with pytest.raises(TypeError, match="pass either a EmbedRequest or its fields as keywords, not both"):
        build(nlp_pb2.EmbedRequest, nlp_pb2.EmbedRequest(), {"texts": ["x"]})
    with pytest.raises(TypeError, match=r"texts must be a sequence, not a single str; wrap one item in a list"):
        build(nlp_pb2.EmbedRequest, None, {"texts": "hello"})
    with pytest.raises(TypeError, match="config, audio are alternatives"):
        build(
            speech_pb2.StreamTranscribeRequest,
            None,
            {"config": speech_pb2.StreamTranscribeConfig(), "audio": b"\0\0"},
        )
    with pytest.raises(TypeError, match=r"request must be a aimass.v1.EmbedRequest, not SentimentRequest"):
        build(nlp_pb2.EmbedRequest, nlp_pb2.SentimentRequest(), {})


def test_optional_fields_are_sent_when_given_even_as_zero() -> None:
    built = build(admin_pb2.SetTenantRequest, None, {"tenant_id": "t", "weight": 0.0, "max_concurrent": None})
    assert built.HasField("weight") and not built.HasField("max_concurrent")


# -- every call shape against a real gRPC server ------------------------------------------------------------------


@dataclass
class Recorder:
    """A real grpc.Server for SpeechService (all four call shapes) that answers from what it received."""

    metadata: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def seen(self, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.metadata.append({k: str(v) for k, v in context.invocation_metadata()})

    def transcribe(self, request: speech_pb2.TranscribeRequest, context: grpc.ServicerContext) -> Any:
        self.seen(context)
        return speech_pb2.TranscribeResponse(text=f"{len(request.audio)} bytes, {request.meta.request_id}")

    def synthesize(self, request: speech_pb2.SynthesizeRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        self.seen(context)
        for word in request.text.split():
            yield speech_pb2.SynthesizeResponse(audio=speech_pb2.SynthesizeAudio(data=word.encode()))

    def stream(self, requests: Iterator[speech_pb2.StreamTranscribeRequest], context: grpc.ServicerContext) -> Any:
        self.seen(context)
        for request in requests:
            if request.WhichOneof("payload") == "audio":
                yield speech_pb2.StreamTranscribeResponse(
                    partial=speech_pb2.TranscriptSegment(text=request.audio.decode())
                )


@pytest.fixture
def speech_server() -> Iterator[tuple[str, Recorder]]:
    state = Recorder()
    handlers: dict[str, Any] = {
        "Transcribe": grpc.unary_unary_rpc_method_handler(
            state.transcribe,
            request_deserializer=speech_pb2.TranscribeRequest.FromString,
            response_serializer=speech_pb2.TranscribeResponse.SerializeToString,
        ),
        "Synthesize": grpc.unary_stream_rpc_method_handler(
            state.synthesize,
            request_deserializer=speech_pb2.SynthesizeRequest.FromString,
            response_serializer=speech_pb2.SynthesizeResponse.SerializeToString,
        ),
        "StreamTranscribe": grpc.stream_stream_rpc_method_handler(
            state.stream,
            request_deserializer=speech_pb2.StreamTranscribeRequest.FromString,
            response_serializer=speech_pb2.StreamTranscribeResponse.SerializeToString,
        ),
    }
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("aimass.v1.SpeechService", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", state
    server.stop(grace=None)


def chunks(*words: str) -> Iterator[speech_pb2.StreamTranscribeRequest]:
    yield speech_pb2.StreamTranscribeRequest(config=speech_pb2.StreamTranscribeConfig(sample_rate_hz=16000))
    for word in words:
        yield speech_pb2.StreamTranscribeRequest(audio=word.encode())


def test_sync_call_shapes(speech_server: tuple[str, Recorder]) -> None:
    address, state = speech_server
    with Client(address, api_key="sk-shapes") as client:
        assert client.speech.transcribe(audio=b"1234", request_id="req-9").text == "4 bytes, req-9"
        pieces = [r.audio.data for r in client.speech.synthesize(text="one two three")]
        assert pieces == [b"one", b"two", b"three"]
        partials = [r.partial.text for r in client.speech.stream_transcribe(chunks("a", "b"))]
        assert partials == ["a", "b"]
    assert state.metadata[0]["authorization"] == "Bearer sk-shapes"
    assert state.metadata[0]["x-request-id"] == "req-9"


async def test_async_call_shapes(speech_server: tuple[str, Recorder]) -> None:
    address, _ = speech_server

    async def async_chunks() -> AsyncIterator[speech_pb2.StreamTranscribeRequest]:
        for request in chunks("x", "y", "z"):
            yield request

    async with AsyncClient(address) as client:
        reply = await client.speech.transcribe(speech_pb2.TranscribeRequest(audio=b"12"), request_id="req-a")
        assert reply.text == "2 bytes, req-a"
        pieces = [r.audio.data async for r in client.speech.synthesize(text="four five")]
        assert pieces == [b"four", b"five"]
        from_plain = [r.partial.text async for r in client.speech.stream_transcribe(chunks("p"))]
        from_async = [r.partial.text async for r in client.speech.stream_transcribe(async_chunks())]
        assert (from_plain, from_async) == (["p"], ["x", "y", "z"])


def test_retry_policy_names_every_public_service() -> None:
    with Client(f"127.0.0.1:{free_port()}") as client:
        config = json.loads(str(dict(client.channel_options)["grpc.service_config"]))
    named = {entry["service"] for entry in config["methodConfig"][0]["name"]}
    assert {"aimass.v1.DatasetService", "aimass.v1.TrainingService", "aimass.v1.DeploymentService"} <= named
    assert named.isdisjoint(INTERNAL_SERVICES)
    unretried = {(entry["service"], entry["method"]) for entry in config["methodConfig"][1]["name"]}
    assert unretried == {(s, m) for s, m, client_streaming, _ in public_methods() if client_streaming}


def test_a_client_stream_refused_at_its_first_message_is_not_retried() -> None:
    # With a retry policy on it, grpcio 1.85 aborted the whole process here (ILLEGAL STATE: FORWARDED_BATCH): the
    # CLI died uploading past a storage quota. Client streams are left out of the policy.
    calls: list[int] = []

    def upload(requests: Iterator[datasets_pb2.UploadDatasetRequest], context: grpc.ServicerContext) -> Any:
        calls.append(1)
        next(requests)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the upload is past your storage quota")

    handler: Any = grpc.stream_unary_rpc_method_handler(
        upload,
        request_deserializer=datasets_pb2.UploadDatasetRequest.FromString,
        response_serializer=datasets_pb2.UploadDatasetResponse.SerializeToString,
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("aimass.v1.DatasetService", {"UploadDataset": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    header = datasets_pb2.UploadDatasetRequest(header=datasets_pb2.UploadDatasetHeader(name="big", size_bytes=9 << 20))
    chunk = datasets_pb2.UploadDatasetRequest(chunk=bytes(1 << 16))
    try:
        with Client(f"127.0.0.1:{port}", max_attempts=4) as client, pytest.raises(grpc.RpcError) as caught:
            client.datasets.upload_dataset(iter([header, *([chunk] * 8)]))
    finally:
        server.stop(grace=None)
    assert isinstance(caught.value, grpc.Call) and caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert calls == [1]


def test_mypy_checks_calls_into_both_clients(tmp_path: Path) -> None:
    # What an editor or CI sees of a user's code: the right return type per client, misspelt or mistyped fields caught.
    snippet = tmp_path / "snippet.py"
    snippet.write_text(
        "from aimass.client import AsyncClient, Client\n"
        "\n"
        "\n"
        "async def calls(c: Client, a: AsyncClient) -> None:\n"
        '    reveal_type(c.nlp.embed(texts=["x"]))\n'
        '    reveal_type(await a.nlp.embed(texts=["x"]))\n'
        "    reveal_type(c.llm.chat(messages=[]))\n"
        "    reveal_type(a.llm.chat(messages=[]))\n"
        '    reveal_type(await a.embeddings(["x"]))\n'
        '    reveal_type(a.chat("hi"))\n'
        "    c.nlp.embed(texts=[1])\n"
        '    c.nlp.embed(text=["x"])\n'
        '    await a.embeddings(["x"], normalise=True)\n'
        "    c.datasets.upload_dataset([1])\n"
    )
    out, _, _ = mypy_api.run([str(snippet), "--strict", "--cache-dir", str(tmp_path / "cache"), "--no-error-summary"])
    found = [line.split(": ", 1)[1] for line in out.splitlines() if ": note: Revealed" in line or ": error:" in line]
    assert found == [
        'note: Revealed type is "aimass.v1.nlp_pb2.EmbedResponse"',
        'note: Revealed type is "aimass.v1.nlp_pb2.EmbedResponse"',
        'note: Revealed type is "typing.Iterator[aimass.v1.llm_pb2.ChatResponse]"',
        'note: Revealed type is "typing.AsyncIterator[aimass.v1.llm_pb2.ChatResponse]"',
        'note: Revealed type is "list[list[float]]"',
        'note: Revealed type is "typing.AsyncIterator[aimass.v1.llm_pb2.ChatResponse]"',
        'error: List item 0 has incompatible type "int"; expected "str"  [list-item]',
        'error: Unexpected keyword argument "text" for "embed" of "NlpService"; did you mean "texts"?  [call-arg]',
        'error: Unexpected keyword argument "normalise"; did you mean "normalize"?  [call-arg]',
        'error: List item 0 has incompatible type "int"; expected "UploadDatasetRequest"  [list-item]',
    ], out
