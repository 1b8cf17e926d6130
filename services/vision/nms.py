"""Greedy non-maximum suppression in numpy (torchvision's nms is unavailable beside this torch build)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


def nms(boxes: FloatArray, scores: FloatArray, threshold: float, method: Literal["union", "min"] = "union") -> IntArray:
    """Indices of the boxes (x1, y1, x2, y2) kept, highest score first.

    A box is dropped when its overlap with a kept, higher-scoring box exceeds ``threshold``; overlap is IoU
    ("union") or intersection over the smaller area ("min", MTCNN's last stage: drops boxes nested in others).
    """
    if len(boxes) == 0:
        return np.empty(0, dtype=np.int64)
    x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) for i in range(4))
    # MTCNN's pixel-inclusive convention: a box from 0 to 9 is 10 pixels wide.
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best = int(order[0])
        keep.append(best)
        rest = order[1:]
        width = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        height = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        inter = width * height
        if method == "min":
            overlap = inter / np.minimum(areas[best], areas[rest])
        else:
            overlap = inter / (areas[best] + areas[rest] - inter)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)
