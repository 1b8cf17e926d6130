"""Speech figures: Whisper's real-time factor in-process vs over gRPC, and Synthesize's time to first audio chunk.

ASR: a ~40 s flite recording of a known text is transcribed by the engine in-process and through a SpeechService,
interleaved, and the median real-time factors (processing seconds / audio seconds) compared. TTS: a 300-word text
through Synthesize, time to the first audio chunk vs to the end marker.

The SpeechService called: by default a replica in-process on loopback, with certificates of a throwaway CA made for
the run; ``--replica`` a speech replica of a running mesh, called directly as its gateway calls it (mesh mTLS with
the gateway certificate from the settings' pki directory, state_dir/pki); ``--target`` the gateway of a running mesh
(its API key: $AIMASS_API_KEY, else the admin key file `aimass up` wrote).

    python -m benchmarks.speech [--rounds 3] [--target 127.0.0.1:50051 | --replica 127.0.0.1:50071]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from aimass.bootstrap import ensure_certificates
from aimass.client import keyed_aio_channel
from aimass.runtime.config import ServerConfig, Settings, SpeechConfig
from aimass.runtime.identity import ROLE_GATEWAY, MeshCredentials, mesh_channel
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
SPEECH = "speech"
# Whole recordings travel in one message.
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 * 1024 * 1024)]


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


def as_gateway(settings: Settings, address: str) -> grpc.aio.Channel:
    """A channel to the speech replica at ``address`` as a gateway calls it: mesh mTLS with the gateway certificate
    of ``settings``' pki directory, expecting the replica's (plaintext with mesh TLS off)."""
    credentials = None if settings.mesh.tls == "off" else MeshCredentials.load(settings.pki_dir, ROLE_GATEWAY)
    return mesh_channel(address, credentials, server_role=SPEECH, options=CHANNEL_OPTIONS)


@contextlib.asynccontextmanager
async def speech_channel(asr: AsrEngine, target: str | None, replica: str | None) -> AsyncIterator[grpc.aio.Channel]:
    """The channel the figures are measured through (see the module's docstring)."""
    if target is not None:
        async with keyed_aio_channel(target, options=CHANNEL_OPTIONS) as channel:
            yield channel
        return
    if replica is not None:
        async with as_gateway(Settings(), replica) as channel:
            yield channel
        return
    # In-process: a mesh of its own (CA, the replica's and the gateway's certificates), removed afterwards.
    state_dir = Path(tempfile.mkdtemp(prefix="aimass-bench-speech-"))
    settings = Settings(state_dir=state_dir)
    ensure_certificates(settings, {SPEECH: SPEECH, ROLE_GATEWAY: ROLE_GATEWAY})
    runner = build_runner(settings, config=SpeechConfig(server=ServerConfig(port=0)), register=False, asr=asr)
    try:
        await runner.start()
        async with as_gateway(settings, runner.address) as channel:
            yield channel
    finally:
        await runner.drain()
        shutil.rmtree(state_dir, ignore_errors=True)


async def run(rounds: int, target: str | None, replica: str | None) -> None:
    asr = AsrEngine(device="auto")
    asr.load()
    async with speech_channel(asr, target, replica) as channel:
        stub = speech_pb2_grpc.SpeechServiceStub(channel)
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
    rtf_local, rtf_remote = median(local), median(remote)
    first, total = median(firsts), median(totals)
    called = f"gateway {target}" if target else f"replica {replica}" if replica else "in-process replica"
    print(f"machine: {machine()}; Whisper base on {asr.device}; through the {called}; {rounds} rounds (medians)")
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
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--target", help="a running mesh's gateway address (default: an in-process replica)")
    where.add_argument("--replica", help="a running mesh's speech replica, called directly as its gateway calls it")
    args = parser.parse_args()
    asyncio.run(run(args.rounds, args.target, args.replica))


if __name__ == "__main__":
    main()
