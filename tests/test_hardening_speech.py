"""Speech under hostile streams and stuck synthesisers, on a real speech replica (real Whisper, real flite): idle
streams end, empty chunks do not keep a stream alive, chunk counts are bounded, a synthesiser past its time is
killed, and the stream buffer grows by what arrives, not by everything again."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from aimass.runtime.config import ServerConfig, Settings, SpeechConfig
from aimass.runtime.metadata import ERROR_INFO_KEY
from aimass.runtime.server import ServerRunner
from aimass.v1 import common_pb2, speech_pb2, speech_pb2_grpc
from services.speech.app import build_runner
from services.speech.asr import AsrEngine
from services.speech.streaming import Segmenter
from services.speech.tts import TtsEngine
from tests.security import as_gateway
from tests.test_speech import asr_engine, tts_engine  # noqa: F401  (the session's loaded engines)

PCM16 = speech_pb2.AUDIO_ENCODING_PCM16
STRICT = SpeechConfig(
    server=ServerConfig(port=0, drain_delay_s=0.05),
    stream_first_message_s=0.5,
    stream_idle_s=0.6,
    max_stream_chunks=5,
)


@pytest.fixture
async def strict(
    asr_engine: AsrEngine,  # noqa: F811
    tts_engine: TtsEngine,  # noqa: F811
) -> AsyncIterator[tuple[ServerRunner, speech_pb2_grpc.SpeechServiceAsyncStub]]:
    runner = build_runner(Settings(), config=STRICT, register=False, asr=asr_engine, tts=tts_engine)
    await runner.start()
    channel = as_gateway(runner.address, "speech")
    try:
        yield runner, speech_pb2_grpc.SpeechServiceStub(channel)
    finally:
        await channel.close()
        await runner.drain()


def config() -> speech_pb2.StreamTranscribeRequest:
    return speech_pb2.StreamTranscribeRequest(
        config=speech_pb2.StreamTranscribeConfig(encoding=PCM16, sample_rate_hz=16000)
    )


async def ended_with(
    stub: speech_pb2_grpc.SpeechServiceAsyncStub, requests: AsyncIterator[speech_pb2.StreamTranscribeRequest]
) -> tuple[grpc.aio.AioRpcError, float]:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.StreamTranscribe(requests, timeout=20):
            pass
    return caught.value, time.monotonic() - started


def reason(err: grpc.aio.AioRpcError) -> str:
    return common_pb2.ErrorInfo.FromString(dict(err.trailing_metadata() or ())[ERROR_INFO_KEY]).reason


async def test_a_stream_that_sends_nothing_after_its_config_ends(
    strict: tuple[ServerRunner, speech_pb2_grpc.SpeechServiceAsyncStub],
) -> None:
    async def config_then_silence() -> AsyncIterator[speech_pb2.StreamTranscribeRequest]:
        yield config()
        await asyncio.sleep(30)

    err, took = await ended_with(strict[1], config_then_silence())
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and reason(err) == "STREAM_IDLE"
    assert "no audio for 0.6 s" in (err.details() or "") and took < 5


async def test_a_stream_that_never_sends_its_config_ends(
    strict: tuple[ServerRunner, speech_pb2_grpc.SpeechServiceAsyncStub],
) -> None:
    async def nothing() -> AsyncIterator[speech_pb2.StreamTranscribeRequest]:
        await asyncio.sleep(30)
        yield config()

    err, took = await ended_with(strict[1], nothing())
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "no StreamTranscribe config within 0.5 s" in (
        err.details() or ""
    )
    assert took < 5


async def test_empty_chunks_do_not_keep_a_stream_alive(
    asr_engine: AsrEngine,  # noqa: F811
    tts_engine: TtsEngine,  # noqa: F811
) -> None:
    config_many = STRICT.model_copy(update={"max_stream_chunks": 10_000})
    runner = build_runner(Settings(), config=config_many, register=False, asr=asr_engine, tts=tts_engine)
    await runner.start()
    channel = as_gateway(runner.address, "speech")
    try:

        async def empty_chunks() -> AsyncIterator[speech_pb2.StreamTranscribeRequest]:
            yield config()
            for _ in range(300):
                yield speech_pb2.StreamTranscribeRequest(audio=b"")
                await asyncio.sleep(0.02)

        err, took = await ended_with(speech_pb2_grpc.SpeechServiceStub(channel), empty_chunks())
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and reason(err) == "STREAM_IDLE"
        assert took < 3  # 300 empty chunks would take 6 s; the stream ended at its idle bound
    finally:
        await channel.close()
        await runner.drain()


async def test_a_stream_may_send_only_so_many_messages(
    strict: tuple[ServerRunner, speech_pb2_grpc.SpeechServiceAsyncStub],
) -> None:
    async def many() -> AsyncIterator[speech_pb2.StreamTranscribeRequest]:
        yield config()
        for _ in range(10):
            yield speech_pb2.StreamTranscribeRequest(audio=b"\0" * 320)

    err, _ = await ended_with(strict[1], many())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and reason(err) == "TOO_MANY_CHUNKS"
    assert "more than 5 messages" in (err.details() or "")


async def test_a_synthesiser_past_its_time_is_killed() -> None:
    engine = TtsEngine(kokoro=False, timeout_s=0.001)
    engine.load()
    voice = engine.find_voice("flite", "")
    assert voice is not None
    with pytest.raises(Exception) as caught:
        await engine.synthesize_sentence(voice, "This sentence takes longer than a millisecond to say. " * 20)
    assert getattr(caught.value, "reason", "") == "TTS_TIMEOUT"
    assert "was stopped" in str(caught.value)
    assert not engine.running  # killed and reaped: no process left behind
    for pid in engine.spawned:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_the_stream_buffer_grows_by_what_arrives() -> None:
    """A chunk costs its own length: 10,000 chunks of 100 ms (16.7 minutes) into a segmenter that is never cut
    copy each sample a bounded number of times (the buffer doubles), where re-concatenating copied it 5,000 times."""
    segmenter = Segmenter(min_segment_s=1.5, min_silence_s=0.4, max_segment_s=8.0)
    chunk = np.ones(1600, np.float32)
    for _ in range(10_000):
        segmenter.add(chunk)
    assert segmenter.pending_s == pytest.approx(1000.0)
    # Capacity is within 2x of what is held: the buffer grew by doubling, not by one copy per chunk.
    assert len(segmenter._data) < 2 * 1600 * 10_000 + 16_000
    piece = segmenter.take(16_000)
    assert len(piece) == 16_000 and segmenter.offset == 16_000
