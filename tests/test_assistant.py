"""AssistantService.Converse on a real mesh (front_door_mesh: Whisper, SmolLM2 on vLLM, flite): a question spoken by
espeak-ng in 100 ms chunks is transcribed, answered and spoken, and the spoken answer transcribes back to the same
fact; speech during a reply interrupts it (the engine's running sequence is aborted) and the new turn is answered;
a later call with the same session continues the conversation; sessions are the tenant's own; bad input is refused
with the field named."""

from __future__ import annotations

import asyncio
import io
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
import soundfile  # type: ignore[import-untyped]
import soxr  # type: ignore[import-untyped]

from aimass.client import error_info
from aimass.local_mesh import LocalMesh
from aimass.v1 import assistant_pb2, assistant_pb2_grpc, llm_pb2, speech_pb2, speech_pb2_grpc
from tests.security import key_for
from tests.test_rest_llm import running_requests, wait_for

pytestmark = pytest.mark.slow

RATE = 16000
CHUNK_S = 0.1
QUESTION = "What is the capital of France?"
# Answerable only from the conversation so far.
FOLLOW_UP = "What is the name of that city?"
GREEDY = llm_pb2.SamplingParams(temperature=0.0, max_tokens=64)


def spoken(text: str) -> bytes:
    """``text`` spoken by espeak-ng, as PCM16 mono at RATE, with a second of silence after it (the pause that ends
    the turn). At 140 words a minute: at espeak's default 175 Whisper base hears "the capital and friends"."""
    wav = subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "140", "--stdout", "--", text], capture_output=True, check=True, timeout=30
    ).stdout
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    resampled = soxr.resample(samples, rate, RATE)
    silence = np.zeros(RATE, dtype=np.float32)
    pcm: bytes = (np.concatenate([resampled, silence]) * 32767).astype("<i2").tobytes()
    return pcm


def chunks(pcm: bytes) -> list[bytes]:
    size = int(RATE * CHUNK_S) * 2
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


@dataclass
class Heard:
    """What a Converse call sent back, by kind."""

    events: list[assistant_pb2.ConverseResponse] = field(default_factory=list)

    def of(self, kind: str) -> list[object]:
        return [getattr(e, kind) for e in self.events if e.WhichOneof("event") == kind]

    def ends(self) -> list[assistant_pb2.ReplyEnd]:
        return self.of("reply_end")  # type: ignore[return-value]

    def audio(self, turn: int) -> bytes:
        return b"".join(a.data for a in self.of("reply_audio") if a.turn == turn)  # type: ignore[attr-defined]


class Caller:
    """A Converse call whose requests the test sends as it goes (a microphone's chunks at their pace)."""

    def __init__(self, channel: grpc.aio.Channel, config: assistant_pb2.ConverseConfig) -> None:
        self.outgoing: asyncio.Queue[assistant_pb2.ConverseRequest | None] = asyncio.Queue()
        self.outgoing.put_nowait(assistant_pb2.ConverseRequest(config=config))
        stub = assistant_pb2_grpc.AssistantServiceStub(channel)
        self.call = stub.Converse(self._requests(), timeout=300)
        self.heard = Heard()

    async def _requests(self) -> AsyncIterator[assistant_pb2.ConverseRequest]:
        while (request := await self.outgoing.get()) is not None:
            yield request

    async def speak(self, pcm: bytes, *, pace: float = 1.0) -> None:
        for chunk in chunks(pcm):
            self.outgoing.put_nowait(assistant_pb2.ConverseRequest(audio=chunk))
            await asyncio.sleep(CHUNK_S / pace)

    def type(self, text: str) -> None:
        self.outgoing.put_nowait(assistant_pb2.ConverseRequest(text=text))

    def hang_up(self) -> None:
        self.outgoing.put_nowait(None)

    async def until(self, kind: str, count: int = 1, timeout_s: float = 120) -> Heard:
        """Reads responses until ``count`` of ``kind`` have come."""
        async with asyncio.timeout(timeout_s):
            while len(self.heard.of(kind)) < count:
                response = await self.call.read()
                assert isinstance(response, assistant_pb2.ConverseResponse), f"the call ended before {count} {kind}"
                self.heard.events.append(response)
        return self.heard

    async def rest(self) -> Heard:
        async for response in self.call:
            self.heard.events.append(response)
        return self.heard


def voice_config(**fields: object) -> assistant_pb2.ConverseConfig:
    given: dict[str, object] = {
        "input_encoding": speech_pb2.AUDIO_ENCODING_PCM16,
        "input_sample_rate_hz": RATE,
        "language": "en",
        "output_encoding": speech_pb2.AUDIO_ENCODING_PCM16,
        "sampling": GREEDY,
        **fields,
    }
    return assistant_pb2.ConverseConfig(**given)  # type: ignore[arg-type]


async def transcribed(channel: grpc.aio.Channel, pcm: bytes, rate: int) -> str:
    wav = io.BytesIO()
    soundfile.write(wav, np.frombuffer(pcm, dtype="<i2"), rate, format="WAV", subtype="PCM_16")
    stub = speech_pb2_grpc.SpeechServiceStub(channel)
    response = await stub.Transcribe(speech_pb2.TranscribeRequest(audio=wav.getvalue(), language="en"), timeout=120)
    return str(response.text)


