"""Speech through the gateway of a mesh started by `aimass up`: the round trip and the bidirectional stream, as
a client in any language would use them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from aimass.local_mesh import LocalMesh
from aimass.v1 import speech_pb2, speech_pb2_grpc
from tests.conftest import start_mesh
from tests.test_speech import SENTENCE, TWO_SENTENCES, synthesize, word_error_rate


@pytest.fixture(scope="module")
def speech_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    mesh = start_mesh(tmp_path_factory.mktemp("speech"), {"speech": 1})
    yield mesh
    mesh.stop()


@pytest.fixture
async def stub(speech_mesh: LocalMesh) -> AsyncIterator[speech_pb2_grpc.SpeechServiceAsyncStub]:
    # The session's admin key on every call, as the gateway asks of any caller.
    async with speech_mesh.aio_channel() as channel:
        yield speech_pb2_grpc.SpeechServiceStub(channel)


async def test_synthesize_then_transcribe_through_the_gateway(stub: speech_pb2_grpc.SpeechServiceAsyncStub) -> None:
    wav, chunks, _ = await synthesize(stub, SENTENCE)
    assert chunks and wav[:4] == b"RIFF"
    reply = await stub.Transcribe(speech_pb2.TranscribeRequest(audio=wav), timeout=60)
    assert word_error_rate(SENTENCE, reply.text) <= 0.1, reply.text


async def test_stream_transcribe_through_the_gateway(stub: speech_pb2_grpc.SpeechServiceAsyncStub) -> None:
    pcm, _, _ = await synthesize(stub, TWO_SENTENCES, encoding=speech_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000)
    chunk = 16000 * 2 // 10  # 100 ms of 16-bit samples

    async def requests() -> AsyncIterator[speech_pb2.StreamTranscribeRequest]:
        yield speech_pb2.StreamTranscribeRequest(
            config=speech_pb2.StreamTranscribeConfig(encoding=speech_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000)
        )
        for offset in range(0, len(pcm), chunk):
            yield speech_pb2.StreamTranscribeRequest(audio=pcm[offset : offset + chunk])

    events = [reply async for reply in stub.StreamTranscribe(requests(), timeout=120)]
    assert events[-1].WhichOneof("event") == "end"
    assert word_error_rate(TWO_SENTENCES, events[-1].end.text) <= 0.1, events[-1].end.text


async def test_bad_audio_through_the_gateway_is_invalid_argument(stub: speech_pb2_grpc.SpeechServiceAsyncStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Transcribe(speech_pb2.TranscribeRequest(audio=b"this is not audio at all"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "audio" in (caught.value.details() or "")


def silent_wav(size_bytes: int) -> bytes:
    """A WAV of 8-bit silence at 8 kHz (8,000 bytes a second) of about ``size_bytes``."""
    frames = size_bytes - 44
    header = (
        b"RIFF" + (36 + frames).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
        + (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + (8000).to_bytes(4, "little")
        + (8000).to_bytes(4, "little") + (1).to_bytes(2, "little") + (8).to_bytes(2, "little")
        + b"data" + frames.to_bytes(4, "little")
    )  # fmt: skip
    return header + b"\x80" * frames


async def test_large_recordings_meet_the_documented_limits_not_the_transport(
    stub: speech_pb2_grpc.SpeechServiceAsyncStub,
) -> None:
    """18 MiB is under the documented 25 MiB: it passes the gateway and reaches the replica's own checks (here the
    30-minute limit, read from the header before any decoding: 18 MiB of 8 kHz 8-bit audio is 39 minutes); 26 MiB
    is refused naming the 25 MiB limit. gRPC's transport cap (once 16 MiB at the gateway) never answers first."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Transcribe(speech_pb2.TranscribeRequest(audio=silent_wav(18 * 2**20)), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "s long; the limit is 1800 s" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Transcribe(speech_pb2.TranscribeRequest(audio=silent_wav(26 * 2**20)), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"the limit is {25 * 2**20}" in (caught.value.details() or "")
