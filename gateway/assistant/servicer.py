"""AssistantService: a voice assistant in one call (see protos/aimass/v1/assistant.proto for what a caller sees).

One Converse call is one ``Conversation``. Its reader takes the caller's messages as they come; microphone audio
goes through a ``TurnDetector`` (gateway/assistant/turns.py). A user turn is a task that runs three kinds of stage,
each an ordinary call of the caller's through the gateway (gateway/composition.py):

    audio ──► SpeechService.StreamTranscribe ──(end of turn: half-close; the final text)──► LlmService.Chat
    text deltas ──► sentences ──► SpeechService.Synthesize ──► audio
    caller ◄── partial transcripts, the user's turn, reply deltas, reply audio (sentence by sentence), reply end

- Recognition streams while the user speaks (from the onset, with the detector's pre-roll), so at the end of the
  turn only the last stretch of audio is left to transcribe.
- The reply is spoken while it is generated: each sentence goes to synthesis as soon as it is complete
  (gateway/assistant/sentences.py), and its audio is sent as it is produced, so the first sound comes after the
  first sentence, not after the whole reply. Sentences are synthesised one after another, in order.
- Barge-in: an onset (or a typed turn) while a reply is being generated or spoken cancels that turn's task. The
  Chat stage's cancellation reaches the replica, which aborts the sequence in the engine; synthesis stops; the
  caller gets ReplyEnd(interrupted) and the session keeps the reply as far as it was generated. Speech that starts
  while the previous turn is still being transcribed does not lose it: the new turn's text starts with it.
- Sessions (gateway/assistant/sessions.py) hold the conversation: each turn's prompt is the session's system
  prompt, its messages and the new user turn; the user turn and the reply are stored when the reply ends.

The conversation's events reach the caller through one queue, in the order they happened; an error in any stage
ends the call with that stage's status, naming the stage.
"""

from __future__ import annotations

import asyncio
import enum
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import grpc

from aimass.runtime.config import AssistantConfig
from aimass.runtime.errors import DeadlineExceeded, InvalidArgument
from aimass.runtime.scope import current_scope, loop_time
from aimass.store.records import SessionRecord
from aimass.v1 import assistant_pb2, assistant_pb2_grpc, common_pb2, llm_pb2, speech_pb2
from gateway.assistant.sentences import SentenceSplitter
from gateway.assistant.sessions import Sessions
from gateway.assistant.turns import DEFAULT_SILENCE_MS, Event, TurnDetector
from gateway.composition import StageFailed, Stages

Context = grpc.aio.ServicerContext[Any, Any]

TRANSCRIBE: Final = "/aimass.v1.SpeechService/StreamTranscribe"
CHAT: Final = "/aimass.v1.LlmService/Chat"
SYNTHESIZE: Final = "/aimass.v1.SpeechService/Synthesize"
DEFAULT_MAX_TOKENS: Final = 256
MIN_SILENCE_MS: Final = 200
MAX_SILENCE_MS: Final = 5000
# Chunks of microphone audio waiting for recognition; past it the reader waits (flow control slows the caller).
MAX_PENDING_CHUNKS: Final = 256
ROLES: Final = {"user": llm_pb2.CHAT_ROLE_USER, "assistant": llm_pb2.CHAT_ROLE_ASSISTANT}
OUTPUT_ENCODINGS: Final = (
    speech_pb2.AUDIO_ENCODING_UNSPECIFIED,
    speech_pb2.AUDIO_ENCODING_PCM16,
    speech_pb2.AUDIO_ENCODING_WAV,
)

Outgoing = assistant_pb2.ConverseResponse | BaseException | None


def summary(record: SessionRecord) -> assistant_pb2.SessionSummary:
    return assistant_pb2.SessionSummary(
        session_id=record.session_id,
        messages=len(record.messages),
        created_unix_ms=record.created_unix_ms,
        updated_unix_ms=record.updated_unix_ms,
        expires_unix_ms=record.expires_unix_ms,
    )


