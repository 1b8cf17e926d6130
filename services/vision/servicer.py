"""aimass.v1.VisionService: validate, decode, hand the work to the engine, shape the reply.

Thin by design: request limits and model names are checked here, images are decoded (with their own limits) in
a worker pool, the models live in ``engine``, and errors become statuses in the runtime's error interceptor.
``meta.priority`` orders the classifier's batch queue when the replica is contended (higher priorities first).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
import numpy as np
from PIL import Image

from aimass.runtime.batcher import DynamicBatcher
from aimass.runtime.config import VisionConfig
from aimass.runtime.errors import InvalidArgument
from aimass.runtime.models import serving_model
from aimass.runtime.scope import current_scope, priority_rank
from aimass.v1 import common_pb2, vision_pb2, vision_pb2_grpc
from services.vision.engine import (
    CLASSIFY_MODEL,
    FACE_MODEL,
    NUM_CLASSES,
    OCR_LANGUAGES,
    OCR_MODEL,
    RESIZE_SIZE,
    ClassifyJob,
    Label,
    VisionEngine,
    preprocess,
)
from services.vision.images import DecodedImage, check_count, decode_all

Context = grpc.aio.ServicerContext[Any, Any]
DEFAULT_TOP_K = 5
T = TypeVar("T")


def _box(x: float, y: float, width: float, height: float) -> vision_pb2.BoundingBox:
    return vision_pb2.BoundingBox(x=x, y=y, width=width, height=height)


class VisionServicer(vision_pb2_grpc.VisionServiceServicer):
    def __init__(self, engine: VisionEngine, config: VisionConfig) -> None:
        self.engine = engine
        self.config = config
        batching = config.classify_batching
        self.classify_batcher: DynamicBatcher[ClassifyJob, list[list[Label]]] = DynamicBatcher(
            engine.classify_batch,
            name="classify",
            max_batch_size=batching.max_batch_size,
            max_queue_delay_s=batching.max_queue_delay_ms / 1000,
            max_queue_size=batching.max_queue_size,
            size_of=lambda job: len(job.pixels),
            max_concurrent_batches=batching.max_concurrent_batches,
        )
        # Pillow's own bomb guard (a warning past MAX_IMAGE_PIXELS, an error past twice that) must not be
        # stricter than the configured limit, which the decoder checks from the header first.
        if Image.MAX_IMAGE_PIXELS is not None and config.max_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = config.max_pixels
        # Decoding and the per-image models (faces, OCR) run here, off the event loop.
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vision-cpu")

    async def start(self) -> None:
        await self.classify_batcher.start()

    async def close(self) -> None:
        await self.classify_batcher.close(drain=True)
        self.pool.shutdown(wait=True)

    async def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # -- validation ---------------------------------------------------------------------------------------------

    def _model(self, requested: common_pb2.ModelRef, served: str, where: str) -> common_pb2.ModelRef:
        return serving_model(requested, served, where, loaded=self.engine.loaded)

    async def _decode(self, images: Sequence[vision_pb2.Image], min_side: int | None = None) -> list[DecodedImage]:
        # The count is checked before any decoding work is queued.
        check_count(len(images), self.config)
        blobs = [image.data for image in images]
        return await self._in_pool(lambda: decode_all(blobs, self.config, min_side=min_side))

    @staticmethod
    def _check_fraction(name: str, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise InvalidArgument(f"{name} is {value}; it must lie between 0 and 1", reason="BAD_THRESHOLD")

    # -- methods ------------------------------------------------------------------------------------------------

    async def Classify(
        self, request: vision_pb2.VisionServiceClassifyRequest, context: Context
    ) -> vision_pb2.VisionServiceClassifyResponse:
        model = self._model(request.model, CLASSIFY_MODEL, "VisionService.Classify")
        top_k = request.top_k or DEFAULT_TOP_K
        if not 1 <= top_k <= NUM_CLASSES:
            raise InvalidArgument(
                f"top_k is {request.top_k}; send 1..{NUM_CLASSES} (0 means {DEFAULT_TOP_K})", reason="BAD_TOP_K"
            )
        terms = current_scope().queue_terms(request.meta.priority)
        # The classifier sees 256 pixels on the short side: large JPEGs need not be decoded in full.
        decoded = await self._decode(request.images, min_side=RESIZE_SIZE)
        pixels = await self._in_pool(lambda: np.stack([preprocess(d.image) for d in decoded]))
        labels = await self.classify_batcher.submit(ClassifyJob(pixels, top_k), **terms)
        return vision_pb2.VisionServiceClassifyResponse(
            model=model,
            results=[
                vision_pb2.ImageClassification(
                    labels=[
                        vision_pb2.ImageLabel(label=item.label, class_index=item.class_index, score=item.score)
                        for item in per_image
                    ],
                    width=image.width,
                    height=image.height,
                )
                for image, per_image in zip(decoded, labels, strict=True)
            ],
        )

    async def DetectFaces(
        self, request: vision_pb2.DetectFacesRequest, context: Context
    ) -> vision_pb2.DetectFacesResponse:
        model = self._model(request.model, FACE_MODEL, "VisionService.DetectFaces")
        self._check_fraction("min_score", request.min_score)
        priority_rank(request.meta.priority)  # faces and OCR are not queued by priority, but it must be valid
        if request.max_faces < 0:
            raise InvalidArgument(f"max_faces is {request.max_faces}; send 0 (no limit) or more", reason="BAD_LIMIT")
        decoded = await self._decode(request.images)
        results = []
        for image in decoded:
            faces = await self._in_pool(
                lambda i=image: self.engine.detect_faces(
                    i.image, min_score=request.min_score, max_faces=request.max_faces
                )
            )
            results.append(
                vision_pb2.ImageFaces(
                    faces=[
                        vision_pb2.Face(
                            box=_box(face.x, face.y, face.width, face.height),
                            score=face.score,
                            landmarks=[
                                vision_pb2.FaceLandmark(name=mark.name, point=vision_pb2.Point(x=mark.x, y=mark.y))
                                for mark in face.landmarks
                            ],
                        )
                        for face in faces
                    ],
                    width=image.width,
                    height=image.height,
                )
            )
        return vision_pb2.DetectFacesResponse(model=model, results=results)

    async def ReadText(self, request: vision_pb2.ReadTextRequest, context: Context) -> vision_pb2.ReadTextResponse:
        model = self._model(request.model, OCR_MODEL, "VisionService.ReadText")
        self._check_fraction("min_confidence", request.min_confidence)
        priority_rank(request.meta.priority)
        unsupported = [lang for lang in request.languages if lang.lower() not in OCR_LANGUAGES]
        if unsupported:
            raise InvalidArgument(
                f"languages {unsupported} are not supported by {OCR_MODEL}; supported: {', '.join(OCR_LANGUAGES)}",
                reason="UNSUPPORTED_LANGUAGE",
                metadata={"supported": ",".join(OCR_LANGUAGES)},
            )
        decoded = await self._decode(request.images)
        results = []
        for image in decoded:
            lines = await self._in_pool(
                lambda i=image: self.engine.read_text(i.image, min_confidence=request.min_confidence)
            )
            protos = []
            for line in lines:
                xs = [x for x, _ in line.polygon]
                ys = [y for _, y in line.polygon]
                protos.append(
                    vision_pb2.TextLine(
                        text=line.text,
                        polygon=[vision_pb2.Point(x=x, y=y) for x, y in line.polygon],
                        box=_box(min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)),
                        confidence=line.confidence,
                    )
                )
            results.append(
                vision_pb2.ImageText(
                    lines=protos,
                    text="\n".join(line.text for line in lines),
                    width=image.width,
                    height=image.height,
                )
            )
        return vision_pb2.ReadTextResponse(model=model, results=results)
