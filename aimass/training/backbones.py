"""The frozen backbones a head sits on: features computed the same way in the trainer and the serving replicas.

- ``TextBackbone``: all-MiniLM-L6-v2 loaded as the NLP replicas load it (``services.nlp.engine.load_minilm``); a
  text's features are its sentence embedding, mean-pooled and L2-normalised: ``NlpEngine.encode(texts,
  normalize=True)``.
- ``ImageBackbone``: EfficientNet-Lite0 built as the vision replicas build it
  (``services.vision.engine.build_torch_classifier``); an image's features are the 1,280 globally average-pooled
  activations of the last convolution, i.e. what ImageNet's classifier (dropout, then ``_fc``) reads, after the
  vision service's preprocessing (short side 256, centre crop 224, ImageNet mean and std).

Both are in eval mode and run under ``torch.inference_mode``: the same inputs give the same features every time.
``ImageBackbone.module`` is the pixels -> features ``torch.nn.Module``, for the ONNX exporter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from aimass.runtime.errors import InvalidArgument
from aimass.training.artifact import BACKBONE_DIMS, IMAGE_BACKBONE, TEXT_BACKBONE

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Features = npt.NDArray[np.float32]


class TextBackbone:
    """all-MiniLM-L6-v2 sentence embeddings, L2-normalised (384 dimensions)."""

    base_model = TEXT_BACKBONE
    dims = BACKBONE_DIMS[TEXT_BACKBONE]

    def __init__(self, device: str = "cpu") -> None:
        from services.nlp.engine import load_minilm

        started = time.monotonic()
        self.model: Any = load_minilm(device)
        self.model.eval()
        self.device = str(self.model.device)
        log.info("text backbone %s loaded on %s in %.1f s", self.base_model, self.device, time.monotonic() - started)

    def features(self, texts: Sequence[str], batch_size: int = 64, progress: Progress | None = None) -> Features:
        """(N, 384) float32, one row per text, in order; ``progress(done, total)`` after each batch."""
        import torch

        if batch_size < 1:
            raise InvalidArgument(f"batch_size is {batch_size}; it must be 1 or more")
        total = len(texts)
        parts: list[Features] = []
        with torch.inference_mode():
            for start in range(0, total, batch_size):
                batch = list(texts[start : start + batch_size])
                vectors = self.model.encode(
                    batch,
                    batch_size=len(batch),
                    convert_to_numpy=True,
                    normalize_embeddings=True,
                    show_progress_bar=False,
                )
                parts.append(np.asarray(vectors, dtype=np.float32))
                if progress is not None:
                    progress(start + len(batch), total)
        if not parts:
            return np.zeros((0, self.dims), dtype=np.float32)
        return np.concatenate(parts)


class ImageBackbone:
    """EfficientNet-Lite0's pooled features before ImageNet's classifier (1,280 dimensions)."""

    base_model = IMAGE_BACKBONE
    dims = BACKBONE_DIMS[IMAGE_BACKBONE]

    def __init__(self, device: str = "cpu") -> None:
        import torch

        from services.vision.engine import build_torch_classifier, pick_device

        started = time.monotonic()
        self.device = pick_device(device)
        module = pooled_features_module(build_torch_classifier()).to(self.device).eval()
        # channels-last convolutions are about twice as fast on CPUs (the same features to ~1e-6).
        self.module: Any = module.to(memory_format=torch.channels_last)
        log.info("image backbone %s loaded on %s in %.1f s", self.base_model, self.device, time.monotonic() - started)

    @staticmethod
    def preprocess(image: Image.Image) -> Features:
        """Any PIL image -> (3, 224, 224) float32, exactly as the vision service prepares it (RGB first)."""
        from services.vision.engine import preprocess

        if image.mode != "RGB":
            image = image.convert("RGB")
        return preprocess(image)

    def features(
        self, images: Sequence[Image.Image], batch_size: int = 32, progress: Progress | None = None
    ) -> Features:
        """(N, 1280) float32, one row per image, in order; ``progress(done, total)`` after each batch."""
        if batch_size < 1:
            raise InvalidArgument(f"batch_size is {batch_size}; it must be 1 or more")
        total = len(images)
        parts: list[Features] = []
        for start in range(0, total, batch_size):
            batch = images[start : start + batch_size]
            pixels = np.stack([self.preprocess(image) for image in batch])
            parts.append(self.features_of_pixels(pixels))
            if progress is not None:
                progress(start + len(batch), total)
        if not parts:
            return np.zeros((0, self.dims), dtype=np.float32)
        return np.concatenate(parts)

    def features_of_pixels(self, pixels: Features) -> Features:
        """Preprocessed pixels (N, 3, 224, 224) -> (N, 1280)."""
        import torch

        with torch.inference_mode():
            tensor = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device)
            tensor = tensor.contiguous(memory_format=torch.channels_last)
            result: Features = self.module(tensor).float().cpu().numpy()
        return result


def pooled_features_module(classifier: Any) -> Any:
    """Wraps an EfficientNet (efficientnet_lite_pytorch) as pixels -> pooled features, without dropout and ``_fc``:
    the part of its ``forward`` before the classifier."""
    import torch

    class PooledFeatures(torch.nn.Module):
        def __init__(self, net: Any) -> None:
            super().__init__()
            self.net = net

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            maps = self.net.extract_features(pixels)
            return torch.flatten(self.net._avg_pooling(maps), 1)

    if getattr(classifier._global_params, "local_pooling", False):
        raise ValueError("EfficientNet with local pooling is not the Lite0 the vision service serves")
    return PooledFeatures(classifier)


def load_backbone(base_model: str, device: str = "cpu") -> TextBackbone | ImageBackbone:
    """The backbone named by an artifact's ``base_model``."""
    if base_model == TEXT_BACKBONE:
        return TextBackbone(device)
    if base_model == IMAGE_BACKBONE:
        return ImageBackbone(device)
    raise InvalidArgument(f"unknown base model {base_model!r}; known: {', '.join(BACKBONE_DIMS)}")
