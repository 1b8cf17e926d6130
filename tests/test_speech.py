"""The speech service on its real models (flite/espeak-ng, Whisper base) behind an in-process grpc.aio server:
round trips synthesis → recognition, streaming both ways, bad audio and cancellation, as a client sees them."""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import re
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
import soundfile as sf  # type: ignore[import-untyped]

from aimass.runtime.config import ServerConfig, Settings, SpeechConfig
from aimass.runtime.server import ServerRunner
from aimass.v1 import common_pb2, speech_pb2, speech_pb2_grpc
from services.speech.app import build_runner
from services.speech.asr import AsrEngine
from services.speech.audio import StreamDecoder, decode_audio
from services.speech.streaming import Segmenter
from services.speech.tts import TtsEngine, split_sentences
from tests.security import as_gateway

SENTENCE = "The quick brown fox jumps over the lazy dog and runs into the green forest."
TWO_SENTENCES = "Please call Stella and ask her to bring these things. We will meet at the train station tomorrow."
# espeak-ng's voice is harder to understand than flite's; this sentence it speaks clearly enough for Whisper base.
ESPEAK_SENTENCE = "Please call Stella and ask her to bring these things with her from the store."
MAX_SECONDS = 60.0


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over words divided by the reference length."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        previous, row[0] = row[0], i
        for j, hyp_word in enumerate(hyp, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ref_word != hyp_word))
    return row[-1] / max(len(ref), 1)


def test_word_error_rate() -> None:
    assert word_error_rate("a b c d", "a b c d") == 0.0
    assert word_error_rate("a b c d", "a x c") == 0.5


@pytest.fixture(scope="session")
def tts_engine() -> TtsEngine:
    engine = TtsEngine()
    engine.load()
    return engine


@pytest.fixture(scope="session")
def asr_engine() -> AsrEngine:
    engine = AsrEngine(device="cpu")
    engine.load()
    return engine


@pytest.fixture(scope="session")
async def speech(
    asr_engine: AsrEngine, tts_engine: TtsEngine
) -> AsyncIterator[tuple[ServerRunner, speech_pb2_grpc.SpeechServiceAsyncStub]]:
    config = SpeechConfig(server=ServerConfig(port=0, drain_delay_s=0.05), max_audio_seconds=MAX_SECONDS)
    runner = build_runner(Settings(), config=config, register=False, asr=asr_engine, tts=tts_engine)
    await runner.start()
    channel = as_gateway(runner.address, "speech")  # a replica's caller: a gateway, over mesh mTLS
    try:
        yield runner, speech_pb2_grpc.SpeechServiceStub(channel)
    finally:
        await channel.close()
        await runner.drain()


async def synthesize(
    stub: speech_pb2_grpc.SpeechServiceAsyncStub, text: str, **fields: object
) -> tuple[bytes, list[speech_pb2.SynthesizeAudio], speech_pb2.SynthesizeEnd]:
    chunks: list[speech_pb2.SynthesizeAudio] = []
    end: speech_pb2.SynthesizeEnd | None = None
    async for reply in stub.Synthesize(speech_pb2.SynthesizeRequest(text=text, **fields), timeout=60):  # type: ignore[arg-type]
        if reply.WhichOneof("event") == "audio":
            assert end is None, "audio after the end marker"
            chunks.append(reply.audio)
        else:
            end = reply.end
    assert end is not None
    return b"".join(c.data for c in chunks), chunks, end


async def test_synthesize_then_transcribe_gives_the_same_words(
    speech: tuple[ServerRunner, speech_pb2_grpc.SpeechServiceAsyncStub],
) -> None:
    _, stub = speech
    # 22050 Hz makes the service resample on both sides (flite speaks at 16 kHz, Whisper listens at 16 kHz).
    wav, chunks, end = await synthesize(stub, SENTENCE, sample_rate_hz=22050)
    assert wav[:4] == b"RIFF" and wav[4:8] == b"\xff\xff\xff\xff"
    assert {(c.sample_rate_hz, c.encoding, c.channels) for c in chunks} == {(22050, speech_pb2.AUDIO_ENCODING_WAV, 1)}
    assert end.model.name == "flite" and end.sample_count == (len(wav) - 44) // 2
    reply = await stub.Transcribe(speech_pb2.TranscribeRequest(audio=wav), timeout=60)
    assert word_error_rate(SENTENCE, reply.text) <= 0.1, reply.text
    assert reply.language == "en" and reply.language_probability > 0.5
    assert reply.model.name == "whisper-base"
    assert reply.duration_seconds == pytest.approx(end.duration_seconds, abs=0.01)
    assert reply.segments and all(s.start_seconds < s.end_seconds <= reply.duration_seconds for s in reply.segments)


