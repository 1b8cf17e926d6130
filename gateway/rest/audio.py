"""OpenAI's audio endpoints over SpeechService.

- ``POST /v1/audio/transcriptions`` (multipart: ``file``, ``model``, ``language``, ``prompt``, ``response_format``,
  ``temperature``, ``timestamp_granularities[]``) → Transcribe. Formats json, text, verbose_json (language as its
  ISO 639-1 code, duration, segments with id/start/end/text), srt and vtt. ``prompt`` and ``temperature`` are
  accepted and not used: the mesh's Whisper decodes with beam search at its configured settings. Word timestamps,
  ``stream=true`` and diarized_json are refused (the service gives segments only). No ``/v1/audio/translations``:
  the service only transcribes.
- ``POST /v1/audio/speech`` (JSON: ``model``, ``input``, ``voice``, ``response_format`` wav|pcm, ``speed`` 1.0) →
  Synthesize, streamed to the client as the service produces it. ``pcm`` is raw 16-bit little-endian mono at
  24 kHz, as OpenAI's is; ``wav`` is at the voice's own rate, with the streaming header convention (RIFF and data
  sizes 0xFFFFFFFF: the length is unknown when the header goes out), which libsndfile, ffmpeg and browsers read.
  The first chunk is awaited before the response starts, so a refusal is a proper HTTP error; a client that goes
  away cancels the call (and with it the synthesiser).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from typing import Annotated, Any, Final

import grpc
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from aimass.client import error_info
from aimass.v1 import common_pb2, speech_pb2
from gateway.rest.errors import OpenAIError, from_rpc_error
from gateway.rest.metrics import upstream_error
from gateway.rest.uploads import KEY_CHECKED, files_of, read_form, text_field
from gateway.rest.upstream import Upstream, call_metadata, call_timeout, request_meta, upstream

log = logging.getLogger(__name__)
router = APIRouter()

TRANSCRIPTION_FORMATS: Final = ("json", "text", "verbose_json", "srt", "vtt")
SPEECH_FORMATS: Final = ("wav", "pcm")
# OpenAI's pcm: 24 kHz, 16-bit signed little-endian, mono.
PCM_RATE_HZ: Final = 24_000
VOICES_LISTED: Final = 12


# -- transcriptions ---------------------------------------------------------------------------------------------

# The form is read by hand (after the key check), so /openapi.json is told its fields here.
TRANSCRIPTION_FORM: Final = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "model"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "model": {"type": "string", "example": "whisper-base"},
                        "language": {"type": "string", "description": "ISO 639-1; empty: detected"},
                        "prompt": {"type": "string", "description": "accepted, not used"},
                        "response_format": {"type": "string", "enum": list(TRANSCRIPTION_FORMATS)},
                        "temperature": {"type": "number", "description": "0..1; accepted, not used"},
                    },
                }
            }
        },
    }
}


@router.post(
    "/v1/audio/transcriptions", response_model=None, dependencies=[KEY_CHECKED], openapi_extra=TRANSCRIPTION_FORM
)
async def create_transcription(
    request: Request,
    up: Annotated[Upstream, Depends(upstream)],
) -> Response:
    form = await read_form(request, max_files=1)
    try:
        files = files_of(form, "file")
        if not files:
            raise OpenAIError(
                400, "'file' is required: the audio file (WAV, FLAC or OGG) as a multipart file part", param="file"
            )
        model = text_field(form, "model")
        if not model:
            raise OpenAIError(400, "'model' is required, e.g. 'whisper-base'", param="model")
        response_format = text_field(form, "response_format", "json") or "json"
        if response_format not in TRANSCRIPTION_FORMATS:
            raise OpenAIError(
                400,
                f"response_format {response_format!r} is not supported; use one of {', '.join(TRANSCRIPTION_FORMATS)}",
                param="response_format",
            )
        language = text_field(form, "language")
        _check_unused_options(form)
        audio = await files[0].read()
    finally:
        await form.close()
    if not audio:
        raise OpenAIError(400, "the uploaded file is empty; send the audio's bytes", param="file")
    reply: speech_pb2.TranscribeResponse = await up.speech.Transcribe(
        speech_pb2.TranscribeRequest(
            meta=request_meta(request),
            model=common_pb2.ModelRef(name=model),
            audio=audio,
            language=language,
        ),
        metadata=call_metadata(request),
        timeout=call_timeout(request),
    )
    return transcription_response(reply, response_format)


def _check_unused_options(form: Any) -> None:
    """Options the service cannot honour are refused rather than silently dropped; ones that only tune decoding
    (prompt, temperature) are checked for sense and left to the service's own settings."""
    temperature = text_field(form, "temperature")
    if temperature:
        try:
            value = float(temperature)
        except ValueError:
            value = math.nan
        if not 0 <= value <= 1:
            raise OpenAIError(400, f"temperature {temperature!r} must be a number from 0 to 1", param="temperature")
    granularities = {text_field(form, key) for key in ("timestamp_granularities[]", "timestamp_granularities")}
    granularities |= {v.strip() for v in form.getlist("timestamp_granularities[]") if isinstance(v, str)}
    granularities.discard("")
    if granularities - {"segment"}:
        raise OpenAIError(
            400,
            f"timestamp_granularities {sorted(granularities)} are not supported; only 'segment' "
            "(in verbose_json) is: the service gives segment times, not word times",
            param="timestamp_granularities",
        )
    if text_field(form, "stream").lower() in ("true", "1"):
        raise OpenAIError(
            400,
            "stream=true is not supported for transcriptions; the whole transcript comes in one answer",
            param="stream",
        )