def check_config(config: assistant_pb2.ConverseConfig, limits: AssistantConfig) -> None:
    """INVALID_ARGUMENT, naming the field, for a config the conversation could not run with."""
    if len(config.system_prompt) > limits.max_text_chars:
        raise InvalidArgument(
            f"config.system_prompt is {len(config.system_prompt)} characters; the limit is {limits.max_text_chars}",
            reason="TEXT_TOO_LONG",
            metadata={"field": "config.system_prompt", "limit": str(limits.max_text_chars)},
        )
    if config.input_encoding not in (speech_pb2.AUDIO_ENCODING_UNSPECIFIED, speech_pb2.AUDIO_ENCODING_PCM16):
        raise InvalidArgument(
            f"config.input_encoding {speech_pb2.AudioEncoding.Name(config.input_encoding)} is not taken: send "
            "microphone audio as PCM16 (raw 16-bit samples, mono) with config.input_sample_rate_hz",
            reason="UNSUPPORTED_ENCODING",
            metadata={"field": "config.input_encoding"},
        )
    if config.input_encoding == speech_pb2.AUDIO_ENCODING_PCM16 and not 8000 <= config.input_sample_rate_hz <= 48000:
        raise InvalidArgument(
            f"config.input_sample_rate_hz is {config.input_sample_rate_hz}; PCM16 audio needs its rate, 8000..48000",
            reason="INVALID_SAMPLE_RATE",
            metadata={"field": "config.input_sample_rate_hz"},
        )
    if config.output_encoding not in OUTPUT_ENCODINGS:
        raise InvalidArgument(
            f"config.output_encoding {speech_pb2.AudioEncoding.Name(config.output_encoding)} is not produced: "
            "choose PCM16 or WAV",
            reason="UNSUPPORTED_ENCODING",
            metadata={"field": "config.output_encoding"},
        )
    silence = config.end_of_turn_silence_ms
    if silence and not MIN_SILENCE_MS <= silence <= MAX_SILENCE_MS:
        raise InvalidArgument(
            f"config.end_of_turn_silence_ms is {silence}; use {MIN_SILENCE_MS}..{MAX_SILENCE_MS} (0: "
            f"{DEFAULT_SILENCE_MS})",
            reason="OUT_OF_RANGE",
            metadata={"field": "config.end_of_turn_silence_ms"},
        )


class Phase(enum.Enum):
    TRANSCRIBING = "transcribing"
    REPLYING = "replying"


@dataclass
class Listening:
    """The recognition of one spoken turn: audio chunks queued for the StreamTranscribe stage, its final text."""

    feed: asyncio.Queue[bytes | None] = field(default_factory=lambda: asyncio.Queue(MAX_PENDING_CHUNKS))
    audio_bytes: int = 0
    finished: bool = False
    task: asyncio.Task[str] | None = None

    async def add(self, chunk: bytes) -> None:
        self.audio_bytes += len(chunk)
        await self.feed.put(chunk)

    async def finish(self) -> None:
        """The turn is over: half-closes the recognition stage (its final text follows)."""
        if not self.finished:
            self.finished = True
            await self.feed.put(None)


