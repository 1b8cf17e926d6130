"""aimass.v1.SpeechService: validate, hand the work to the engines, shape the replies.

Whisper runs on one worker thread (CTranslate2 uses its own thread pool inside a call, so a second call at once
would only compete for the same cores), fed one recording or stream segment at a time by the runtime's batcher, so
its queue is bounded and ordered by ``meta.priority`` when contended; synthesisers run as subprocesses awaited on
the event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc

from aimass.runtime.batcher import DynamicBatcher
from aimass.runtime.config import SpeechConfig
from aimass.runtime.errors import DeadlineExceeded, InvalidArgument, NotFound, ResourceExhausted
from aimass.runtime.models import serving_model
from aimass.runtime.scope import QueueTerms, current_scope, priority_rank
from aimass.v1 import common_pb2, speech_pb2, speech_pb2_grpc
from services.speech.asr import WHISPER_MODEL, AsrEngine, Transcript
from services.speech.audio import DecodedAudio, StreamDecoder, check_rate, decode_audio, streaming_wav_header
from services.speech.streaming import Segmenter
from services.speech.tts import TtsEngine

Context = grpc.aio.ServicerContext[Any, Any]
PCM16 = speech_pb2.AUDIO_ENCODING_PCM16
WAV = speech_pb2.AUDIO_ENCODING_WAV
# Recordings and stream segments waiting for Whisper; beyond this, RESOURCE_EXHAUSTED.
ASR_QUEUE_LIMIT = 1024


@dataclass(frozen=True, slots=True)
class AsrJob:
    audio: Any
    language: str | None
    beam_size: int
    cancel: threading.Event
    deadline: float | None  # time.monotonic(), checked by Whisper between segments


class SpeechServicer(speech_pb2_grpc.SpeechServiceServicer):
    def __init__(self, asr: AsrEngine, tts: TtsEngine, config: SpeechConfig) -> None:
        self.asr = asr
        self.tts = tts
        self.config = config
        self.asr_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speech-asr")
        self.decode_pool = ThreadPoolExecutor(max_workers=config.decode_threads, thread_name_prefix="speech-decode")
        self._decodes = 0  # recordings decoding or waiting for a decode thread
        # One job per call, no waiting for company: the batcher is here for its priority and fair-share queue, its
        # bound and deadlines.
        self.asr_batcher: DynamicBatcher[AsrJob, Transcript] = DynamicBatcher(
            self._run_asr,
            name="asr",
            max_batch_size=1,
            max_queue_delay_s=0,
            max_queue_size=ASR_QUEUE_LIMIT,
            executor=self.asr_pool,
        )
        self._started = False

    async def start(self) -> None:
        """Start the ASR queue. Idempotent; the first transcription starts it when the app did not."""
        if not self._started:
            self._started = True
            await self.asr_batcher.start()

    async def close(self) -> None:
        self._started = True  # a closed batcher cannot start again; submit() answers UNAVAILABLE instead
        await self.asr_batcher.close(drain=True)
        self.asr_pool.shutdown(wait=True)
        self.decode_pool.shutdown(wait=True)

    def _run_asr(self, jobs: Sequence[AsrJob]) -> list[Transcript | Exception]:
        results: list[Transcript | Exception] = []
        for job in jobs:
            try:
                results.append(
                    self.asr.transcribe(
                        job.audio,
                        language=job.language,
                        beam_size=job.beam_size,
                        cancel=job.cancel,
                        deadline=job.deadline,
                    )
                )
            except Exception as exc:  # fails this job only
                results.append(exc)
        return results

    # -- helpers ------------------------------------------------------------------------------------------------

    def _check_asr(self, model: common_pb2.ModelRef, method: str) -> common_pb2.ModelRef:
        return serving_model(model, WHISPER_MODEL, f"SpeechService.{method}", loaded=self.asr.loaded, what="Whisper")

    @staticmethod
    def _check_language(language: str) -> str | None:
        language = language.strip().lower()
        if language and not (len(language) == 2 and language.isalpha()):
            raise InvalidArgument(f"language {language!r} is not an ISO 639-1 code such as 'en'", reason="BAD_LANGUAGE")
        return language or None

    async def _transcribe(self, audio: Any, *, language: str | None, beam_size: int, terms: QueueTerms) -> Transcript:
        """Whisper on the worker thread, after the queued jobs of higher or equal priority. A caller cancelled
        while queued never runs; one cancelled while running stops the thread at the next segment. The call's
        deadline bounds both the wait in the queue and the transcription (the loop's clock is time.monotonic)."""
        await self.start()
        cancel = threading.Event()
        job = AsrJob(audio, language, beam_size, cancel, terms["deadline"])
        try:
            return await self.asr_batcher.submit(job, **terms)
        except asyncio.CancelledError:
            cancel.set()
            raise

    # -- recognition --------------------------------------------------------------------------------------------

    async def Transcribe(
        self, request: speech_pb2.TranscribeRequest, context: Context
    ) -> speech_pb2.TranscribeResponse:
        model = self._check_asr(request.model, "Transcribe")
        language = self._check_language(request.language)
        terms = current_scope().queue_terms(request.meta.priority)
        decoded = await self._decode(request.audio, terms["deadline"])
        result = await self._transcribe(
            decoded.samples,
            language=language,
            beam_size=self.config.asr_beam_size,
            terms=terms,
        )
        return speech_pb2.TranscribeResponse(
            model=model,
            text=result.text,
            language=result.language,
            language_probability=result.language_probability,
            segments=[
                speech_pb2.TranscriptSegment(start_seconds=s.start, end_seconds=s.end, text=s.text)
                for s in result.segments
            ],
            duration_seconds=decoded.duration_s,
        )

    async def _decode(self, audio: bytes, deadline: float | None) -> DecodedAudio:
        """Decoding and resampling minutes of audio takes CPU seconds: never on the event loop, and at most
        max_decode_queue recordings at once. The limits are checked from the header first (decode_audio), so a
        refused file costs no decoding; a call whose deadline passed while it waited is not decoded."""
        limit = self.config.max_decode_queue
        if self._decodes >= limit:
            raise ResourceExhausted(
                f"{self._decodes} recordings are being decoded or waiting to be; the limit is {limit}; retry shortly",
                reason="DECODE_QUEUE_FULL",
            )

        cancelled = threading.Event()

        def decode() -> DecodedAudio:
            if cancelled.is_set():  # the caller left while this waited for a thread
                raise asyncio.CancelledError
            # The loop's clock is time.monotonic.
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("the call's deadline passed before its audio was decoded")
            return decode_audio(audio, max_bytes=self.config.max_audio_bytes, max_seconds=self.config.max_audio_seconds)

        self._decodes += 1
        try:
            decoded = await asyncio.get_running_loop().run_in_executor(self.decode_pool, decode)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        finally:
            self._decodes -= 1
        if deadline is not None and asyncio.get_running_loop().time() >= deadline:
            raise DeadlineExceeded("the call's deadline passed while its audio was decoded")
        return decoded

    def _stream_decoder(self, config: speech_pb2.StreamTranscribeConfig) -> StreamDecoder:
        if config.encoding == PCM16:
            if config.channels < 0 or config.channels > 8:
                raise InvalidArgument(f"config.channels is {config.channels}; accepted are 0..8", reason="BAD_CONFIG")
            return StreamDecoder(wav=False, sample_rate=config.sample_rate_hz, channels=config.channels or 1)
        if config.encoding == WAV:
            return StreamDecoder(wav=True)
        name = speech_pb2.AudioEncoding.Name(config.encoding) if config.encoding in (0, 3, 4) else str(config.encoding)
        raise InvalidArgument(
            f"config.encoding {name} cannot be streamed; use AUDIO_ENCODING_PCM16 or AUDIO_ENCODING_WAV",
            reason="UNSUPPORTED_CODEC",
        )

    async def StreamTranscribe(
        self, request_iterator: AsyncIterator[speech_pb2.StreamTranscribeRequest], context: Context
    ) -> AsyncIterator[speech_pb2.StreamTranscribeResponse]:
        cfg = self.config
        messages = aiter(request_iterator)
        try:
            async with asyncio.timeout(cfg.stream_first_message_s):
                first = await anext(messages, None)
        except TimeoutError:
            raise DeadlineExceeded(
                f"no StreamTranscribe config within {cfg.stream_first_message_s:g} s; send the config first",
                reason="STREAM_IDLE",
            ) from None
        if first is None or first.WhichOneof("payload") != "config":
            raise InvalidArgument("the first StreamTranscribe message must carry config", reason="CONFIG_FIRST")
        model = self._check_asr(first.model, "StreamTranscribe")
        terms = current_scope().queue_terms(first.meta.priority)
        config = first.config
        language = self._check_language(config.language)
        decoder = self._stream_decoder(config)
        segmenter = Segmenter(
            min_segment_s=cfg.stream_min_segment_s,
            min_silence_s=cfg.stream_min_silence_s,
            max_segment_s=cfg.stream_max_segment_s,
        )
        state = _StreamState()

        async def read() -> None:
            """Receives audio while transcription runs, so a fast client never waits on the model; stops reading
            while max_pending_audio_s waits for the model (backpressure), and ends a stream that sends no audio
            for stream_idle_s or more than max_stream_chunks messages."""
            loop = asyncio.get_running_loop()
            last_audio = loop.time()
            chunks = 0
            try:
                while True:
                    while segmenter.pending_s > cfg.max_pending_audio_s and not state.closed:
                        state.room.clear()
                        await state.room.wait()
                    try:
                        async with asyncio.timeout_at(last_audio + cfg.stream_idle_s):
                            message = await anext(messages, None)
                    except TimeoutError:
                        raise DeadlineExceeded(
                            f"no audio for {cfg.stream_idle_s:g} s; a stream must send audio at least that often "
                            "(or close its side when done)",
                            reason="STREAM_IDLE",
                        ) from None
                    if message is None:
                        break
                    chunks += 1
                    if chunks > cfg.max_stream_chunks:
                        raise InvalidArgument(
                            f"stream sent more than {cfg.max_stream_chunks} messages; send larger chunks",
                            reason="TOO_MANY_CHUNKS",
                        )
                    if message.audio:
                        last_audio = loop.time()
                    if message.WhichOneof("payload") != "audio":
                        raise InvalidArgument("only the first message may carry config", reason="CONFIG_FIRST")
                    if len(message.audio) > cfg.max_stream_chunk_bytes:
                        raise InvalidArgument(
                            f"audio chunk is {len(message.audio)} bytes; the limit is {cfg.max_stream_chunk_bytes}",
                            reason="CHUNK_TOO_LARGE",
                        )
                    segmenter.add(decoder.feed(message.audio))
                    if segmenter.offset_s + segmenter.pending_s > cfg.max_stream_seconds:
                        raise InvalidArgument(
                            f"stream exceeded {cfg.max_stream_seconds:g} s of audio", reason="AUDIO_TOO_LONG"
                        )
                    state.wake.set()
                segmenter.add(decoder.feed(b"", last=True))
            except BaseException as err:  # handed to the writer, which raises it to the client
                state.error = err
            finally:
                state.closed = True
                state.wake.set()

        reader = asyncio.create_task(read())
        finals: list[str] = []
        probability = 1.0 if language else 0.0
        partial_at = 0.0  # pending seconds when the last partial was sent
        try:
            while True:
                await state.wake.wait()
                state.wake.clear()
                if state.error is not None:
                    raise state.error
                closed = state.closed
                while (cut := segmenter.next_cut(closed=closed)) is not None:
                    start = segmenter.offset_s
                    piece = segmenter.take(cut)
                    state.room.set()
                    partial_at = 0.0
                    if segmenter.is_silence(piece):
                        continue
                    beam_size = 1 if config.low_latency else cfg.asr_beam_size
                    result = await self._transcribe(piece, language=language, beam_size=beam_size, terms=terms)
                    if language is None and result.language:
                        # Detected once, on the first speech, then held so every segment is in one language.
                        language, probability = result.language, result.language_probability
                    if result.text:
                        finals.append(result.text)
                        yield speech_pb2.StreamTranscribeResponse(
                            final_segment=speech_pb2.TranscriptSegment(
                                start_seconds=start, end_seconds=segmenter.offset_s, text=result.text
                            )
                        )
                if closed:
                    if state.error is not None:
                        raise state.error
                    break
                pending = segmenter.pending_s
                if config.interim_results and pending - partial_at >= cfg.stream_partial_interval_s:
                    partial_at = pending
                    start = segmenter.offset_s
                    result = await self._transcribe(
                        segmenter.buffer.copy(), language=language, beam_size=1, terms=terms
                    )
                    if result.text:
                        yield speech_pb2.StreamTranscribeResponse(
                            partial=speech_pb2.TranscriptSegment(
                                start_seconds=start, end_seconds=start + pending, text=result.text
                            )
                        )
            yield speech_pb2.StreamTranscribeResponse(
                end=speech_pb2.StreamTranscribeEnd(
                    model=model,
                    text=" ".join(finals),
                    language=language or "",
                    language_probability=probability,
                    duration_seconds=segmenter.offset_s,
                )
            )
        finally:
            reader.cancel()

    # -- synthesis ----------------------------------------------------------------------------------------------

    async def Synthesize(
        self, request: speech_pb2.SynthesizeRequest, context: Context
    ) -> AsyncIterator[speech_pb2.SynthesizeResponse]:
        priority_rank(request.meta.priority)  # synthesis is not queued, so it has no effect here, but it must be valid
        text = request.text
        if not any(ch.isalnum() for ch in text):
            limit = self.config.max_text_chars
            raise InvalidArgument(f"text has nothing to speak; send 1..{limit} characters", reason="EMPTY_TEXT")
        if len(text) > self.config.max_text_chars:
            raise InvalidArgument(
                f"text is {len(text)} characters; the limit is {self.config.max_text_chars}",
                reason="TEXT_TOO_LONG",
                metadata={"limit": str(self.config.max_text_chars)},
            )
        encoding = request.encoding or WAV
        if encoding not in (WAV, PCM16):
            raise InvalidArgument(
                "encoding must be AUDIO_ENCODING_WAV or AUDIO_ENCODING_PCM16 (or unspecified for WAV)",
                reason="UNSUPPORTED_CODEC",
            )
        voice = self.tts.find_voice(request.model.name, request.voice)
        if voice is None:
            raise NotFound(
                f"voice {request.voice or '(default)'!r} of model {request.model.name or '(any)'!r} is not available; "
                f"models: {', '.join(self.tts.models) or 'none'}; ListVoices names the voices",
                reason="VOICE_NOT_FOUND",
            )
        rate = request.sample_rate_hz or voice.native_rate
        check_rate(rate, "sample_rate_hz")
        chunk_bytes = 2 * max(1, rate * self.config.tts_chunk_ms // 1000)
        header = streaming_wav_header(rate) if encoding == WAV else b""
        samples = 0
        async for pcm in self.tts.stream(voice, text, rate):
            samples += len(pcm) // 2
            for offset in range(0, len(pcm), chunk_bytes):
                yield speech_pb2.SynthesizeResponse(
                    audio=speech_pb2.SynthesizeAudio(
                        data=header + pcm[offset : offset + chunk_bytes],
                        sample_rate_hz=rate,
                        encoding=encoding,
                        channels=1,
                    )
                )
                header = b""
        yield speech_pb2.SynthesizeResponse(
            end=speech_pb2.SynthesizeEnd(
                model=common_pb2.ModelRef(name=voice.model, version=request.model.version or "1"),
                duration_seconds=samples / rate,
                sample_count=samples,
            )
        )

    async def ListVoices(
        self, request: speech_pb2.ListVoicesRequest, context: Context
    ) -> speech_pb2.ListVoicesResponse:
        priority_rank(request.meta.priority)
        if request.model.name and request.model.name not in self.tts.models:
            raise NotFound(
                f"model {request.model.name!r} has no voices; available: {', '.join(self.tts.models)}",
                reason="MODEL_NOT_FOUND",
            )
        language = request.language.strip().lower()
        return speech_pb2.ListVoicesResponse(
            voices=[
                speech_pb2.Voice(
                    voice_id=v.voice_id,
                    display_name=v.display_name,
                    languages=list(v.languages),
                    native_sample_rate_hz=v.native_rate,
                    model=common_pb2.ModelRef(name=v.model, version="1"),
                )
                for (model, _), v in self.tts.voices.items()
                if (not request.model.name or model == request.model.name)
                and (not language or any(lang == language or lang.startswith(language + "-") for lang in v.languages))
            ]
        )


class _StreamState:
    def __init__(self) -> None:
        self.wake = asyncio.Event()
        # Set when transcription has taken pending audio, so a reader held back by backpressure reads again.
        self.room = asyncio.Event()
        self.closed = False
        self.error: BaseException | None = None