def transcription_response(reply: speech_pb2.TranscribeResponse, response_format: str) -> Response:
    usage = {"type": "duration", "seconds": reply.duration_seconds}
    if response_format == "text":
        return PlainTextResponse(reply.text.strip())
    if response_format in ("srt", "vtt"):
        return PlainTextResponse(subtitles(reply.segments, vtt=response_format == "vtt"))
    if response_format == "verbose_json":
        return JSONResponse(
            {
                "task": "transcribe",
                "language": reply.language,
                "duration": reply.duration_seconds,
                "text": reply.text.strip(),
                "segments": [
                    {"id": i, "start": s.start_seconds, "end": s.end_seconds, "text": s.text}
                    for i, s in enumerate(reply.segments)
                ],
                "usage": usage,
            }
        )
    return JSONResponse({"text": reply.text.strip(), "usage": usage})


def _timestamp(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def subtitles(segments: Any, *, vtt: bool) -> str:
    """SubRip (numbered cues, comma before milliseconds) or WebVTT (a header, dot before milliseconds)."""
    cues = []
    for number, segment in enumerate(segments, start=1):
        sep = "." if vtt else ","
        times = f"{_timestamp(segment.start_seconds, sep)} --> {_timestamp(segment.end_seconds, sep)}"
        text = segment.text.strip()
        cues.append(f"{times}\n{text}\n" if vtt else f"{number}\n{times}\n{text}\n")
    return ("WEBVTT\n\n" if vtt else "") + "\n".join(cues)


# -- speech -----------------------------------------------------------------------------------------------------


class SpeechBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str
    # A voice id (ListVoices) or OpenAI's custom-voice object {"id": ...}; left out: the model's default voice.
    voice: str | dict[str, str] = ""
    response_format: str = "wav"
    speed: float = 1.0
    # Accepted as OpenAI accepts it for models that have no instructions (tts-1): not used.
    instructions: str | None = None
    stream_format: str = "audio"


def _voice_id(voice: str | dict[str, str]) -> str:
    if isinstance(voice, dict):
        if not isinstance(voice.get("id"), str):
            raise OpenAIError(400, "voice as an object needs a string 'id'", param="voice")
        return voice["id"].strip()
    return voice.strip()


@router.post("/v1/audio/speech", response_model=None)
async def create_speech(body: SpeechBody, request: Request, up: Annotated[Upstream, Depends(upstream)]) -> Response:
    if body.response_format not in SPEECH_FORMATS:
        raise OpenAIError(
            400,
            f"response_format {body.response_format!r} is not supported; use one of {', '.join(SPEECH_FORMATS)} "
            "(pcm: 16-bit little-endian mono at 24 kHz)",
            param="response_format",
        )
    if body.speed != 1.0:
        raise OpenAIError(400, f"speed {body.speed:g} is not supported; these voices speak at 1.0 only", param="speed")
    if body.stream_format != "audio":
        raise OpenAIError(
            400, f"stream_format {body.stream_format!r} is not supported; use 'audio'", param="stream_format"
        )
    if not body.model:
        raise OpenAIError(400, "'model' is required, e.g. 'flite', 'espeak-ng' or 'kokoro'", param="model")
    voice = _voice_id(body.voice)
    pcm = body.response_format == "pcm"
    call = up.speech.Synthesize(
        speech_pb2.SynthesizeRequest(
            meta=request_meta(request),
            model=common_pb2.ModelRef(name=body.model),
            text=body.input,
            voice=voice,
            sample_rate_hz=PCM_RATE_HZ if pcm else 0,
            encoding=speech_pb2.AUDIO_ENCODING_PCM16 if pcm else speech_pb2.AUDIO_ENCODING_WAV,
        ),
        metadata=call_metadata(request),
        timeout=call_timeout(request),
    )
    # The first chunk before the response starts: a refusal (unknown voice, empty text) is still an HTTP status.
    try:
        first = await _next(call)
    except grpc.aio.AioRpcError as err:
        info = error_info(err)
        if err.code() == grpc.StatusCode.NOT_FOUND and info is not None and info.reason == "VOICE_NOT_FOUND":
            upstream_error(err)  # answered from ListVoices' reply, not this error's
            raise await _unknown_voice(request, up, body.model, voice) from err
        raise
    except BaseException:
        call.cancel()
        raise
    if first is None:
        raise OpenAIError(502, "the speech service ended the stream without audio", code="upstream_error")
    headers = {"x-aimass-sample-rate": str(first.audio.sample_rate_hz)} if first.HasField("audio") else {}
    media_type = "audio/pcm" if pcm else "audio/wav"
    return StreamingResponse(_audio(call, first), media_type=media_type, headers=headers)


async def _next(call: Any) -> speech_pb2.SynthesizeResponse | None:
    """The stream's next message; None at its end."""
    reply = await call.read()
    if reply is grpc.aio.EOF:
        return None
    assert isinstance(reply, speech_pb2.SynthesizeResponse)
    return reply


async def _audio(call: Any, first: speech_pb2.SynthesizeResponse) -> AsyncIterator[bytes]:
    """The audio bytes as they arrive. An error after the first bytes cannot change the status any more: it ends
    the response without its last chunk, so the client sees a broken transfer, not a short file. A client that
    disconnects cancels this generator, and with it the gRPC call."""
    try:
        reply: speech_pb2.SynthesizeResponse | None = first
        while reply is not None:
            if reply.HasField("audio"):
                yield reply.audio.data
            reply = await _next(call)
    except grpc.aio.AioRpcError as err:
        upstream_error(err)
        log.warning("speech stream failed after it started: %s %s", err.code().name, err.details())
        raise
    finally:
        call.cancel()  # no-op once the call has ended


async def _unknown_voice(request: Request, up: Upstream, model: str, voice: str) -> OpenAIError:
    """400 naming some voices the model has (OpenAI answers a bad voice with 400, param voice); 404 when the
    model itself has no voices (the service answers both as VOICE_NOT_FOUND; ListVoices tells them apart)."""
    try:
        listed: speech_pb2.ListVoicesResponse = await up.speech.ListVoices(
            speech_pb2.ListVoicesRequest(model=common_pb2.ModelRef(name=model)),
            metadata=call_metadata(request),
            timeout=call_timeout(request),
        )
        names = [v.voice_id for v in listed.voices]
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            return from_rpc_error(err)  # "model 'tts-1' has no voices; available: flite, ..."
        names = []
    some = ", ".join(names[:VOICES_LISTED]) + (
        f" (and {len(names) - VOICES_LISTED} more)" if len(names) > VOICES_LISTED else ""
    )
    return OpenAIError(
        400,
        f"voice {voice!r} is not a voice of model {model!r}; "
        + (f"its voices: {some}" if names else "ask SpeechService.ListVoices for its voices")
        + "; leave voice out for the model's default",
        param="voice",
        code="voice_not_found",
    )