async def test_espeak_voice_round_trip_as_flac(
    speech: tuple[ServerRunner, speech_pb2_grpc.SpeechServiceAsyncStub],
) -> None:
    _, stub = speech
    pcm, chunks, end = await synthesize(
        stub,
        ESPEAK_SENTENCE,
        model=common_pb2.ModelRef(name="espeak-ng"),
        voice="en-us",
        encoding=speech_pb2.AUDIO_ENCODING_PCM16,
    )
    assert end.model.name == "espeak-ng" and chunks[0].sample_rate_hz == 22050
    flac = io.BytesIO()
    sf.write(flac, np.frombuffer(pcm, "<i2"), 22050, format="FLAC")
    reply = await stub.Transcribe(speech_pb2.TranscribeRequest(audio=flac.getvalue(), language="en"), timeout=60)
    assert word_error_rate(ESPEAK_SENTENCE, reply.text) <= 0.1, reply.text
    assert reply.language_probability == 1.0


async def test_kokoro_neural_voice_round_trip(
    speech: tuple[ServerRunner, speech_pb2_grpc.SpeechServiceAsyncStub],
) -> None:
    _, stub = speech
    wav, chunks, end = await synthesize(stub, SENTENCE, model=common_pb2.ModelRef(name="kokoro"))
    assert end.model.name == "kokoro" and chunks[0].sample_rate_hz == 24000
    reply = await stub.Transcribe(speech_pb2.TranscribeRequest(audio=wav), timeout=60)
    assert word_error_rate(SENTENCE, reply.text) <= 0.1, reply.text


@pytest.mark.parametrize("low_latency", [False, True], ids=["beam", "greedy finals"])
async def test_stream_transcribe_in_100ms_chunks(
    speech: tuple[ServerRunner, speech_pb2_grpc.SpeechServiceAsyncStub], low_latency: bool
) -> None:
    _, stub = speech
    pcm, _, end = await synthesize(stub, TWO_SENTENCES, encoding=speech_pb2.AUDIO_ENCODING_PCM16, sample_rate_hz=16000)
    chunk = 16000 * 2 // 10  # 100 ms of 16-bit samples

    async def requests() -> AsyncIterator[speech_pb2.StreamTranscribeRequest]:
        yield speech_pb2.StreamTranscribeRequest(
            config=speech_pb2.StreamTranscribeConfig(
                encoding=speech_pb2.AUDIO_ENCODING_PCM16,
                sample_rate_hz=16000,
                interim_results=True,
                low_latency=low_latency,
            )
        )
        for offset in range(0, len(pcm), chunk):
            yield speech_pb2.StreamTranscribeRequest(audio=pcm[offset : offset + chunk])

    events = [reply async for reply in stub.StreamTranscribe(requests(), timeout=120)]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "end" and kinds.count("end") == 1
    finals = [e.final_segment for e in events if e.WhichOneof("event") == "final_segment"]
    assert finals, kinds
    # Final segments tile the stream in order.
    assert finals[0].start_seconds == 0.0
    assert all(a.end_seconds == b.start_seconds for a, b in itertools.pairwise(finals))
    done = events[-1].end
    assert done.text == " ".join(f.text for f in finals)
    assert word_error_rate(TWO_SENTENCES, done.text) <= 0.1, done.text
    assert done.language == "en"
    assert done.duration_seconds == pytest.approx(end.duration_seconds, abs=0.01)


async def test_stream_sends_partials_while_audio_arrives_and_survives_a_cancel(
    speech: tuple[ServerRunner, speech_pb2_grpc.SpeechServiceAsyncStub],
) -> None:
    _, stub = speech
    wav, _, _ = await synthesize(stub, ESPEAK_SENTENCE, voice="slt")
    config = speech_pb2.StreamTranscribeConfig(encoding=speech_pb2.AUDIO_ENCODING_WAV, interim_results=True)
    call = stub.StreamTranscribe(timeout=60)
    await call.write(speech_pb2.StreamTranscribeRequest(config=config))
    half = len(wav) // 2
    for offset in range(0, half, 3200):
        await call.write(speech_pb2.StreamTranscribeRequest(audio=wav[offset : min(offset + 3200, half)]))
    # The stream is still open, so whatever comes now was heard from the first half alone.
    event = await call.read()
    assert isinstance(event, speech_pb2.StreamTranscribeResponse)
    assert event.WhichOneof("event") == "partial", event
    assert event.partial.start_seconds == 0.0 and event.partial.end_seconds >= 1.0
    assert words(event.partial.text)[:2] == ["please", "call"], event.partial.text
    call.cancel()
    # The server dropped that stream and serves the next one.
    voices = await stub.ListVoices(speech_pb2.ListVoicesRequest(language="en"), timeout=10)
    assert voices.voices


