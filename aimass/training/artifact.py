"""A trained head as bytes: the one format the trainer writes, replicas serve and the exporter fuses.

A head is a linear layer over a frozen backbone's features: ``logits = features @ weight.T + bias``, then softmax.
The features are fixed by ``base_model`` (``backbones.py`` computes them the same way everywhere):
- all-MiniLM-L6-v2: the sentence embedding, mean-pooled and L2-normalised (384 dimensions);
- efficientnet-lite0: the image's pooled features before ImageNet's classifier (1,280 dimensions).

The bytes are a NumPy ``.npz`` (no pickle) holding ``weight`` (classes x dims, float32), ``bias`` (classes) and
``meta``, a JSON document (labels, task, base model, seed, dataset hash, code version).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

FORMAT_VERSION: Final = 1
TEXT_TASK: Final = "text-classification"
IMAGE_TASK: Final = "image-classification"
TEXT_BACKBONE: Final = "all-MiniLM-L6-v2"
IMAGE_BACKBONE: Final = "efficientnet-lite0"
# Feature width of each backbone.
BACKBONE_DIMS: Final = {TEXT_BACKBONE: 384, IMAGE_BACKBONE: 1280}
TASK_OF_BACKBONE: Final = {TEXT_BACKBONE: TEXT_TASK, IMAGE_BACKBONE: IMAGE_TASK}
# The most an artifact may be when read back (a head over 1,280 features for 4,096 classes is 21 MB).
MAX_ARTIFACT_BYTES: Final = 64 << 20


class ArtifactError(ValueError):
    """Bytes that are not a head this version of aimass can serve."""


@dataclass(frozen=True)
class HeadArtifact:
    labels: tuple[str, ...]
    weight: npt.NDArray[np.float32]  # classes x dims
    bias: npt.NDArray[np.float32]  # classes
    base_model: str
    task: str
    # Anything else worth keeping with the weights: seed, dataset_sha256, code_version, hyperparameters.
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.base_model not in BACKBONE_DIMS:
            raise ArtifactError(f"unknown base model {self.base_model!r}; known: {', '.join(BACKBONE_DIMS)}")
        dims = BACKBONE_DIMS[self.base_model]
        classes = len(self.labels)
        if classes < 2 or len(set(self.labels)) != classes:
            raise ArtifactError(f"a head needs two or more distinct labels, got {classes}")
        if self.weight.shape != (classes, dims) or self.bias.shape != (classes,):
            raise ArtifactError(
                f"weights of shape {self.weight.shape} and bias {self.bias.shape} do not fit {classes} labels over "
                f"{dims} features of {self.base_model}"
            )

    def logits(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        result: npt.NDArray[np.float32] = features.astype(np.float32) @ self.weight.T + self.bias
        return result

    def probabilities(self, features: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return softmax(self.logits(features))

    def to_bytes(self) -> bytes:
        meta = {
            "format": FORMAT_VERSION,
            "labels": list(self.labels),
            "base_model": self.base_model,
            "task": self.task,
            "info": self.info,
        }
        buffer = io.BytesIO()
        np.savez(
            buffer,
            weight=self.weight.astype(np.float32),
            bias=self.bias.astype(np.float32),
            meta=np.array(json.dumps(meta, sort_keys=True)),
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> HeadArtifact:
        if len(data) > MAX_ARTIFACT_BYTES:
            raise ArtifactError(f"artifact of {len(data)} bytes is over the {MAX_ARTIFACT_BYTES} allowed")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                weight = np.asarray(npz["weight"], dtype=np.float32)
                bias = np.asarray(npz["bias"], dtype=np.float32)
                meta = json.loads(str(npz["meta"]))
        except (OSError, ValueError, KeyError) as e:
            raise ArtifactError(f"not a head artifact: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
            raise ArtifactError(f"head artifact format {meta.get('format') if isinstance(meta, dict) else '?'}")
        return cls(
            labels=tuple(str(label) for label in meta["labels"]),
            weight=weight,
            bias=bias,
            base_model=str(meta["base_model"]),
            task=str(meta["task"]),
            info=dict(meta.get("info", {})),
        )


def softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    result: npt.NDArray[np.float32] = (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)
    return result