async def test_a_spoken_question_is_answered_aloud(front_door_mesh: LocalMesh) -> None:
    async with front_door_mesh.aio_channel() as channel:
        caller = Caller(channel, voice_config(interim_results=True))
        await caller.until("started")
        await caller.speak(spoken(QUESTION))
        heard = await caller.until("reply_end")
        caller.hang_up()
        await caller.rest()
        audio = heard.of("reply_audio")
        rate = audio[0].sample_rate_hz  # type: ignore[attr-defined]
        said = await transcribed(channel, heard.audio(1), rate)
    (turn,) = heard.of("user_turn")
    assert "capital of france" in turn.text.lower(), turn  # type: ignore[attr-defined]
    assert heard.of("partial_transcript"), "no partial transcript while the question was spoken"
    (end,) = heard.ends()
    assert "paris" in end.text.lower() and not end.interrupted, end
    assert "".join(d.delta for d in heard.of("reply_delta")).strip() == end.text  # type: ignore[attr-defined]
    # Spoken while generated: timings in order, the first audio before the reply's end.
    timings = end.timings
    assert 0 < timings.transcript_ms <= timings.first_token_ms <= timings.first_audio_ms <= timings.reply_ms
    # Whisper hears the fact in the reply's own audio.
    assert "paris" in said.lower(), said


async def test_speech_during_the_reply_interrupts_it_and_is_answered(front_door_mesh: LocalMesh) -> None:
    long_reply = llm_pb2.SamplingParams(temperature=0.0, max_tokens=400)
    async with front_door_mesh.aio_channel() as channel:
        caller = Caller(channel, voice_config(sampling=long_reply))
        await caller.until("started")
        caller.type("Tell me a long story about a dragon who lives in a castle by the sea.")
        await caller.until("reply_audio")
        assert running_requests(front_door_mesh) >= 1
        speaking = asyncio.create_task(caller.speak(spoken(QUESTION)))
        heard = await caller.until("reply_end")
        interrupted = heard.ends()[0]
        assert interrupted.interrupted and interrupted.turn == 1 and interrupted.text
        # The engine stopped the story's sequence while the user was still speaking.
        await wait_for(lambda: running_requests(front_door_mesh) == 0, 5)
        await speaking
        heard = await caller.until("reply_end", 2)
        caller.hang_up()
        await caller.rest()
        # The session keeps the interrupted reply as far as it went, before the next turn.
        session_id = heard.of("started")[0].session_id  # type: ignore[attr-defined]
        stub = assistant_pb2_grpc.AssistantServiceStub(channel)
        kept = await stub.GetSession(assistant_pb2.GetSessionRequest(session_id=session_id))
        assert [m.content for m in kept.messages][1:3] == [interrupted.text, heard.of("user_turn")[1].text]  # type: ignore[attr-defined]
    turns = heard.of("user_turn")
    assert [t.turn for t in turns] == [1, 2]  # type: ignore[attr-defined]
    assert "capital of france" in turns[1].text.lower()  # type: ignore[attr-defined]
    second = heard.ends()[1]
    assert second.turn == 2 and not second.interrupted and "paris" in second.text.lower()