async def test_stream_of_a_wav_file_split_anywhere_equals_the_whole_file(tts_engine: TtsEngine) -> None:
    rng = np.random.default_rng(7)
    audio = (rng.standard_normal(44100) * 0.1).astype(np.float32)
    wav = io.BytesIO()
    sf.write(wav, audio, 44100, format="WAV", subtype="PCM_16")
    data = wav.getvalue()
    decoder = StreamDecoder(wav=True)
    cuts = [0, 3, 17, 45, 101, 2001, 30001, len(data)]  # inside the header, inside samples
    pieces = [decoder.feed(data[a:b], last=b == len(data)) for a, b in itertools.pairwise(cuts)]
    streamed = np.concatenate(pieces)
    whole = decode_audio(data, max_bytes=10**7, max_seconds=60).samples
    assert abs(len(streamed) - len(whole)) <= 2
    n = min(len(streamed), len(whole))
    assert float(np.max(np.abs(streamed[100 : n - 100] - whole[100 : n - 100]))) < 0.02


def test_segmenter_cuts_at_a_pause_or_at_the_window() -> None:
    rate = 16000
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(2 * rate) / rate)).astype(np.float32)
    pause = np.zeros(int(0.6 * rate), np.float32)
    segmenter = Segmenter(min_segment_s=1.5, min_silence_s=0.4, max_segment_s=8.0)
    segmenter.add(tone)
    assert segmenter.next_cut(closed=False) is None  # no pause yet, window not full
    segmenter.add(pause)
    segmenter.add(tone)
    cut = segmenter.next_cut(closed=False)
    assert cut is not None and 2.0 * rate < cut < 2.6 * rate  # inside the pause
    segmenter.take(cut)
    assert segmenter.next_cut(closed=False) is None
    segmenter.add(np.tile(tone, 4))  # 10 s without a pause: forced at the window's quietest point
    forced = segmenter.next_cut(closed=False)
    assert forced is not None and forced <= 8 * rate
    segmenter.take(forced)
    assert segmenter.next_cut(closed=True) == len(segmenter.buffer)


async def test_first_audio_arrives_before_the_whole_text_is_synthesised(
    speech: tuple[ServerRunner, speech_pb2_grpc.SpeechServiceAsyncStub],
) -> None:
    _, stub = speech
    text = " ".join(f"This is sentence number {n} of a long text that is read aloud." for n in range(1, 13))
    assert len(split_sentences(text)) == 12
    started = time.perf_counter()
    arrivals: list[float] = []
    async for reply in stub.Synthesize(speech_pb2.SynthesizeRequest(text=text), timeout=60):
        if reply.WhichOneof("event") == "audio":
            arrivals.append(time.perf_counter() - started)
    assert len(arrivals) > 12
    # Sentence by sentence: the first chunk comes after about one sentence of the twelve.
    assert arrivals[0] < 0.3 * arrivals[-1], (arrivals[0], arrivals[-1])


def wav_bytes(seconds: float, rate: int = 8000, subtype: str = "PCM_16") -> bytes:
    out = io.BytesIO()
    sf.write(out, np.zeros(int(seconds * rate), np.float32), rate, format="WAV", subtype=subtype)
    return out.getvalue()


