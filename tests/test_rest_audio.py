"""/v1/audio/transcriptions and /v1/audio/speech of the OpenAI-compatible REST front door, called with the openai
SDK on a mesh started by `aimass up`: espeak-ng speech transcribed in every response format, synthesised speech
that soundfile plays, and uploads refused (bad key, no scope, oversize) before the server reads them."""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import numpy as np
import openai
import pytest
import soundfile  # type: ignore[import-untyped]

from aimass.local_mesh import LocalMesh
from aimass.tenancy import keys
from tests.eventually import eventually_value
from tests.metrics import scrape, value
from tests.security import key_for
from tests.test_speech import ESPEAK_SENTENCE, word_error_rate

ASR = "whisper-base"
MiB = 1 << 20


def client(mesh: LocalMesh, api_key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.rest_url, api_key=api_key or mesh.api_key, max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def espeak_wav() -> bytes:
    """The sentence spoken by espeak-ng itself (not through the mesh), as a WAV file."""
    return subprocess.run(
        ["espeak-ng", "-v", "en-us", "--stdout", "--", ESPEAK_SENTENCE], capture_output=True, check=True, timeout=30
    ).stdout


@pytest.fixture(scope="module")
def verbose(front_door_mesh: LocalMesh, espeak_wav: bytes) -> openai.types.audio.TranscriptionVerbose:
    return client(front_door_mesh).audio.transcriptions.create(
        model=ASR, file=("speech.wav", espeak_wav, "audio/wav"), response_format="verbose_json", language="en"
    )


def test_transcription_json_and_text(front_door_mesh: LocalMesh, espeak_wav: bytes) -> None:
    c = client(front_door_mesh)
    as_json = c.audio.transcriptions.create(model=ASR, file=("speech.wav", espeak_wav, "audio/wav"))
    assert word_error_rate(ESPEAK_SENTENCE, as_json.text) <= 0.15, as_json.text
    assert as_json.usage is not None and as_json.usage.type == "duration"
    as_text = c.audio.transcriptions.create(
        model=ASR, file=("speech.wav", espeak_wav, "audio/wav"), response_format="text", prompt="Stella", temperature=0
    )
    assert isinstance(as_text, str) and word_error_rate(ESPEAK_SENTENCE, as_text) <= 0.15, as_text


def test_transcription_verbose_json_has_segments_duration_and_language(
    verbose: openai.types.audio.TranscriptionVerbose, espeak_wav: bytes
) -> None:
    data, rate = soundfile.read(io.BytesIO(espeak_wav))
    assert verbose.language == "en"
    assert verbose.duration == pytest.approx(len(data) / rate, abs=0.05)
    assert word_error_rate(ESPEAK_SENTENCE, verbose.text) <= 0.15, verbose.text
    segments = verbose.segments or []
    assert segments and [s.id for s in segments] == list(range(len(segments)))
    assert 0 <= segments[0].start < segments[-1].end <= verbose.duration + 0.5
    assert " ".join(s.text.strip() for s in segments) == verbose.text.strip()


def test_transcription_as_subtitles(
    front_door_mesh: LocalMesh, espeak_wav: bytes, verbose: openai.types.audio.TranscriptionVerbose
) -> None:
    c = client(front_door_mesh)
    srt = c.audio.transcriptions.create(
        model=ASR, file=("speech.wav", espeak_wav), response_format="srt", language="en"
    )
    vtt = c.audio.transcriptions.create(
        model=ASR, file=("speech.wav", espeak_wav), response_format="vtt", language="en"
    )
    assert isinstance(srt, str) and isinstance(vtt, str)
    first = (verbose.segments or [])[0]
    cues = srt.strip().split("\n\n")
    assert len(cues) == len(verbose.segments or [])
    number, times, text = cues[0].split("\n", 2)
    assert number == "1" and text == first.text.strip()
    assert re.fullmatch(r"00:00:\d\d,\d{3} --> 00:00:\d\d,\d{3}", times), times
    assert times.startswith(f"00:00:{int(first.start):02d},{round(first.start * 1000) % 1000:03d}")
    assert vtt.startswith("WEBVTT\n\n")
    assert re.search(r"^00:00:\d\d\.\d{3} --> 00:00:\d\d\.\d{3}\n" + re.escape(text), vtt, re.MULTILINE), vtt


def test_transcription_refusals(front_door_mesh: LocalMesh, espeak_wav: bytes) -> None:
    c = client(front_door_mesh)
    with pytest.raises(openai.BadRequestError) as corrupt:
        c.audio.transcriptions.create(model=ASR, file=("speech.wav", b"RIFF this is not audio at all" * 100))
    assert "audio" in corrupt.value.message
    with pytest.raises(openai.NotFoundError) as unknown:
        c.audio.transcriptions.create(model="whisper-1", file=("speech.wav", espeak_wav))
    assert "whisper-1" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as words:
        c.audio.transcriptions.create(
            model=ASR, file=("speech.wav", espeak_wav), response_format="verbose_json", timestamp_granularities=["word"]
        )
    assert words.value.param == "timestamp_granularities"
    with pytest.raises(openai.BadRequestError) as fmt:
        c.audio.transcriptions.create(model=ASR, file=("speech.wav", espeak_wav), response_format="diarized_json")
    assert "json, text, verbose_json, srt, vtt" in fmt.value.message

    # Missing fields, named (multipart, as any HTTP client would send them).
    auth = {"authorization": f"Bearer {front_door_mesh.api_key}"}
    url = f"{front_door_mesh.rest_url}/audio/transcriptions"
    no_file = httpx.post(url, data={"model": ASR}, files={"other": ("x.txt", b"x")}, headers=auth, timeout=60)
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file", no_file.text
    no_model = httpx.post(url, files={"file": ("speech.wav", espeak_wav)}, headers=auth, timeout=60)
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model", no_model.text
    as_json = httpx.post(url, json={"model": ASR, "file": "speech.wav"}, headers=auth, timeout=60)
    assert as_json.status_code == 400 and "multipart/form-data" in as_json.json()["error"]["message"]


def test_oversize_upload_is_413_in_openai_shape(front_door_mesh: LocalMesh) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client(front_door_mesh).audio.transcriptions.create(model=ASR, file=("big.wav", b"\0" * (26 * MiB)))
    assert caught.value.status_code == 413
    assert caught.value.code == "request_too_large" and "26,214,400" in caught.value.message

    # Without a Content-Length (chunked), counted as it arrives: refused once past the limit.
    def body() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        for _ in range(30):
            yield b"\0" * MiB

    chunked = httpx.post(
        f"{front_door_mesh.rest_url}/audio/transcriptions",
        content=body(),
        headers={
            "authorization": f"Bearer {front_door_mesh.api_key}",
            "content-type": "multipart/form-data; boundary=b",
        },
        timeout=60,
    )
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"


async def first_answer_without_the_body(mesh: LocalMesh, key: str) -> tuple[int, dict[str, object]]:
    """Sends the headers of a 20 MiB upload and only its first 64 KiB, then reads the answer: one that comes proves
    the server answered without waiting for (or reading) the rest."""
    url = urlsplit(mesh.rest_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        head = (
            f"POST {url.path}/audio/transcriptions HTTP/1.1\r\nhost: {url.netloc}\r\n"
            f"authorization: Bearer {key}\r\ncontent-type: multipart/form-data; boundary=b\r\n"
            f"content-length: {20 * MiB}\r\n\r\n"
        )
        writer.write(head.encode() + b"--b\r\n" + b"\0" * 65536)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=30)
        headers: dict[str, str] = {}
        while (line := await asyncio.wait_for(reader.readline(), timeout=30)) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), timeout=30)
        return int(status_line.split()[1]), json.loads(body)
    finally:
        writer.close()