@dataclass
class Turn:
    number: int
    task: asyncio.Task[None] | None = None
    phase: Phase = Phase.TRANSCRIBING
    listening: Listening | None = None
    # Loop time at which the user's turn ended (the pause's start, the EndOfTurn, the typed text).
    ended_at: float | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class Conversation:
    """One Converse call (see the module docstring)."""

    def __init__(
        self,
        stages: Stages,
        sessions: Sessions,
        limits: AssistantConfig,
        context: Context,
        config: assistant_pb2.ConverseConfig,
        meta: common_pb2.RequestMeta,
        session: SessionRecord,
    ) -> None:
        self.stages = stages
        self.sessions = sessions
        self.limits = limits
        self.context = context
        self.config = config
        self.meta = meta
        self.session = session
        self.outbox: asyncio.Queue[Outgoing] = asyncio.Queue()
        self.detector = (
            TurnDetector(config.input_sample_rate_hz, silence_ms=config.end_of_turn_silence_ms or DEFAULT_SILENCE_MS)
            if config.input_encoding == speech_pb2.AUDIO_ENCODING_PCM16
            else None
        )
        self.turns = 0
        self.current: Turn | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- the call ---------------------------------------------------------------------------------------------------

    async def run(
        self, requests: AsyncIterator[assistant_pb2.ConverseRequest]
    ) -> AsyncIterator[assistant_pb2.ConverseResponse]:
        reader = self._spawn(self._read(requests))
        try:
            while True:
                item = await self.outbox.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
            await reader
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, work: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            # The first failure ends the call (run() raises it); the rest are cancelled there.
            self.outbox.put_nowait(error)

    def _send(self, **event: Any) -> None:
        self.outbox.put_nowait(assistant_pb2.ConverseResponse(**event))

    # -- the caller's messages --------------------------------------------------------------------------------------

    async def _read(self, requests: AsyncIterator[assistant_pb2.ConverseRequest]) -> None:
        async for request in requests:
            kind = request.WhichOneof("payload")
            if kind == "audio":
                await self._audio(request.audio)
            elif kind == "text":
                await self._typed(request.text)
            elif kind == "end_of_turn":
                await self._end_of_turn()
            elif kind == "config":
                raise InvalidArgument(
                    "config may only be sent in the first message of a Converse call",
                    reason="CONFIG_REPEATED",
                    metadata={"field": "config"},
                )
            else:
                raise InvalidArgument(
                    "a Converse message carries nothing: send audio, text or end_of_turn",
                    reason="EMPTY_MESSAGE",
                )
        # The caller is done talking: the turn being spoken ends here, and the call once its reply is over.
        await self._end_of_turn()
        if self.current is not None and self.current.task is not None:
            await asyncio.wait([self.current.task])
        self.outbox.put_nowait(None)

    async def _audio(self, chunk: bytes) -> None:
        if self.detector is None:
            raise InvalidArgument(
                "audio was sent but config.input_encoding is not PCM16: set it and config.input_sample_rate_hz",
                reason="NO_AUDIO_CONFIG",
                metadata={"field": "config.input_encoding"},
            )
        if len(chunk) > self.limits.max_audio_chunk_bytes:
            raise InvalidArgument(
                f"an audio chunk is {len(chunk)} bytes; the limit is {self.limits.max_audio_chunk_bytes}",
                reason="CHUNK_TOO_LARGE",
                metadata={"field": "audio", "limit": str(self.limits.max_audio_chunk_bytes)},
            )
        if len(chunk) % 2:
            raise InvalidArgument(
                f"an audio chunk is {len(chunk)} bytes, not a whole number of 16-bit samples",
                reason="PARTIAL_SAMPLE",
                metadata={"field": "audio"},
            )
        listening = self._listening()
        handled = 0  # bytes of the chunk already given to a turn's recording (or left before its onset)
        for detected in self.detector.feed(chunk):
            if detected.event is Event.ONSET:
                # The pre-roll (the onset's frames and a little before) opens the turn's recording; the rest of
                # the chunk follows.
                listening = self._start_spoken_turn(self.detector.pre_roll())
            elif listening is not None:
                await listening.add(chunk[handled : detected.offset])
                await self._end_spoken_turn(listening)
                listening = None
            handled = detected.offset
        if listening is not None and handled < len(chunk):
            await listening.add(chunk[handled:])

    async def _typed(self, text: str) -> None:
        text = text.strip()
        if not text:
            raise InvalidArgument("a text turn is empty", reason="EMPTY_TEXT", metadata={"field": "text"})
        if len(text) > self.limits.max_text_chars:
            raise InvalidArgument(
                f"a text turn is {len(text)} characters; the limit is {self.limits.max_text_chars}",
                reason="TEXT_TOO_LONG",
                metadata={"field": "text", "limit": str(self.limits.max_text_chars)},
            )
        # Words being spoken as the text arrives end their turn first; the typed text follows them.
        listening = self._listening()
        if listening is not None:
            await listening.finish()
        if self.detector is not None:
            self.detector.reset()
        self._start_turn(None, text)

    async def _end_of_turn(self) -> None:
        listening = self._listening()
        if listening is not None:
            await self._end_spoken_turn(listening)
        if self.detector is not None:
            self.detector.reset()

    def _listening(self) -> Listening | None:
        """The recognition of the turn being spoken now, if any."""
        turn = self.current
        if turn is None or turn.listening is None or turn.listening.finished:
            return None
        return turn.listening

    async def _end_spoken_turn(self, listening: Listening) -> None:
        if self.current is not None and self.current.listening is listening:
            self.current.ended_at = loop_time()
            self.current.ended.set()
        await listening.finish()

    # -- turns ------------------------------------------------------------------------------------------------------

    def _start_spoken_turn(self, pre_roll: bytes) -> Listening:
        listening = Listening()
        listening.audio_bytes = len(pre_roll)
        listening.feed.put_nowait(pre_roll)
        self._start_turn(listening, None)
        return listening

    def _start_turn(self, listening: Listening | None, text: str | None) -> None:
        """A new user turn; one in progress is interrupted (its reply), or carried into this one (its words, when
        it is still being transcribed)."""
        previous = self.current
        carried: asyncio.Task[str] | None = None
        interrupted: asyncio.Task[None] | None = None
        if previous is not None and previous.task is not None and not previous.task.done():
            if previous.phase is Phase.TRANSCRIBING and previous.listening is not None:
                carried = previous.listening.task
            previous.task.cancel()
            interrupted = previous.task
        self.turns += 1
        turn = Turn(self.turns, listening=listening)
        if listening is not None:
            listening.task = self._spawn(self._transcribe(turn, listening))
        else:
            turn.ended_at = loop_time()
            turn.ended.set()
        self.current = turn
        turn.task = self._spawn(self._run_turn(turn, text, carried, interrupted))

    async def _transcribe(self, turn: Turn, listening: Listening) -> str:
        config = self.config
        meta = self.meta

        async def requests() -> AsyncIterator[speech_pb2.StreamTranscribeRequest]:
            yield speech_pb2.StreamTranscribeRequest(
                meta=meta,
                model=config.asr_model,
                config=speech_pb2.StreamTranscribeConfig(
                    encoding=speech_pb2.AUDIO_ENCODING_PCM16,
                    sample_rate_hz=config.input_sample_rate_hz,
                    language=config.language,
                    interim_results=config.interim_results,
                    # A listener waits for the final text: greedy decoding, as the partials have.
                    low_latency=True,
                ),
            )
            while (chunk := await listening.feed.get()) is not None:
                if chunk:
                    yield speech_pb2.StreamTranscribeRequest(audio=chunk)

        segments: list[str] = []
        try:
            async for response in self.stages.bidi(
                self.context, TRANSCRIBE, requests(), speech_pb2.StreamTranscribeResponse
            ):
                event = response.WhichOneof("event")
                if event == "partial" and config.interim_results and self.current is turn:
                    self._send(partial_transcript=response.partial)
                elif event == "final_segment":
                    segments.append(response.final_segment.text.strip())
                elif event == "end":
                    return response.end.text.strip()
        except StageFailed as failed:
            raise failed.as_error("transcribe", TRANSCRIBE) from None
        return " ".join(s for s in segments if s)

    async def _run_turn(
        self,
        turn: Turn,
        typed: str | None,
        carried: asyncio.Task[str] | None,
        interrupted: asyncio.Task[None] | None,
    ) -> None:
        parts: list[str] = []
        if carried is not None:
            # Shielded: this turn being interrupted in turn must not cancel the words it carries.
            parts.append(await asyncio.shield(carried))
        audio_seconds = 0.0
        if turn.listening is not None and turn.listening.task is not None:
            parts.append(await asyncio.shield(turn.listening.task))
            audio_seconds = turn.listening.audio_bytes / 2 / max(1, self.config.input_sample_rate_hz)
        if typed is not None:
            parts.append(typed)
        text = " ".join(p for p in parts if p)
        if not text:
            return  # a noise that sounded like speech, with no words in it
        await turn.ended.wait()
        ended_at = turn.ended_at if turn.ended_at is not None else loop_time()
        timings = assistant_pb2.TurnTimings(transcript_ms=(loop_time() - ended_at) * 1000 if turn.listening else 0)
        if interrupted is not None:
            # The interrupted reply is in the session (as far as it went) before this turn's prompt is made from it.
            await asyncio.wait([interrupted])
        turn.phase = Phase.REPLYING
        self._send(user_turn=assistant_pb2.UserTurn(turn=turn.number, text=text, audio_seconds=audio_seconds))
        await self._reply(turn, text, ended_at, timings)

    # -- the reply --------------------------------------------------------------------------------------------------

    def _prompt(self, user: str) -> list[llm_pb2.ChatMessage]:
        system = self.session.system_prompt or self.limits.default_system_prompt
        messages = [llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_SYSTEM, content=system)] if system else []
        messages += [llm_pb2.ChatMessage(role=ROLES[role], content=content) for role, content in self.session.messages]
        messages.append(llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_USER, content=user))
        return messages

    async def _reply(self, turn: Turn, user: str, ended_at: float, timings: assistant_pb2.TurnTimings) -> None:
        sampling = llm_pb2.SamplingParams()
        sampling.CopyFrom(self.config.sampling)
        if not sampling.max_tokens:
            sampling.max_tokens = DEFAULT_MAX_TOKENS
        request = llm_pb2.ChatRequest(
            meta=self.meta, model=self.config.llm_model, messages=self._prompt(user), sampling=sampling
        )

        def since() -> float:
            return (loop_time() - ended_at) * 1000

        sentences: asyncio.Queue[str | None] = asyncio.Queue()
        speaker = None if self.config.text_only else self._spawn(self._speak(turn, sentences, timings, since))
        splitter = SentenceSplitter()
        generated: list[str] = []
        end = assistant_pb2.ReplyEnd(turn=turn.number)
        try:
            try:
                async for response in self.stages.stream(self.context, CHAT, request, llm_pb2.ChatResponse):
                    if response.delta:
                        if not generated:
                            timings.first_token_ms = since()
                        generated.append(response.delta)
                        self._send(reply_delta=assistant_pb2.ReplyDelta(turn=turn.number, delta=response.delta))
                        for sentence in splitter.feed(response.delta):
                            if not timings.first_sentence_ms:
                                timings.first_sentence_ms = since()
                            sentences.put_nowait(sentence)
                    if response.finish_reason:
                        end.finish_reason = response.finish_reason
                        end.usage.CopyFrom(response.usage)
            except StageFailed as failed:
                raise failed.as_error("reply", CHAT) from None
            rest = splitter.flush()
            if rest is not None:
                if not timings.first_sentence_ms:
                    timings.first_sentence_ms = since()
                sentences.put_nowait(rest)
            sentences.put_nowait(None)
            if speaker is not None:
                await speaker
        except asyncio.CancelledError:
            # Barge-in (or the call ended): the reply stops here; the session keeps what was generated.
            if speaker is not None:
                speaker.cancel()
            self._ended(end, generated, timings, since(), interrupted=True)
            self._send(reply_end=end)
            await asyncio.shield(self._remember(user, end.text))
            raise
        self._ended(end, generated, timings, since(), interrupted=False)
        await self._remember(user, end.text)
        self._send(reply_end=end)

    @staticmethod
    def _ended(
        end: assistant_pb2.ReplyEnd,
        generated: list[str],
        timings: assistant_pb2.TurnTimings,
        reply_ms: float,
        *,
        interrupted: bool,
    ) -> None:
        """Fills the reply's end: its text as far as it was generated, its timings, whether it was interrupted."""
        end.interrupted = interrupted
        end.text = "".join(generated).strip()
        timings.reply_ms = reply_ms
        end.timings.CopyFrom(timings)

    async def _remember(self, user: str, reply: str) -> None:
        self.session = await self.sessions.add_turn(self.session, user, reply)

    async def _speak(
        self,
        turn: Turn,
        sentences: asyncio.Queue[str | None],
        timings: assistant_pb2.TurnTimings,
        since: Callable[[], float],
    ) -> None:
        number = 0
        while (sentence := await sentences.get()) is not None:
            request = speech_pb2.SynthesizeRequest(
                meta=self.meta,
                model=self.config.tts_model,
                text=sentence,
                voice=self.config.voice,
                sample_rate_hz=self.config.output_sample_rate_hz,
                encoding=self.config.output_encoding or speech_pb2.AUDIO_ENCODING_PCM16,
            )
            first = True
            try:
                async for response in self.stages.stream(
                    self.context, SYNTHESIZE, request, speech_pb2.SynthesizeResponse
                ):
                    if response.WhichOneof("event") != "audio" or not response.audio.data:
                        continue
                    if not timings.first_audio_ms:
                        timings.first_audio_ms = since()
                    self._send(
                        reply_audio=assistant_pb2.ReplyAudio(
                            turn=turn.number,
                            sentence=number,
                            text=sentence if first else "",
                            data=response.audio.data,
                            sample_rate_hz=response.audio.sample_rate_hz,
                            encoding=response.audio.encoding,
                        )
                    )
                    first = False
            except StageFailed as failed:
                raise failed.as_error("speak", SYNTHESIZE) from None
            number += 1


