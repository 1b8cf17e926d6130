"""aimass.v1.VisionService: validate, decode, hand the work to the engine, shape the reply.

Request limits and model names are checked here; then every image's header (count, size, pixels per request),
before any pixel is decoded. Images are then decoded and run one at a time per request in a small worker pool,
each holding a share of the process's budget of decoded pixels (``budget.PixelBudget``: a bounded queue that
honours the call's deadline), with the deadline checked between images. The models live in ``engine``; errors
become statuses in the runtime's error interceptor. ``meta.priority`` orders the classifier's batch queue when the
replica is contended (higher priorities first).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import grpc
import numpy as np
from PIL import Image

from aimass.runtime.batcher import DynamicBatcher
from aimass.runtime.config import VisionConfig
from aimass.runtime.custom_heads import CustomHeads, custom_model
from aimass.runtime.errors import DeadlineExceeded, InvalidArgument
from aimass.runtime.models import serving_model
from aimass.runtime.scope import current_scope, deadline_of, priority_rank
from aimass.training.artifact import IMAGE_BACKBONE, HeadArtifact
from aimass.v1 import common_pb2, vision_pb2, vision_pb2_grpc
from services.vision.budget import PixelBudget
from services.vision.engine import (
    CLASSIFY_MODEL,
    FACE_MODEL,
    MODELS,
    NUM_CLASSES,
    OCR_LANGUAGES,
    OCR_MODEL,
    RESIZE_SIZE,
    ClassifyJob,
    FaceResult,
    Label,
    Tensor,
    TextLineResult,
    VisionEngine,
    preprocess,
)
from services.vision.images import ImageHeader, check_count, decode_image, probe_all, release_memory

Context = grpc.aio.ServicerContext[Any, Any]
DEFAULT_TOP_K = 5
# A request of one image up to this size has its header read on the event loop, not in the worker pool.
INLINE_PROBE_BYTES = 1 << 20
T = TypeVar("T")


def _box(x: float, y: float, width: float, height: float) -> vision_pb2.BoundingBox:
    return vision_pb2.BoundingBox(x=x, y=y, width=width, height=height)


class VisionServicer(vision_pb2_grpc.VisionServiceServicer):
    """``heads``: tenants' own image classifiers this replica hosts (Classify by their name), over EfficientNet-Lite0
    features (``ImageBackbone``, loaded with the first head: ``prepare_head``)."""

    def __init__(self, engine: VisionEngine, config: VisionConfig, heads: CustomHeads | None = None) -> None:
        self.engine = engine
        self.config = config
        self.heads = heads
        self.backbone: Any = None  # aimass.training.backbones.ImageBackbone, once a head needs it
        self._backbone_lock = asyncio.Lock()
        batching = config.classify_batching
        self.classify_batcher: DynamicBatcher[ClassifyJob, list[list[Label]]] = DynamicBatcher.from_config(
            engine.classify_batch, batching, name="classify", size_of=lambda job: len(job.pixels)
        )
        self.features_batcher: DynamicBatcher[Tensor, Tensor] = DynamicBatcher.from_config(
            self._features_batch, batching, name="image-features", size_of=len
        )
        # Pillow's own bomb guard (a warning past MAX_IMAGE_PIXELS, an error past twice that) must not be
        # stricter than the configured limit, which the decoder checks from the header first.
        if Image.MAX_IMAGE_PIXELS is not None and config.max_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = config.max_pixels
        # Decoding and the per-image models (faces, OCR) run here, off the event loop; the budget's slots match
        # the workers, so work never queues inside the pool, only in the budget's bounded, deadline-aware queue.
        self.pool = ThreadPoolExecutor(max_workers=config.decode_workers, thread_name_prefix="vision-cpu")
        self.budget = PixelBudget(config.decode_pixel_budget, config.decode_workers, config.max_decode_queue)

    async def start(self) -> None:
        await self.classify_batcher.start()
        await self.features_batcher.start()

    async def close(self) -> None:
        await self.classify_batcher.close(drain=True)
        await self.features_batcher.close(drain=True)
        self.pool.shutdown(wait=True)

    async def prepare_head(self, head: HeadArtifact) -> None:
        """Loads the image backbone (in a thread, once) before the first image head serves."""
        if head.base_model != IMAGE_BACKBONE or self.backbone is not None:
            return
        async with self._backbone_lock:
            if self.backbone is None:
                from aimass.training.backbones import ImageBackbone

                self.backbone = await asyncio.to_thread(ImageBackbone, self.config.device)

    def _features_batch(self, jobs: Sequence[Tensor]) -> list[Tensor]:
        """One backbone call for every image of every job, split back per job."""
        features: Tensor = self.backbone.features_of_pixels(np.concatenate(jobs))
        offsets = np.cumsum([len(job) for job in jobs])[:-1]
        return list(np.split(features, offsets))

    async def _held(self, pixels: int, deadline: float | None, what: str, fn: Callable[[], T]) -> T:
        """``fn`` in the worker pool, holding a decode slot and ``pixels`` of the budget until it has finished (a
        cancelled call releases them when the worker is done, not before: the memory is in use until then)."""
        await self.budget.acquire(pixels, deadline=deadline, what=what)
        trim = pixels >= self.config.trim_after_pixels

        def work() -> T:
            result = fn()  # the decoded image is dropped when fn returns, before the trim below
            if trim:
                release_memory()
            return result

        future = asyncio.get_running_loop().run_in_executor(self.pool, work)
        try:
            return await asyncio.shield(future)
        finally:
            if future.done():
                self.budget.release(pixels)
            else:  # cancelled while the worker still holds the image
                future.add_done_callback(lambda _: self.budget.release(pixels))

    # -- validation ---------------------------------------------------------------------------------------------

    def _model(self, requested: common_pb2.ModelRef, served: str, where: str) -> common_pb2.ModelRef:
        return serving_model(requested, served, where, loaded=self.engine.loaded)

    async def _probe(self, images: Sequence[vision_pb2.Image], deadline: float | None) -> list[ImageHeader]:
        # The count is checked before any work is queued; headers are read in the pool (no pixels: no budget).
        check_count(len(images), self.config)
        blobs = [image.data for image in images]
        idle = self.budget.waiting == 0 and self.budget.free_slots > 0
        if idle and len(blobs) == 1 and len(blobs[0]) <= INLINE_PROBE_BYTES:
            # One small image and an idle decoder: its header is read here (~25 µs) rather than in the pool, whose
            # hop costs a lone request ~0.4 ms (benchmarks/vision_batching.py, c=1). A busy decoder's queue keeps
            # its order: the probe waits its turn there.
            return probe_all(blobs, self.config)
        return await self._held(0, deadline, "this request", lambda: probe_all(blobs, self.config))

    @staticmethod
    def _check_time(deadline: float | None, done: int, total: int) -> None:
        if deadline is not None and asyncio.get_running_loop().time() >= deadline:
            raise DeadlineExceeded(
                f"the deadline passed after {done} of {total} images; send fewer images or allow more time",
                reason="DEADLINE_BETWEEN_IMAGES",
            )

    async def _each_image(
        self,
        images: Sequence[vision_pb2.Image],
        context: Context,
        work: Callable[[bytes, ImageHeader], T],
    ) -> list[tuple[ImageHeader, T]]:
        """``work`` for each image in turn, in the pool under the pixel budget, with the deadline checked before
        each (a cancelled call stops at the next await)."""
        deadline = deadline_of(context)
        headers = await self._probe(images, deadline)
        results = []
        for header in headers:
            self._check_time(deadline, header.index, len(headers))
            data = images[header.index].data
            result = await self._held(header.pixels, deadline, f"images[{header.index}]", partial(work, data, header))
            results.append((header, result))
        return results

    @staticmethod
    def _check_fraction(name: str, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise InvalidArgument(f"{name} is {value}; it must lie between 0 and 1", reason="BAD_THRESHOLD")

    # -- methods ------------------------------------------------------------------------------------------------

    @staticmethod
    def _top_k(requested: int, classes: int) -> int:
        top_k = requested or min(DEFAULT_TOP_K, classes)
        if not 1 <= top_k <= classes:
            raise InvalidArgument(
                f"top_k is {requested}; send 1..{classes} (0 means {min(DEFAULT_TOP_K, classes)})", reason="BAD_TOP_K"
            )
        return top_k

    async def _pixels(
        self, images: Sequence[vision_pb2.Image], context: Context
    ) -> tuple[list[tuple[int, int]], Tensor]:
        """Every image decoded and prepared for EfficientNet-Lite0: (width, height) of each, and (N, 3, 224, 224)."""

        # The classifier sees 256 pixels on the short side: large JPEGs need not be decoded in full, and only the
        # 224 x 224 input of each image outlives its decode.
        def prepare(data: bytes, header: ImageHeader) -> tuple[int, int, Tensor]:
            image = decode_image(data, header.index, self.config, min_side=RESIZE_SIZE)
            return image.width, image.height, preprocess(image.image)

        prepared = [result for _, result in await self._each_image(images, context, prepare)]
        self._check_time(deadline_of(context), len(prepared), len(prepared))
        return [(width, height) for width, height, _ in prepared], np.stack([tensor for _, _, tensor in prepared])

    async def Classify(
        self, request: vision_pb2.VisionServiceClassifyRequest, context: Context
    ) -> vision_pb2.VisionServiceClassifyResponse:
        custom = custom_model(
            self.heads,
            request.model,
            builtin=MODELS,
            served=CLASSIFY_MODEL,
            where="VisionService.Classify",
            loaded=self.engine.loaded,
        )
        if custom is not None:
            return await self._classify_with_head(request, context, *custom)
        model = self._model(request.model, CLASSIFY_MODEL, "VisionService.Classify")
        top_k = self._top_k(request.top_k, NUM_CLASSES)
        terms = current_scope().queue_terms(request.meta.priority)
        sizes, pixels = await self._pixels(request.images, context)
        labels = await self.classify_batcher.submit(ClassifyJob(pixels, top_k), **terms)
        return vision_pb2.VisionServiceClassifyResponse(
            model=model,
            results=[
                vision_pb2.ImageClassification(
                    labels=[
                        vision_pb2.ImageLabel(label=item.label, class_index=item.class_index, score=item.score)
                        for item in per_image
                    ],
                    width=width,
                    height=height,
                )
                for (width, height), per_image in zip(sizes, labels, strict=True)
            ],
        )

    async def _classify_with_head(
        self,
        request: vision_pb2.VisionServiceClassifyRequest,
        context: Context,
        model: common_pb2.ModelRef,
        head: HeadArtifact,
    ) -> vision_pb2.VisionServiceClassifyResponse:
        """A tenant's trained classifier: its head over EfficientNet-Lite0's pooled features of each image (what it
        was trained on); its top_k labels, best first."""
        top_k = self._top_k(request.top_k, len(head.labels))
        terms = current_scope().queue_terms(request.meta.priority)
        sizes, pixels = await self._pixels(request.images, context)
        if self.backbone is None:  # hosted heads load it before they serve; a head without it is a bug
            await self.prepare_head(head)
        probabilities = head.probabilities(await self.features_batcher.submit(pixels, **terms))
        results = []
        for (width, height), row in zip(sizes, probabilities, strict=True):
            top = np.argsort(-row, kind="stable")[:top_k]
            results.append(
                vision_pb2.ImageClassification(
                    labels=[
                        vision_pb2.ImageLabel(label=head.labels[i], class_index=int(i), score=float(row[i]))
                        for i in top
                    ],
                    width=width,
                    height=height,
                )
            )
        return vision_pb2.VisionServiceClassifyResponse(model=model, results=results)

    async def DetectFaces(
        self, request: vision_pb2.DetectFacesRequest, context: Context
    ) -> vision_pb2.DetectFacesResponse:
        model = self._model(request.model, FACE_MODEL, "VisionService.DetectFaces")
        self._check_fraction("min_score", request.min_score)
        priority_rank(request.meta.priority)  # faces and OCR are not queued by priority, but it must be valid
        if request.max_faces < 0:
            raise InvalidArgument(f"max_faces is {request.max_faces}; send 0 (no limit) or more", reason="BAD_LIMIT")
        max_side = self.config.face_max_side

        def detect(data: bytes, header: ImageHeader) -> tuple[int, int, list[FaceResult]]:
            image = decode_image(data, header.index, self.config, max_side=max_side)
            found = self.engine.detect_faces(
                image.image, min_score=request.min_score, max_faces=request.max_faces, full_width=image.width
            )
            return image.width, image.height, found

        results = []
        for _, (width, height, faces) in await self._each_image(request.images, context, detect):
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
                    width=width,
                    height=height,
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
        max_side = self.config.ocr_max_side

        def read(data: bytes, header: ImageHeader) -> tuple[int, int, list[TextLineResult]]:
            image = decode_image(data, header.index, self.config, max_side=max_side)
            found = self.engine.read_text(
                image.image, min_confidence=request.min_confidence, full_size=(image.width, image.height)
            )
            return image.width, image.height, found

        results = []
        for _, (width, height, lines) in await self._each_image(request.images, context, read):
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
                    width=width,
                    height=height,
                )
            )
        return vision_pb2.ReadTextResponse(model=model, results=results)
