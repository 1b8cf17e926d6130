"""Voice to voice: from the end of the user's speech to the first byte of the spoken reply, AssistantService.Converse
vs a client chaining the three RPCs it would otherwise call.

    python -m benchmarks.voice_assistant [--turns 20] [--write docs/benchmarks.md]

Starts its own mesh (`aimass up`: gateway, one speech replica (Whisper base, flite), one LLM replica (SmolLM2 on
vLLM)). Each turn is a question spoken by espeak-ng (16 kHz PCM16, 100 ms chunks sent at the pace they were
spoken), answered three ways, in a rotating order so drift on the machine hits them alike:

- ``chained``: the client has the recording when the user stops (push-to-talk), then calls
  SpeechService.Transcribe, LlmService.Chat (read to its end) and SpeechService.Synthesize on the whole reply, each
  awaited before the next; the clock stops at Synthesize's first audio chunk.
- ``converse, end_of_turn``: one Converse call, the audio streamed while spoken, then an explicit EndOfTurn (the
  same push-to-talk release): recognition has heard all but the last stretch, and the reply is spoken sentence by
  sentence while it is generated.
- ``converse, pause``: the same, the end of the turn found by the server in the audio (700 ms of silence, which the
  client goes on sending in real time): what a hands-free user waits, the pause included.

The same system prompt, question and greedy sampling on every side (the answers are the same text); each
Converse turn is a new session. Reported: p50 and p90 over the turns, the ratio of p50s to ``chained``, and where
the time goes (the chain's three calls; Converse's own timings: transcript, first token, first sentence, first
audio).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import soundfile  # type: ignore[import-untyped]
import soxr  # type: ignore[import-untyped]

from aimass.runtime.config import AssistantConfig
from aimass.v1 import assistant_pb2, assistant_pb2_grpc, llm_pb2, llm_pb2_grpc, speech_pb2, speech_pb2_grpc
from benchmarks.common import Mesh, command_line, machine, markdown_table, publish, utc_now, wait_quiet

NAME = "voice_assistant"
RATE = 16000
CHUNK_S = 0.1
SIDES = ("chained", "converse, end_of_turn", "converse, pause")
QUESTIONS = (
    "What is the capital of France?",
    "What is the capital of Germany?",
    "How many days are in a week?",
    "What color is the sky?",
    "What is the largest ocean on Earth?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water?",
    "What is the capital of Italy?",
    "How many legs does a spider have?",
    "What is the tallest mountain in the world?",
)
SAMPLING = llm_pb2.SamplingParams(temperature=0.0, max_tokens=64)
SILENCE_MS = 700
DEADLINE_S = 120.0


@dataclass
class Speech:
    text: str
    pcm: bytes  # PCM16 mono at RATE
    wav: bytes  # the same, as a WAV file


def speak(text: str) -> Speech:
    wav = subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "140", "--stdout", "--", text], capture_output=True, check=True, timeout=30
    ).stdout
    samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    pcm = (soxr.resample(samples, rate, RATE) * 32767).astype("<i2")
    out = io.BytesIO()
    soundfile.write(out, pcm, RATE, format="WAV", subtype="PCM_16")
    return Speech(text, pcm.tobytes(), out.getvalue())


def chunks(pcm: bytes) -> list[bytes]:
    size = int(RATE * CHUNK_S) * 2
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


@dataclass
class Turn:
    latency_ms: float
    reply: str
    # Where the time went, milliseconds from the end of speech: stage -> when it was done.
    stages: dict[str, float] = field(default_factory=dict)


class Sides:
    def __init__(self, channel: grpc.aio.Channel, system_prompt: str) -> None:
        self.speech = speech_pb2_grpc.SpeechServiceStub(channel)
        self.llm = llm_pb2_grpc.LlmServiceStub(channel)
        self.assistant = assistant_pb2_grpc.AssistantServiceStub(channel)
        self.system_prompt = system_prompt

    async def chained(self, speech: Speech) -> Turn:
        ended = time.perf_counter()
        transcript = await self.speech.Transcribe(
            speech_pb2.TranscribeRequest(audio=speech.wav, language="en"), timeout=DEADLINE_S
        )
        heard = time.perf_counter()
        chat = llm_pb2.ChatRequest(
            messages=[
                llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_SYSTEM, content=self.system_prompt),
                llm_pb2.ChatMessage(role=llm_pb2.CHAT_ROLE_USER, content=transcript.text.strip()),
            ],
            sampling=SAMPLING,
        )
        reply = "".join([r.delta async for r in self.llm.Chat(chat, timeout=DEADLINE_S)]).strip()
        answered = time.perf_counter()
        synthesis = self.speech.Synthesize(
            speech_pb2.SynthesizeRequest(text=reply, encoding=speech_pb2.AUDIO_ENCODING_PCM16), timeout=DEADLINE_S
        )
        async for response in synthesis:
            if response.WhichOneof("event") == "audio" and response.audio.data:
                break
        first_audio = time.perf_counter()
        synthesis.cancel()

        def ms(at: float) -> float:
            return (at - ended) * 1000

        return Turn(
            ms(first_audio), reply, {"transcribe": ms(heard), "chat": ms(answered), "first audio": ms(first_audio)}
        )

    async def converse(self, speech: Speech, *, pause: bool) -> Turn:
        requests: asyncio.Queue[assistant_pb2.ConverseRequest | None] = asyncio.Queue()
        requests.put_nowait(
            assistant_pb2.ConverseRequest(
                config=assistant_pb2.ConverseConfig(
                    input_encoding=speech_pb2.AUDIO_ENCODING_PCM16,
                    input_sample_rate_hz=RATE,
                    language="en",
                    output_encoding=speech_pb2.AUDIO_ENCODING_PCM16,
                    sampling=SAMPLING,
                    system_prompt=self.system_prompt,
                    end_of_turn_silence_ms=SILENCE_MS,
                )
            )
        )

        async def sent() -> AsyncIterator[assistant_pb2.ConverseRequest]:
            while (request := await requests.get()) is not None:
                yield request

        ended = 0.0

        async def microphone() -> None:
            nonlocal ended
            for chunk in chunks(speech.pcm):
                requests.put_nowait(assistant_pb2.ConverseRequest(audio=chunk))
                await asyncio.sleep(CHUNK_S)
            ended = time.perf_counter()
            if pause:
                # The user stays quiet; the microphone goes on sending silence until the reply starts.
                silence = b"\x00\x00" * int(RATE * CHUNK_S)
                for _ in range(int(3 / CHUNK_S)):
                    requests.put_nowait(assistant_pb2.ConverseRequest(audio=silence))
                    await asyncio.sleep(CHUNK_S)
            else:
                requests.put_nowait(assistant_pb2.ConverseRequest(end_of_turn=assistant_pb2.EndOfTurn()))

        call = self.assistant.Converse(sent(), timeout=DEADLINE_S)
        talking = asyncio.create_task(microphone())
        first_audio = 0.0
        end: assistant_pb2.ReplyEnd | None = None
        try:
            async for response in call:
                kind = response.WhichOneof("event")
                if kind == "reply_audio" and not first_audio:
                    first_audio = time.perf_counter()
                elif kind == "reply_end":
                    end = response.reply_end
                    break
        finally:
            talking.cancel()
            requests.put_nowait(None)
            call.cancel()
        assert end is not None and first_audio, "the turn got no spoken reply"
        timings = end.timings
        # The server's timings count from the end of the turn it saw (the EndOfTurn, or the pause's start).
        shift = (first_audio - ended) * 1000 - timings.first_audio_ms
        return Turn(
            (first_audio - ended) * 1000,
            end.text,
            {
                "transcript": shift + timings.transcript_ms,
                "first token": shift + timings.first_token_ms,
                "first sentence": shift + timings.first_sentence_ms,
                "first audio": (first_audio - ended) * 1000,
            },
        )


async def run_all(mesh: Mesh, turns: int) -> dict[str, list[Turn]]:
    spoken = [speak(q) for q in QUESTIONS]
    results: dict[str, list[Turn]] = {side: [] for side in SIDES}
    async with mesh.aio_channel() as channel:
        sides = Sides(channel, AssistantConfig().default_system_prompt)
        run: dict[str, Callable[[Speech], Awaitable[Turn]]] = {
            "chained": sides.chained,
            "converse, end_of_turn": functools.partial(sides.converse, pause=False),
            "converse, pause": functools.partial(sides.converse, pause=True),
        }
        for side in SIDES:  # warm every path (and the models)
            await run[side](spoken[0])
        for n in range(turns):
            speech = spoken[n % len(spoken)]
            order = SIDES[n % len(SIDES) :] + SIDES[: n % len(SIDES)]
            for side in order:
                turn = await run[side](speech)
                results[side].append(turn)
                print(f"turn {n + 1} {side}: {turn.latency_ms:.0f} ms: {turn.reply[:60]!r}", file=sys.stderr)
    return results


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(results: dict[str, list[Turn]], turns: int) -> str:
    chained_p50 = statistics.median(t.latency_ms for t in results["chained"])
    rows = []
    for side in SIDES:
        latencies = [t.latency_ms for t in results[side]]
        p50 = statistics.median(latencies)
        stages = results[side][0].stages.keys()
        where = ", ".join(
            f"{stage} {statistics.median(t.stages[stage] for t in results[side]):.0f}" for stage in stages
        )
        rows.append([f"`{side}`", f"{p50:.0f}", f"{percentile(latencies, 0.9):.0f}", f"{p50 / chained_p50:.2f}", where])
    same = sum(a.reply == b.reply for a, b in zip(results["chained"], results["converse, end_of_turn"], strict=True))
    return "\n".join(
        [
            "## Voice assistant: end of speech to the first reply audio, Converse vs chaining the RPCs",
            "",
            f"{utc_now()} · {machine()} · `{command_line()}` · {turns} turns per side (10 espeak-ng questions), "
            "through the gateway (one speech replica: Whisper base, flite; one LLM replica: SmolLM2-135M on vLLM)",
            "",
            "`chained`: when the user stops, the client sends the recording to SpeechService.Transcribe, the text to "
            "LlmService.Chat (read to its end), and the reply to SpeechService.Synthesize, each awaited. `converse, "
            "end_of_turn`: AssistantService.Converse with the audio streamed as spoken and an explicit EndOfTurn "
            "when speech ends (the same push-to-talk). `converse, pause`: the server finds the end in the audio "
            f"({SILENCE_MS} ms of silence, included in the figure). The stage columns are medians, in ms from the end "
            "of speech, of when each stage was done. Ratio: p50 / chained's p50, measured side by side in one run "
            f"(the machine is shared and noisy: only the ratios compare). {same} of {turns} replies were the same "
            "text on both sides (greedy).",
            "",
            markdown_table(["side", "p50 ms", "p90 ms", "p50 / chained", "stages done at (ms)"], rows),
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--write", type=Path, help="update this markdown file's voice assistant section")
    args = parser.parse_args(argv)
    if not 1 <= args.turns <= 100:
        parser.error("turns must be 1..100 (the run stays bounded)")
    busy = wait_quiet(30.0)
    if busy:
        print(f"warning: other processes are busy ({'; '.join(busy)}); figures may be skewed", file=sys.stderr)
    mesh = Mesh(NAME, env={"AIMASS_LLM__MAX_MODEL_LEN": "1024"}, replicas={"speech": 1, "llm": 1})
    mesh.start()
    try:
        mesh.wait_ready(600)
        results = asyncio.run(run_all(mesh, args.turns))
    finally:
        mesh.stop()
    publish(report(results, args.turns), args.write, NAME)


if __name__ == "__main__":
    main()
