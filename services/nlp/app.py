"""The NLP service process: loads the models, serves aimass.v1.NlpService, registers with the registry."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health

from aimass.runtime.catalogue import model_info
from aimass.runtime.config import Settings
from aimass.runtime.custom_heads import MODEL_HOST_SERVICE, CustomHeads, ModelHostServicer, SchedulerBlobs
from aimass.runtime.models import ModelSet
from aimass.runtime.replica import replica_runner
from aimass.runtime.server import ServerRunner, serve_process
from aimass.training.artifact import TEXT_BACKBONE
from aimass.v1 import lifecycle_pb2_grpc, models_pb2, nlp_pb2_grpc
from services.nlp.engine import EMBED_MODEL, MODELS, NER_MODEL, SENTIMENT_MODEL, NlpEngine
from services.nlp.servicer import NlpServicer


class NlpApp:
    kind = "nlp"
    service_names: tuple[str, ...] = ("aimass.v1.NlpService",)
    # The scheduler tells this replica which tenants' text classifiers to host (ModelHostService).
    scheduler_services: tuple[str, ...] = (MODEL_HOST_SERVICE,)

    def __init__(self, settings: Settings, engine: NlpEngine | None = None) -> None:
        # An engine may be shared (tests build several servers over one set of loaded models).
        self.engine = engine or NlpEngine(device=settings.nlp.device, torch_threads=settings.nlp.torch_threads)
        # Trained heads come from the scheduler's blob store; their features are this replica's MiniLM embeddings.
        self.blobs = SchedulerBlobs.for_replica(settings, self.kind)
        self.heads = CustomHeads(self.blobs.read_bytes, base_models=(TEXT_BACKBONE,), service="NlpService")
        self.servicer = NlpServicer(self.engine, settings.nlp, self.heads)

    def add_to_server(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer) -> None:
        nlp_pb2_grpc.add_NlpServiceServicer_to_server(self.servicer, server)
        lifecycle_pb2_grpc.add_ModelHostServiceServicer_to_server(ModelHostServicer(self.heads), server)

    async def load(self) -> None:
        # Model loading blocks for seconds; a thread keeps health checks answering meanwhile.
        if not self.engine.loaded:
            await asyncio.to_thread(self.engine.load)
        await self.servicer.start()

    @property
    def model_set(self) -> ModelSet:
        return self.engine.models

    def model_names(self) -> tuple[str, ...]:
        return MODELS

    def model_infos(self) -> Sequence[models_pb2.ModelInfo]:
        text, service = models_pb2.MODALITY_TEXT, self.service_names[0]
        return (
            model_info(
                EMBED_MODEL,
                description="Sentence embeddings (384 dimensions); zero-shot classification by similarity",
                modality=text,
                service=service,
                methods=("Embed", "Classify"),
            ),
            model_info(
                SENTIMENT_MODEL,
                description="Rule-based English sentiment (VADER)",
                modality=text,
                service=service,
                methods=("Sentiment",),
            ),
            model_info(
                NER_MODEL,
                description="English named entities (spaCy small pipeline)",
                modality=text,
                service=service,
                methods=("Entities",),
            ),
        )

    async def close(self) -> None:
        await self.servicer.close()
        await self.blobs.close()


def build_runner(settings: Settings, *, register: bool = True, engine: NlpEngine | None = None) -> ServerRunner:
    return replica_runner(NlpApp(settings, engine), settings, settings.nlp.server, register=register)


def main() -> None:
    serve_process("nlp", build_runner)
