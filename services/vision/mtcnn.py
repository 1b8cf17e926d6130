"""MTCNN face detection: the three networks of facenet-pytorch with its trained weights, and the project's own
cascade (image pyramid → P-Net proposals → R-Net refinement → O-Net boxes and 5 landmarks) with numpy NMS.

The facenet_pytorch package itself cannot be imported here (it imports torchvision, which does not load beside
this torch), so the network definitions are restated below, layer for layer, and only its weight files are used.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.nn.functional import interpolate

from services.vision.nms import nms

FloatArray = npt.NDArray[np.float32]
# MTCNN gives the eyes and mouth corners in image order (left of the picture first), which is the subject's right;
# the contract names them from the subject's side.
LANDMARK_NAMES = ("right_eye", "left_eye", "nose", "mouth_right", "mouth_left")


def weights_dir() -> Path:
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or spec.origin is None:
        raise RuntimeError("facenet-pytorch is not installed (pip install --no-deps facenet-pytorch==2.6.0)")
    return Path(spec.origin).parent / "data"


class PNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, kernel_size=3)
        self.prelu1 = nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(10, 16, kernel_size=3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, kernel_size=1)
        self.conv4_2 = nn.Conv2d(32, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.prelu1(self.conv1(x))
        x = self.pool1(x)
        x = self.prelu2(self.conv2(x))
        x = self.prelu3(self.conv3(x))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, kernel_size=3)
        self.prelu1 = nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(28, 48, kernel_size=3)
        self.prelu2 = nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(48, 64, kernel_size=2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(576, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        # The weights were converted from Caffe, whose flattening order is (W, H, C).
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


class ONet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


@dataclass(frozen=True)
class FaceBox:
    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    landmarks: tuple[tuple[float, float], ...]  # LANDMARK_NAMES order


def _load(net: nn.Module, name: str, device: str) -> nn.Module:
    state = torch.load(weights_dir() / f"{name}.pt", map_location="cpu", weights_only=True)
    # The package's modules hold their softmax as a layer without weights; only learned tensors are loaded.
    net.load_state_dict(state)
    return net.to(device).eval()


def _square(boxes: FloatArray) -> FloatArray:
    """Grow each box to a square around its centre (the next stage's input is square)."""
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _regress(boxes: FloatArray, reg: FloatArray) -> FloatArray:
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out[:, 0] += reg[:, 0] * w
    out[:, 1] += reg[:, 1] * h
    out[:, 2] += reg[:, 2] * w
    out[:, 3] += reg[:, 3] * h
    return out


class Mtcnn:
    """One image at a time (images differ in size); thresholds and pyramid factor are MTCNN's published ones."""

    def __init__(
        self,
        device: str = "cpu",
        *,
        min_face_size: int = 20,
        thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
    ) -> None:
        self.device = device
        self.min_face_size = min_face_size
        self.thresholds = thresholds
        self.factor = factor
        self.pnet = _load(PNet(), "pnet", device)
        self.rnet = _load(RNet(), "rnet", device)
        self.onet = _load(ONet(), "onet", device)

    @torch.inference_mode()
    def detect(self, rgb: npt.NDArray[np.uint8]) -> list[FaceBox]:
        # A copy: arrays from PIL are read-only, which torch warns about.
        image = torch.from_numpy(np.array(rgb, dtype=np.uint8)).to(self.device).permute(2, 0, 1)[None].float()
        h, w = rgb.shape[:2]
        boxes = self._propose(image, h, w)
        if len(boxes):
            boxes = self._refine(image, boxes, h, w)
        if not len(boxes):
            return []
        return self._output(image, boxes, h, w)

    def _pyramid(self, h: int, w: int) -> list[float]:
        scale = 12.0 / self.min_face_size
        side = min(h, w) * scale
        scales = []
        while side >= 12:
            scales.append(scale)
            scale *= self.factor
            side *= self.factor
        return scales

    def _propose(self, image: torch.Tensor, h: int, w: int) -> FloatArray:
        found: list[FloatArray] = []
        for scale in self._pyramid(h, w):
            scaled = interpolate(image, size=(int(h * scale + 1), int(w * scale + 1)), mode="area")
            reg_t, probs_t = self.pnet((scaled - 127.5) * 0.0078125)
            probs = probs_t[0, 1].cpu().numpy()
            ys, xs = np.nonzero(probs >= self.thresholds[0])
            if not len(ys):
                continue
            reg = reg_t[0].cpu().numpy()[:, ys, xs].T
            # P-Net is a 12x12 window slid with stride 2 over the scaled image.
            x1 = np.floor((2 * xs + 1) / scale)
            y1 = np.floor((2 * ys + 1) / scale)
            x2 = np.floor((2 * xs + 12) / scale)
            y2 = np.floor((2 * ys + 12) / scale)
            candidates = np.column_stack([x1, y1, x2, y2, probs[ys, xs], reg]).astype(np.float32)
            found.append(candidates[nms(candidates[:, :4], candidates[:, 4], 0.5)])
        if not found:
            return np.empty((0, 5), dtype=np.float32)
        boxes = np.concatenate(found)
        boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
        # Unlike the later stages, P-Net's regression is relative to the box size without the +1.
        bw = boxes[:, 2] - boxes[:, 0]
        bh = boxes[:, 3] - boxes[:, 1]
        refined = np.column_stack(
            [
                boxes[:, 0] + boxes[:, 5] * bw,
                boxes[:, 1] + boxes[:, 6] * bh,
                boxes[:, 2] + boxes[:, 7] * bw,
                boxes[:, 3] + boxes[:, 8] * bh,
                boxes[:, 4],
            ]
        ).astype(np.float32)
        return _square(refined)

    def _crops(
        self, image: torch.Tensor, boxes: FloatArray, h: int, w: int, size: int
    ) -> tuple[torch.Tensor, FloatArray]:
        """Crops of the boxes (clipped to the image) resized to size x size, and the boxes that gave a crop."""
        coords = np.trunc(boxes[:, :4]).astype(np.int64)
        x = np.maximum(coords[:, 0], 1)
        y = np.maximum(coords[:, 1], 1)
        ex = np.minimum(coords[:, 2], w)
        ey = np.minimum(coords[:, 3], h)
        crops = []
        kept = []
        for k in range(len(boxes)):
            if ey[k] > y[k] - 1 and ex[k] > x[k] - 1:
                crop = image[:, :, y[k] - 1 : ey[k], x[k] - 1 : ex[k]]
                crops.append(interpolate(crop, size=(size, size), mode="area"))
                kept.append(k)
        if not crops:
            return torch.empty(0, 3, size, size), boxes[:0]
        return (torch.cat(crops) - 127.5) * 0.0078125, boxes[kept]

    def _refine(self, image: torch.Tensor, boxes: FloatArray, h: int, w: int) -> FloatArray:
        crops, boxes = self._crops(image, boxes, h, w, 24)
        if not len(boxes):
            return boxes
        reg_t, probs_t = self.rnet(crops)
        scores = probs_t[:, 1].cpu().numpy()
        keep = scores > self.thresholds[1]
        boxes = np.column_stack([boxes[keep, :4], scores[keep]]).astype(np.float32)
        reg = reg_t.cpu().numpy()[keep]
        picked = nms(boxes[:, :4], boxes[:, 4], 0.7)
        return _square(_regress(boxes[picked], reg[picked]))

    def _output(self, image: torch.Tensor, boxes: FloatArray, h: int, w: int) -> list[FaceBox]:
        crops, boxes = self._crops(image, boxes, h, w, 48)
        if not len(boxes):
            return []
        reg_t, points_t, probs_t = self.onet(crops)
        scores = probs_t[:, 1].cpu().numpy()
        keep = scores > self.thresholds[2]
        boxes = np.column_stack([boxes[keep, :4], scores[keep]]).astype(np.float32)
        points = points_t.cpu().numpy()[keep]
        reg = reg_t.cpu().numpy()[keep]
        # Landmarks are fractions of the (pre-regression) box: 5 x values, then 5 y values.
        bw = boxes[:, 2] - boxes[:, 0] + 1
        bh = boxes[:, 3] - boxes[:, 1] + 1
        px = bw[:, None] * points[:, :5] + boxes[:, 0:1] - 1
        py = bh[:, None] * points[:, 5:10] + boxes[:, 1:2] - 1
        boxes = _regress(boxes, reg)
        picked = nms(boxes[:, :4], boxes[:, 4], 0.7, method="min")
        faces = []
        for i in picked:
            x1, y1, x2, y2, score = (float(v) for v in boxes[i])
            faces.append(
                FaceBox(
                    x1=max(0.0, x1),
                    y1=max(0.0, y1),
                    x2=min(float(w), x2),
                    y2=min(float(h), y2),
                    score=score,
                    landmarks=tuple((float(px[i, j]), float(py[i, j])) for j in range(5)),
                )
            )
        return faces