async def test_a_later_call_continues_the_session(front_door_mesh: LocalMesh) -> None:
    session = f"trip-{time.time_ns()}"
    async with front_door_mesh.aio_channel() as channel:
        first = Caller(channel, voice_config(session_id=session, text_only=True))
        started = await first.until("started")
        assert not started.of("started")[0].resumed  # type: ignore[attr-defined]
        first.type(QUESTION)
        await first.until("reply_end")
        first.hang_up()
        await first.rest()
        second = Caller(channel, voice_config(session_id=session, text_only=True))
        heard = await second.until("started")
        resumed = heard.of("started")[0]
        assert resumed.resumed and resumed.messages == 2  # type: ignore[attr-defined]
        second.type(FOLLOW_UP)
        heard = await second.until("reply_end")
        second.hang_up()
        await second.rest()
        assert "paris" in heard.ends()[0].text.lower(), heard.ends()[0]
        # The session made the difference: in a new one, "that city" is no city in particular.
        fresh = Caller(channel, voice_config(text_only=True))
        await fresh.until("started")
        fresh.type(FOLLOW_UP)
        alone = await fresh.until("reply_end")
        fresh.hang_up()
        await fresh.rest()
        assert "paris" not in alone.ends()[0].text.lower(), alone.ends()[0]
        stub = assistant_pb2_grpc.AssistantServiceStub(channel)
        kept = await stub.GetSession(assistant_pb2.GetSessionRequest(session_id=session))
        assert [m.role for m in kept.messages] == [llm_pb2.CHAT_ROLE_USER, llm_pb2.CHAT_ROLE_ASSISTANT] * 2
        assert kept.messages[0].content == QUESTION
        listed = await stub.ListSessions(assistant_pb2.ListSessionsRequest())
        assert session in [s.session_id for s in listed.sessions]
        # Another tenant sees none of it.
        async with front_door_mesh.aio_channel(key_for("assistant-other")) as other_channel:
            other = assistant_pb2_grpc.AssistantServiceStub(other_channel)
            with pytest.raises(grpc.aio.AioRpcError) as hidden:
                await other.GetSession(assistant_pb2.GetSessionRequest(session_id=session))
            assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
            assert session not in [
                s.session_id for s in (await other.ListSessions(assistant_pb2.ListSessionsRequest())).sessions
            ]
            with pytest.raises(grpc.aio.AioRpcError) as not_theirs:
                await other.DeleteSession(assistant_pb2.DeleteSessionRequest(session_id=session))
            assert not_theirs.value.code() == grpc.StatusCode.NOT_FOUND
        await stub.DeleteSession(assistant_pb2.DeleteSessionRequest(session_id=session))
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await stub.GetSession(assistant_pb2.GetSessionRequest(session_id=session))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_each_stage_counts_against_the_tenants_quotas(front_door_mesh: LocalMesh) -> None:
    # One request per 10 s: the call itself costs nothing, its first reply (one Chat stage) fits, the second not.
    key = key_for(f"assistant-quota-{time.time_ns()}", requests_per_second=0.1)
    async with front_door_mesh.aio_channel(key) as channel:
        caller = Caller(channel, voice_config(text_only=True))
        await caller.until("started")
        caller.type(QUESTION)
        await caller.until("reply_end")
        caller.type(QUESTION)
        with pytest.raises(grpc.aio.AioRpcError) as refused_stage:
            await caller.until("reply_end", 2)
        caller.hang_up()
    error = refused_stage.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    info = error_info(error)
    assert info is not None and info.metadata["step"] == "reply" and "LlmService/Chat" in info.metadata["method"]
    assert "requests per second" in (error.details() or ""), error.details()


async def refused(channel: grpc.aio.Channel, requests: Sequence[assistant_pb2.ConverseRequest]) -> grpc.aio.AioRpcError:
    stub = assistant_pb2_grpc.AssistantServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.Converse(iter(requests), timeout=30):
            pass
    return caught.value


@pytest.mark.parametrize(
    ("requests", "reason", "field_name"),
    [
        ([assistant_pb2.ConverseRequest(text="hello")], "CONFIG_FIRST", "config"),
        (
            [
                assistant_pb2.ConverseRequest(config=assistant_pb2.ConverseConfig()),
                assistant_pb2.ConverseRequest(audio=b"\x00\x00" * 160),
            ],
            "NO_AUDIO_CONFIG",
            "config.input_encoding",
        ),
        (
            [
                assistant_pb2.ConverseRequest(
                    config=assistant_pb2.ConverseConfig(input_encoding=speech_pb2.AUDIO_ENCODING_PCM16)
                )
            ],
            "INVALID_SAMPLE_RATE",
            "config.input_sample_rate_hz",
        ),
        (
            [
                assistant_pb2.ConverseRequest(
                    config=assistant_pb2.ConverseConfig(input_encoding=speech_pb2.AUDIO_ENCODING_FLAC)
                )
            ],
            "UNSUPPORTED_ENCODING",
            "config.input_encoding",
        ),
        (
            [assistant_pb2.ConverseRequest(config=assistant_pb2.ConverseConfig(session_id="no spaces/allowed"))],
            "INVALID_SESSION_ID",
            "config.session_id",
        ),
        (
            [assistant_pb2.ConverseRequest(config=assistant_pb2.ConverseConfig(end_of_turn_silence_ms=50))],
            "OUT_OF_RANGE",
            "config.end_of_turn_silence_ms",
        ),
        (
            [
                assistant_pb2.ConverseRequest(config=voice_config()),
                assistant_pb2.ConverseRequest(audio=b"\x00" * (2 << 20)),
            ],
            "CHUNK_TOO_LARGE",
            "audio",
        ),
        (
            [assistant_pb2.ConverseRequest(config=voice_config()), assistant_pb2.ConverseRequest(audio=b"\x00" * 3)],
            "PARTIAL_SAMPLE",
            "audio",
        ),
        (
            [assistant_pb2.ConverseRequest(config=voice_config()), assistant_pb2.ConverseRequest(text="   ")],
            "EMPTY_TEXT",
            "text",
        ),
        (
            [assistant_pb2.ConverseRequest(config=voice_config()), assistant_pb2.ConverseRequest(text="x" * 5000)],
            "TEXT_TOO_LONG",
            "text",
        ),
        (
            [
                assistant_pb2.ConverseRequest(config=voice_config()),
                assistant_pb2.ConverseRequest(config=voice_config()),
            ],
            "CONFIG_REPEATED",
            "config",
        ),
    ],
)
async def test_bad_input_is_refused_with_the_field_named(
    front_door_mesh: LocalMesh, requests: list[assistant_pb2.ConverseRequest], reason: str, field_name: str
) -> None:
    async with front_door_mesh.aio_channel() as channel:
        error = await refused(channel, requests)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    info = error_info(error)
    assert info is not None and info.reason == reason and info.metadata.get("field") == field_name, error.details()