async def test_a_bad_key_or_a_key_without_infer_is_refused_before_the_upload_is_read(
    front_door_mesh: LocalMesh,
) -> None:
    status, body = await first_answer_without_the_body(front_door_mesh, "not-a-key")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"  # type: ignore[index]
    no_infer = key_for("rest-audio-train-only", scopes=(keys.SCOPE_MODELS_TRAIN,))
    status, body = await first_answer_without_the_body(front_door_mesh, no_infer)
    assert status == 403 and "infer" in body["error"]["message"]  # type: ignore[index]
    # And with the SDK: the same classes as for any other call.
    with pytest.raises(openai.AuthenticationError):
        client(front_door_mesh, "not-a-key").audio.transcriptions.create(model=ASR, file=("a.wav", b"\0" * (20 * MiB)))


def test_a_tenant_at_one_request_a_second_transcribes_then_waits(front_door_mesh: LocalMesh, espeak_wav: bytes) -> None:
    """A file under 1 MiB is read before the gateway judges its key on the call itself, so the key check spends
    none of the tenant's rate: its one request a second is the transcription, and the next is refused 429."""
    c = client(front_door_mesh, key_for("rest-audio-limited", requests_per_second=1))
    first = c.audio.transcriptions.create(model=ASR, file=("speech.wav", espeak_wav), response_format="text")
    assert word_error_rate(ESPEAK_SENTENCE, first) <= 0.15, first
    # The bucket refilled while Whisper ran: one quick (refused) call takes that request, the next is over the rate.
    with pytest.raises(openai.BadRequestError):
        c.audio.transcriptions.create(model=ASR, file=("bad.wav", b"not audio at all"))
    with pytest.raises(openai.RateLimitError) as limited:
        c.audio.transcriptions.create(model=ASR, file=("speech.wav", espeak_wav), response_format="text")
    assert int(limited.value.response.headers["retry-after"]) >= 1 and limited.value.code == "quota_exceeded"


