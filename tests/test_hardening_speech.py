"""Speech under hostile streams and stuck synthesisers, on a real speech replica (real Whisper, real flite): idle
streams end, empty chunks do not keep a stream alive, chunk counts are bounded, a synthesiser past its time is
killed, and the stream buffer grows by what arrives, not by everything again."""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from aimass.runtime.config import ServerConfig, Settings, SpeechConfig
from aimass.runtime.metadata import ERROR_INFO_KEY
from aimass.runtime.server import ServerRunner
from aimass.v1 import common_pb2, speech_pb2, speech_pb2_grpc
from services.speech.app import SpeechApp, build_runner
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


def raw_wav(payload: bytes, *, rate: int = 16000, channels: int = 1, bits: int = 16, tag: int = 1) -> bytes:
    """A RIFF/WAVE file with exactly the header fields given, however unreasonable (soundfile refuses to write them)."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)
    return (
        b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(payload)) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(payload)) + payload
    )  # fmt: skip


def float_wav_with_nan() -> bytes:
    samples = np.zeros(8000, np.float32)
    samples[4000] = np.nan
    return raw_wav(samples.astype("<f4").tobytes(), bits=32, tag=3)


@pytest.mark.parametrize(
    ("audio", "expected_reason", "message"),
    [
        (float_wav_with_nan(), "NON_FINITE_SAMPLES", "NaN or infinite samples"),
        (raw_wav(b"\0" * 64 * 2 * 100, channels=64), "BAD_CHANNELS", "64 channels; accepted are 1..8"),
        (raw_wav(b"\0" * 3200, rate=0), "", "audio"),
        (raw_wav(b"\0" * 3200, rate=4_000_000), "BAD_SAMPLE_RATE", "accepted are 8000..48000 Hz"),
    ],
    ids=["nan", "64-channels", "rate-0", "rate-4MHz"],
)
async def test_hostile_recordings_are_refused_before_whisper(
    strict: tuple[ServerRunner, speech_pb2_grpc.SpeechServiceAsyncStub],
    audio: bytes,
    expected_reason: str,
    message: str,
) -> None:
    stub = strict[1]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Transcribe(speech_pb2.TranscribeRequest(audio=audio), timeout=20)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert message in (caught.value.details() or "")
    if expected_reason:
        assert reason(caught.value) == expected_reason
    # The replica still serves.
    assert (await stub.ListVoices(speech_pb2.ListVoicesRequest(), timeout=10)).voices


def wav_stream_config() -> speech_pb2.StreamTranscribeRequest:
    return speech_pb2.StreamTranscribeRequest(
        config=speech_pb2.StreamTranscribeConfig(encoding=speech_pb2.AUDIO_ENCODING_WAV)
    )


def header_with_endless_chunk() -> bytes:
    """A WAV header whose first chunk claims 4 GiB: a server waiting for the data chunk would buffer forever."""
    return b"RIFF\xff\xff\xff\xffWAVE" + b"LIST" + struct.pack("<I", 0xFFFFFFF0)


def short_fmt() -> bytes:
    return b"RIFF\xff\xff\xff\xffWAVE" + b"fmt " + struct.pack("<I", 4) + b"\x01\x00\x01\x00" + b"data\xff\xff\xff\xff"


@pytest.mark.parametrize(
    ("first", "rest", "expected_reason", "message"),
    [
        (header_with_endless_chunk(), [b"\0" * 60_000] * 3, "CORRUPT_AUDIO", "WAV stream header is longer than"),
        (short_fmt(), [b"\0" * 320], "CORRUPT_AUDIO", "fmt chunk"),
        (raw_wav(b"")[:-4] + b"\xff\xff\xff\xff", [b"\0" * 320], "", ""),  # a good header, as a control
        (raw_wav(b"", channels=0)[:-4] + b"\xff\xff\xff\xff", [b"\0" * 320], "BAD_CHANNELS", "0 channels"),
        (raw_wav(b"", channels=1000)[:-4] + b"\xff\xff\xff\xff", [b"\0" * 2000], "BAD_CHANNELS", "1000 channels"),
        (
            raw_wav(b"", bits=32, tag=3)[:-4] + b"\xff\xff\xff\xff",
            [np.full(1600, np.inf, "<f4").tobytes()],
            "NON_FINITE_SAMPLES",
            "NaN or infinite",
        ),
    ],
    ids=["endless-header", "short-fmt", "good", "0-channels", "1000-channels", "inf-samples"],
)
async def test_hostile_wav_streams_are_refused(
    strict: tuple[ServerRunner, speech_pb2_grpc.SpeechServiceAsyncStub],
    first: bytes,
    rest: list[bytes],
    expected_reason: str,
    message: str,
) -> None:
    async def requests() -> AsyncIterator[speech_pb2.StreamTranscribeRequest]:
        yield wav_stream_config()
        for chunk in [first, *rest]:
            yield speech_pb2.StreamTranscribeRequest(audio=chunk)

    stub = strict[1]
    if not expected_reason:
        replies = [reply async for reply in stub.StreamTranscribe(requests(), timeout=20)]
        assert replies[-1].WhichOneof("event") == "end"
        return
    err, _ = await ended_with(stub, requests())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert reason(err) == expected_reason and message in (err.details() or "")


async def test_decodes_waiting_are_bounded(
    asr_engine: AsrEngine,  # noqa: F811
    tts_engine: TtsEngine,  # noqa: F811
) -> None:
    """With the decode threads busy, max_decode_queue recordings may wait; one more is RESOURCE_EXHAUSTED at once."""
    config = STRICT.model_copy(update={"decode_threads": 1, "max_decode_queue": 2})
    runner = build_runner(Settings(), config=config, register=False, asr=asr_engine, tts=tts_engine)
    await runner.start()
    channel = as_gateway(runner.address, "speech")
    release = threading.Event()
    try:
        app = runner.app
        assert isinstance(app, SpeechApp)
        servicer = app.servicer
        servicer.decode_pool.submit(release.wait, 30)  # the one decode thread is busy
        stub = speech_pb2_grpc.SpeechServiceStub(channel)
        audio = raw_wav(b"\0" * 3200)
        waiting = [asyncio.ensure_future(stub.Transcribe(speech_pb2.TranscribeRequest(audio=audio), timeout=30))]
        waiting.append(asyncio.ensure_future(stub.Transcribe(speech_pb2.TranscribeRequest(audio=audio), timeout=30)))
        await asyncio.sleep(0.5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Transcribe(speech_pb2.TranscribeRequest(audio=audio), timeout=5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 recordings are being decoded or waiting to be; the limit is 2" in (caught.value.details() or "")
        release.set()
        for reply in await asyncio.gather(*waiting):
            assert reply.duration_seconds == pytest.approx(0.1)
    finally:
        release.set()
        await channel.close()
        await runner.drain()


async def test_the_synthesiser_timeout_grows_with_the_text_up_to_its_cap() -> None:
    engine = TtsEngine(kokoro=False, timeout_s=20.0, timeout_base_s=0.005, timeout_per_char_s=0.00001)
    assert engine.timeout_for("hi") == pytest.approx(0.00502)
    assert engine.timeout_for("x" * 300) == pytest.approx(0.008)
    assert TtsEngine(kokoro=False, timeout_s=20.0).timeout_for("x" * 10_000) == 20.0  # capped
    engine.load()
    voice = engine.find_voice("flite", "")
    assert voice is not None
    with pytest.raises(Exception) as caught:
        await engine.synthesize_sentence(voice, "A sentence that flite cannot say in eight milliseconds, " * 5)
    assert getattr(caught.value, "reason", "") == "TTS_TIMEOUT" and "took longer than 0.00" in str(caught.value)
    assert not engine.running


DECODE_PEAK = """
import io, resource, sys
import numpy as np, soundfile as sf
from services.speech.audio import decode_audio
out = io.BytesIO()
with sf.SoundFile(out, "w", 48000, 8, format="FLAC", subtype="PCM_16") as f:
    for _ in range(30):
        f.write(np.zeros((480_000, 8), np.float32))
data = out.getvalue()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
decoded = decode_audio(data, max_bytes=25 * 2**20, max_seconds=1800)
print(len(data), decoded.duration_s, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_a_compressed_multichannel_recording_does_not_expand_in_memory() -> None:
    """5 minutes of 8-channel 48 kHz silence is a ~120 KB FLAC that expands to 460 MB of float samples; decoded block
    by block to 16 kHz mono, the process grows by about the 19 MB result (it grew by ~455 MiB when read whole)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", DECODE_PEAK], capture_output=True, text=True, check=True, timeout=120)
    size, seconds, grew_mib = out.stdout.split()
    assert int(size) < 1_000_000 and float(seconds) == pytest.approx(300.0)
    assert int(grew_mib) < 80, f"decoding grew the process by {grew_mib} MiB"
