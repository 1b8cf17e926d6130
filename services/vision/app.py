"""The vision service process: loads the models, serves aimass.v1.VisionService, registers with the registry."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health

from aimass.runtime.catalogue import model_info
from aimass.runtime.config import Settings, VisionConfig
from aimass.runtime.custom_heads import MODEL_HOST_SERVICE, CustomHeads, ModelHostServicer, SchedulerBlobs
from aimass.runtime.models import ModelSet
from aimass.runtime.replica import replica_runner
from aimass.runtime.server import ServerRunner, serve_process
from aimass.training.artifact import IMAGE_BACKBONE
from aimass.v1 import lifecycle_pb2_grpc, models_pb2, vision_pb2_grpc
from services.vision.engine import (
    CLASSIFY_MODEL,
    FACE_MODEL,
    MODELS,
    NUM_CLASSES,
    OCR_LANGUAGES,
    OCR_MODEL,
    VisionEngine,
)
from services.vision.servicer import VisionServicer


class VisionApp:
    kind = "vision"
    service_names: tuple[str, ...] = ("aimass.v1.VisionService",)
    # The scheduler tells this replica which tenants' image classifiers to host (ModelHostService).
    scheduler_services: tuple[str, ...] = (MODEL_HOST_SERVICE,)

    def __init__(self, settings: Settings, config: VisionConfig, engine: VisionEngine | None = None) -> None:
        # An engine may be shared (tests build several servers over one set of loaded models).
        self.engine = engine or VisionEngine(config)
        # Trained heads come from the scheduler's blob store; the backbone they sit on loads with the first one.
        self.blobs = SchedulerBlobs.for_replica(settings, self.kind)
        self.heads = CustomHeads(self.blobs.read_bytes, base_models=(IMAGE_BACKBONE,), service="VisionService")
        self.servicer = VisionServicer(self.engine, config, self.heads)
        self.heads.prepare = self.servicer.prepare_head

    def add_to_server(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer) -> None:
        vision_pb2_grpc.add_VisionServiceServicer_to_server(self.servicer, server)
        lifecycle_pb2_grpc.add_ModelHostServiceServicer_to_server(ModelHostServicer(self.heads), server)

    async def load(self) -> None:
        # Model loading (and the one-off ONNX export) blocks for seconds; a thread keeps health checks answering.
        if not self.engine.loaded:
            await asyncio.to_thread(self.engine.load)
        await self.servicer.start()

    @property
    def model_set(self) -> ModelSet:
        return self.engine.models

    def model_names(self) -> tuple[str, ...]:
        return MODELS

    def model_infos(self) -> Sequence[models_pb2.ModelInfo]:
        vision, service = models_pb2.MODALITY_VISION, self.service_names[0]
        return (
            model_info(
                CLASSIFY_MODEL,
                description=f"Image classification into the {NUM_CLASSES} ImageNet classes",
                modality=vision,
                service=service,
                methods=("Classify",),
            ),
            model_info(
                FACE_MODEL,
                description="Face detection with five landmarks per face",
                modality=vision,
                service=service,
                methods=("DetectFaces",),
            ),
            model_info(
                OCR_MODEL,
                description=f"Text detection and recognition ({', '.join(OCR_LANGUAGES)})",
                modality=vision,
                service=service,
                methods=("ReadText",),
            ),
        )

    async def close(self) -> None:
        await self.servicer.close()
        await self.blobs.close()


def build_runner(
    settings: Settings, config: VisionConfig, *, register: bool = True, engine: VisionEngine | None = None
) -> ServerRunner:
    return replica_runner(VisionApp(settings, config, engine), settings, config.server, register=register)


def main() -> None:
    serve_process("vision", lambda settings: build_runner(settings, settings.vision))