def test_speech_is_a_playable_wav_streamed_as_it_is_made(front_door_mesh: LocalMesh) -> None:
    text = "Hello from the front door. This is a second sentence."
    with client(front_door_mesh).audio.speech.with_streaming_response.create(
        model="flite", voice="slt", input=text, response_format="wav"
    ) as streamed:
        assert streamed.headers["content-type"] == "audio/wav"
        assert "content-length" not in streamed.headers  # streamed, not buffered
        chunks = list(streamed.iter_bytes())
    wav = b"".join(chunks)
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="int16")
    assert rate == int(streamed.headers["x-aimass-sample-rate"])
    assert 1.5 < len(samples) / rate < 10
    assert np.abs(samples).max() > 1000  # speech, not silence


def test_speech_as_pcm_is_raw_16_bit_at_24_khz(front_door_mesh: LocalMesh) -> None:
    pcm = client(front_door_mesh).audio.speech.create(
        model="espeak-ng", voice="en-us", input="Testing raw audio.", response_format="pcm"
    )
    data = pcm.read()
    assert data[:4] != b"RIFF" and len(data) % 2 == 0
    assert pcm.response.headers["x-aimass-sample-rate"] == "24000"
    samples = np.frombuffer(data, dtype="<i2")
    assert 0.5 < len(samples) / 24_000 < 5 and np.abs(samples).max() > 1000


def test_speech_with_kokoro_as_in_the_issue(front_door_mesh: LocalMesh) -> None:
    wav = client(front_door_mesh).audio.speech.create(model="kokoro", voice="jf_alpha", input="Hello").read()
    samples, rate = soundfile.read(io.BytesIO(wav))
    assert rate == 24_000 and 0.2 < len(samples) / rate < 5


def test_a_client_that_goes_away_cancels_the_synthesis(front_door_mesh: LocalMesh) -> None:
    """The client reads the first chunk of ~100 sentences and hangs up: the replica's Synthesize call ends CANCELLED
    (had it run on, it would have ended OK)."""
    replica = front_door_mesh.metrics_address("speech-0")
    method = "/aimass.v1.SpeechService/Synthesize"

    def finished(code: str) -> float:
        return value(scrape(replica), "aimass_requests_total", method=method, code=code)

    cancelled, completed = finished("CANCELLED"), finished("OK")
    text = " ".join(f"This is sentence number {i} of a long text that nobody will hear." for i in range(70))
    with httpx.stream(
        "POST",
        f"{front_door_mesh.rest_url}/audio/speech",
        json={"model": "flite", "voice": "slt", "input": text, "response_format": "pcm"},
        headers={"authorization": f"Bearer {front_door_mesh.api_key}"},
        timeout=60,
    ) as streamed:
        assert streamed.status_code == 200
        assert next(streamed.iter_raw())
    eventually_value("the replica's call cancelled", lambda: finished("CANCELLED") > cancelled or None, timeout_s=30)
    assert finished("OK") == completed


def test_speech_refusals(front_door_mesh: LocalMesh) -> None:
    c = client(front_door_mesh)
    with pytest.raises(openai.BadRequestError) as voice:
        c.audio.speech.create(model="flite", voice="alloy", input="Hello")
    assert voice.value.param == "voice" and "slt" in voice.value.message, voice.value.message
    with pytest.raises(openai.BadRequestError) as fmt:
        c.audio.speech.create(model="flite", voice="slt", input="Hello", response_format="mp3")
    assert "wav, pcm" in fmt.value.message and fmt.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as speed:
        c.audio.speech.create(model="flite", voice="slt", input="Hello", speed=1.5)
    assert speed.value.param == "speed"
    with pytest.raises(openai.NotFoundError) as unknown:
        c.audio.speech.create(model="tts-1", voice="slt", input="Hello")
    assert "tts-1" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as empty:
        c.audio.speech.create(model="flite", voice="slt", input="  ...  ")
    assert "nothing to speak" in empty.value.message
    missing = httpx.post(
        f"{front_door_mesh.rest_url}/audio/speech",
        json={"model": "flite", "voice": "slt"},
        headers={"authorization": f"Bearer {front_door_mesh.api_key}"},
        timeout=60,
    )
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "input", missing.text