@pytest.mark.parametrize(
    ("audio", "reason", "message"),
    [
        (b"", "EMPTY_AUDIO", "audio is empty"),
        (b"hello, this is plain text and not a sound at all", "NOT_AUDIO", "not a recognised audio file"),
        (wav_bytes(MAX_SECONDS + 1), "AUDIO_TOO_LONG", f"61.0 s long; the limit is {MAX_SECONDS:g} s"),
        (wav_bytes(1, subtype="ULAW"), "UNSUPPORTED_CODEC", "WAV with codec ULAW, which is not supported"),
        (b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\x00" * 200, "UNSUPPORTED_CODEC", "audio is MP3"),
        (wav_bytes(1)[:30], "CORRUPT_AUDIO", "looks like RIFF but cannot be read"),
        (wav_bytes(1, rate=4000), "BAD_SAMPLE_RATE", "4000 Hz; accepted are 8000..48000 Hz"),
    ],
    ids=["empty", "not-audio", "too-long", "ulaw", "mp3", "truncated", "low-rate"],
)
async def test_bad_audio_is_invalid_argument_and_the_server_keeps_serving(
    speech: tuple[ServerRunner, speech_pb2_grpc.SpeechServiceAsyncStub], audio: bytes, reason: str, message: str
) -> None:
    from aimass.runtime.metadata import ERROR_INFO_KEY

    _, stub = speech
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Transcribe(speech_pb2.TranscribeRequest(audio=audio), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (caught.value.details() or "")
    info = common_pb2.ErrorInfo.FromString(dict(caught.value.trailing_metadata() or ())[ERROR_INFO_KEY])
    assert info.reason == reason
    voices = await stub.ListVoices(speech_pb2.ListVoicesRequest(), timeout=10)
    assert voices.voices


async def test_bad_streams_and_requests_are_invalid_argument(
    speech: tuple[ServerRunner, speech_pb2_grpc.SpeechServiceAsyncStub],
) -> None:
    _, stub = speech

    async def only_audio() -> AsyncIterator[speech_pb2.StreamTranscribeRequest]:
        yield speech_pb2.StreamTranscribeRequest(audio=b"\x00\x00")

    async def flac_config() -> AsyncIterator[speech_pb2.StreamTranscribeRequest]:
        yield speech_pb2.StreamTranscribeRequest(
            config=speech_pb2.StreamTranscribeConfig(encoding=speech_pb2.AUDIO_ENCODING_OGG)
        )

    for source, message in [(only_audio, "must carry config"), (flac_config, "cannot be streamed")]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.StreamTranscribe(source(), timeout=10):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (caught.value.details() or "")
    for request, message in [
        (speech_pb2.SynthesizeRequest(text=" "), "text has nothing to speak"),
        (speech_pb2.SynthesizeRequest(text="... !"), "text has nothing to speak"),
        (speech_pb2.SynthesizeRequest(text="x" * 5001), "5001 characters; the limit is 5000"),
        (speech_pb2.SynthesizeRequest(text="hi", sample_rate_hz=96000), "96000 Hz; accepted are 8000..48000"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Synthesize(request, timeout=10):
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.Synthesize(speech_pb2.SynthesizeRequest(text="hi", voice="nobody"), timeout=10):
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cancelling_synthesize_kills_the_synthesiser(
    speech: tuple[ServerRunner, speech_pb2_grpc.SpeechServiceAsyncStub], tts_engine: TtsEngine
) -> None:
    _, stub = speech
    text = " ".join(f"Sentence {n} goes on for a while so that synthesis takes some time." for n in range(60))
    call = stub.Synthesize(speech_pb2.SynthesizeRequest(text=text), timeout=60)
    first = await call.read()
    assert isinstance(first, speech_pb2.SynthesizeResponse)
    assert first.WhichOneof("event") == "audio"
    call.cancel()
    await asyncio.sleep(0.3)
    spawned = len(tts_engine.spawned)
    await asyncio.sleep(0.3)
    # Flow control holds the server one sentence ahead of the client; after the cancel nothing new starts.
    assert len(tts_engine.spawned) == spawned < 60
    assert not tts_engine.running
    for pid in tts_engine.spawned:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # exited or killed, and reaped


async def test_list_voices(speech: tuple[ServerRunner, speech_pb2_grpc.SpeechServiceAsyncStub]) -> None:
    _, stub = speech
    flite = await stub.ListVoices(speech_pb2.ListVoicesRequest(model=common_pb2.ModelRef(name="flite")), timeout=10)
    rates = {v.voice_id: v.native_sample_rate_hz for v in flite.voices}
    assert rates["slt"] == 16000 and rates["kal"] == 8000
    german = await stub.ListVoices(speech_pb2.ListVoicesRequest(language="de"), timeout=10)
    assert [v.voice_id for v in german.voices] == ["de"]
    assert german.voices[0].model.name == "espeak-ng"
    kokoro = await stub.ListVoices(speech_pb2.ListVoicesRequest(model=common_pb2.ModelRef(name="kokoro")), timeout=10)
    assert {v.voice_id for v in kokoro.voices} >= {"jm_kumo"}
    assert {v.native_sample_rate_hz for v in kokoro.voices} == {24000}
