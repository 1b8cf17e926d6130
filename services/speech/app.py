"""The speech service process: loads Whisper and the synthesisers, serves aimass.v1.SpeechService."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health

from aimass.runtime.catalogue import model_info
from aimass.runtime.config import Settings, SpeechConfig
from aimass.runtime.replica import replica_runner
from aimass.runtime.server import ServerRunner, serve_process
from aimass.v1 import models_pb2, speech_pb2_grpc
from services.speech.asr import WHISPER_MODEL, AsrEngine
from services.speech.servicer import SpeechServicer
from services.speech.tts import TtsEngine


class SpeechApp:
    kind = "speech"
    service_names: tuple[str, ...] = ("aimass.v1.SpeechService",)

    def __init__(
        self,
        config: SpeechConfig,
        asr: AsrEngine | None = None,
        tts: TtsEngine | None = None,
    ) -> None:
        # Engines may be shared (tests build several servers over one set of loaded models).
        self.asr = asr or AsrEngine(
            device=config.device, threads=config.asr_threads, cache_dir=config.whisper_cache_dir
        )
        self.tts = tts or TtsEngine(
            timeout_s=config.tts_timeout_s,
            timeout_base_s=config.tts_timeout_base_s,
            timeout_per_char_s=config.tts_timeout_per_char_s,
        )
        self.servicer = SpeechServicer(self.asr, self.tts, config)

    def add_to_server(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer) -> None:
        speech_pb2_grpc.add_SpeechServiceServicer_to_server(self.servicer, server)

    async def load(self) -> None:
        # Loading blocks for seconds; a thread keeps health checks answering meanwhile.
        if not self.tts.voices:
            await asyncio.to_thread(self.tts.load)
        if not self.asr.loaded:
            await asyncio.to_thread(self.asr.load)
        await self.servicer.start()

    def model_names(self) -> tuple[str, ...]:
        return (WHISPER_MODEL, *self.tts.models)

    def model_infos(self) -> Sequence[models_pb2.ModelInfo]:
        speech, service = models_pb2.MODALITY_SPEECH, self.service_names[0]
        # Synthesize without a model takes the first synthesiser that has its default voice.
        default = self.tts.find_voice("", "")
        voices = Counter(model for model, _ in self.tts.voices)
        return (
            model_info(
                WHISPER_MODEL,
                description="Multilingual speech recognition (Whisper base), whole files or streamed",
                modality=speech,
                service=service,
                methods=("Transcribe", "StreamTranscribe"),
            ),
            *(
                model_info(
                    model,
                    description=f"Text to speech with {voices[model]} voices; ListVoices names them",
                    modality=speech,
                    service=service,
                    methods=("Synthesize", "ListVoices"),
                    is_default=default is not None and default.model == model,
                )
                for model in self.tts.models
            ),
        )

    async def close(self) -> None:
        await self.servicer.close()


def build_runner(
    settings: Settings,
    *,
    config: SpeechConfig | None = None,
    register: bool = True,
    asr: AsrEngine | None = None,
    tts: TtsEngine | None = None,
) -> ServerRunner:
    config = config or settings.speech
    return replica_runner(SpeechApp(config, asr, tts), settings, config.server, register=register)


def main() -> None:
    serve_process("speech", build_runner)
