"""Speech figures: Whisper's real-time factor in-process vs over gRPC, and Synthesize's time to first audio chunk.

ASR: a ~40 s flite recording of a known text is transcribed by the engine in-process and through a SpeechService
(in-process server on loopback by default, or ``--target`` e.g. the gateway of a running mesh), interleaved, and
the median real-time factors (processing seconds / audio seconds) compared. TTS: a 300-word text through
Synthesize, time to the first audio chunk vs to the end marker.

    python -m benchmarks.speech [--rounds 3] [--target 127.0.0.1:50051]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import grpc

from aimass.runtime.config import ServerConfig, Settings, SpeechConfig
from aimass.v1 import speech_pb2, speech_pb2_grpc
from benchmarks.common import machine, markdown_table, median
from services.speech.app import build_runner
from services.speech.asr import AsrEngine
from services.speech.audio import decode_audio

PARAGRAPH = (
    "Please call Stella and ask her to bring these things with her from the store. Six spoons of fresh snow peas,"
    " five thick slabs of blue cheese, and maybe a snack for her brother Bob. We also need a small plastic snake and"
    " a big toy frog for the kids. She can scoop these things into three red bags, and we will go meet her Wednesday"
    " at the train station."
)
TTFC_GOAL = 0.30
RTF_GOAL = 0.90


def three_hundred_words() -> str:
    words = (PARAGRAPH + " ") * 6
    return " ".join(words.split()[:300]).rstrip(",") + "."


async def synthesize(stub: speech_pb2_grpc.SpeechServiceAsyncStub, text: str) -> tuple[bytes, float, float]:
    """(WAV bytes, seconds to the first audio chunk, seconds to the end marker)."""
    started = time.perf_counter()
    first = 0.0
    data = bytearray()
    async for reply in stub.Synthesize(speech_pb2.SynthesizeRequest(text=text), timeout=120):
        if reply.WhichOneof("event") == "audio":
            first = first or time.perf_counter() - started
            data += reply.audio.data
    return bytes(data), first, time.perf_counter() - started


async def run(rounds: int, target: str | None) -> None:
    asr = AsrEngine(device="auto")
    asr.load()
    runner = None
    if target is None:
        config = SpeechConfig(server=ServerConfig(port=0))
        runner = build_runner(Settings(), config=config, register=False, asr=asr)
        await runner.start()
        target = runner.address
    channel = grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
    stub = speech_pb2_grpc.SpeechServiceStub(channel)
    try:
        wav, _, _ = await synthesize(stub, PARAGRAPH + " " + PARAGRAPH + " " + PARAGRAPH + " " + PARAGRAPH)
        audio = decode_audio(wav, max_bytes=len(wav), max_seconds=3600)
        seconds = audio.duration_s
        local: list[float] = []
        remote: list[float] = []
        for _ in range(rounds):
            started = time.perf_counter()
            await asyncio.to_thread(asr.transcribe, audio.samples, beam_size=SpeechConfig().asr_beam_size)
            local.append((time.perf_counter() - started) / seconds)
            started = time.perf_counter()
            await stub.Transcribe(speech_pb2.TranscribeRequest(audio=wav), timeout=600)
            remote.append((time.perf_counter() - started) / seconds)
        text = three_hundred_words()
        firsts: list[float] = []
        totals: list[float] = []
        for _ in range(rounds):
            _, first, total = await synthesize(stub, text)
            firsts.append(first)
            totals.append(total)
    finally:
        await channel.close()
        if runner is not None:
            await runner.drain()
    rtf_local, rtf_remote = median(local), median(remote)
    first, total = median(firsts), median(totals)
    print(f"machine: {machine()}; Whisper base on {asr.device}; target {target}; {rounds} rounds (medians)")
    print(
        markdown_table(
            ("figure", "value", "goal"),
            [
                ("ASR audio length", f"{seconds:.1f} s", ""),
                ("ASR real-time factor in-process", f"{rtf_local:.3f}", ""),
                ("ASR real-time factor over gRPC", f"{rtf_remote:.3f}", ""),
                ("speed over gRPC as share of in-process", f"{rtf_local / rtf_remote:.0%}", f">= {RTF_GOAL:.0%}"),
                (f"TTS {len(text.split())} words: first chunk", f"{first * 1000:.0f} ms", ""),
                ("TTS: whole text", f"{total * 1000:.0f} ms", ""),
                ("TTS first chunk / whole", f"{first / total:.1%}", f"<= {TTFC_GOAL:.0%}"),
            ],
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--target", help="a SpeechService (or gateway) address; default: an in-process server")
    args = parser.parse_args()
    asyncio.run(run(args.rounds, args.target))


if __name__ == "__main__":
    main()