class AssistantServicer(assistant_pb2_grpc.AssistantServiceServicer):
    """The service's four methods, over the gateway's stages and the store's sessions."""

    def __init__(self, stages: Stages, sessions: Sessions, limits: AssistantConfig) -> None:
        self.stages = stages
        self.sessions = sessions
        self.limits = limits

    async def Converse(
        self, request_iterator: AsyncIterator[assistant_pb2.ConverseRequest], context: Context
    ) -> AsyncIterator[assistant_pb2.ConverseResponse]:
        try:
            async with asyncio.timeout(self.limits.config_timeout_s):
                first = await anext(aiter(request_iterator), None)
        except TimeoutError:
            raise DeadlineExceeded(
                f"no config within {self.limits.config_timeout_s:g} s of the call's start: send ConverseConfig first",
                reason="STREAM_IDLE",
            ) from None
        if first is None or first.WhichOneof("payload") != "config":
            raise InvalidArgument(
                "the first Converse message must carry config (ConverseConfig)",
                reason="CONFIG_FIRST",
                metadata={"field": "config"},
            )
        config = first.config
        check_config(config, self.limits)
        session_id = config.session_id or secrets.token_urlsafe(12)
        session, resumed = await self.sessions.open(current_scope().tenant, session_id, config.system_prompt)
        yield assistant_pb2.ConverseResponse(
            started=assistant_pb2.ConverseStarted(
                session_id=session_id, messages=len(session.messages), resumed=resumed
            )
        )
        conversation = Conversation(self.stages, self.sessions, self.limits, context, config, first.meta, session)
        async for response in conversation.run(request_iterator):
            yield response

    async def ListSessions(
        self, request: assistant_pb2.ListSessionsRequest, context: Context
    ) -> assistant_pb2.ListSessionsResponse:
        records = await self.sessions.list(current_scope().tenant)
        return assistant_pb2.ListSessionsResponse(sessions=[summary(r) for r in records])

    async def GetSession(
        self, request: assistant_pb2.GetSessionRequest, context: Context
    ) -> assistant_pb2.GetSessionResponse:
        record = await self.sessions.get(current_scope().tenant, request.session_id)
        return assistant_pb2.GetSessionResponse(
            session=summary(record),
            system_prompt=record.system_prompt,
            messages=[llm_pb2.ChatMessage(role=ROLES[role], content=content) for role, content in record.messages],
        )

    async def DeleteSession(
        self, request: assistant_pb2.DeleteSessionRequest, context: Context
    ) -> assistant_pb2.DeleteSessionResponse:
        await self.sessions.delete(current_scope().tenant, request.session_id)
        return assistant_pb2.DeleteSessionResponse()
