"""Edge export on the real backbones: the ZIP's one ONNX graph (backbone and head fused) gives, under onnxruntime,
the labels and probabilities the head gives on features computed as the replicas compute them; the ZIP's example.py
classifies texts and images in a process that cannot import aimass nor torch; the backbone is exported once."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort  # type: ignore[import-untyped]
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits  # type: ignore[import-untyped]
from tokenizers import Tokenizer

from aimass.datasets.samples import tickets_csv
from aimass.runtime.errors import InvalidArgument
from aimass.training.artifact import IMAGE_BACKBONE, IMAGE_TASK, TEXT_BACKBONE, TEXT_TASK, HeadArtifact
from aimass.training.backbones import ImageBackbone, TextBackbone
from aimass.training.export import export_zip
from aimass.training.head import HeadSettings, train_head
from services.vision.engine import build_torch_classifier, preprocess

Features = npt.NDArray[np.float32]

# Runs example.py as `python example.py ARGS` would, with every import of aimass, the repository's other packages
# and torch refused: what it prints comes from onnxruntime, numpy and tokenizers / Pillow alone.
ISOLATED_RUNNER = """
import runpy, sys
REFUSED = {"aimass", "services", "scheduler", "gateway", "simulator", "torch", "transformers", "sentence_transformers"}
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in REFUSED:
            raise ModuleNotFoundError(f"No module named {name!r} (refused: the example must run without it)")
        return None
sys.meta_path.insert(0, Refuse())
sys.argv = ["example.py", *sys.argv[1:]]
runpy.run_path("example.py", run_name="__main__")
"""


class Exports:
    """One backbone cache for the module, and how long the first (uncached) export of each backbone took."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self.first_seconds: dict[str, float] = {}
        self.messages: list[str] = []

    def export(self, head: HeadArtifact, version: str = "3") -> bytes:
        started = time.monotonic()
        data = export_zip(
            head, model_name="ticket-router", version=version, cache_dir=self.cache_dir, progress=self.messages.append
        )
        self.first_seconds.setdefault(head.base_model, time.monotonic() - started)
        return data


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    return Exports(tmp_path_factory.mktemp("export-cache"))


# Text


@pytest.fixture(scope="module")
def text_backbone() -> TextBackbone:
    return TextBackbone("cpu")


@pytest.fixture(scope="module")
def tickets(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[str]]:
    """300 support tickets (the sample dataset) and one text far past MiniLM's 256 tokens, which must be truncated
    the same way in the export."""
    path = tickets_csv(tmp_path_factory.mktemp("tickets") / "tickets.csv", rows=300, seed=7)
    with path.open(encoding="utf-8", newline="") as file:
        rows = [[row["text"], row["label"]] for row in csv.DictReader(file)]
    long_text = "My invoice shows a second charge for the Pro plan. " * 60 + "Also the app crashes on login."
    texts = [text for text, _ in rows] + [long_text]
    labels = [label for _, label in rows] + ["billing"]
    return texts, labels


@pytest.fixture(scope="module")
def text_features(text_backbone: TextBackbone, tickets: tuple[list[str], list[str]]) -> Features:
    """The reference: MiniLM's sentence embeddings normalised, the call NlpEngine.encode(normalize=True) makes (in
    batches of 32: one batch would pad every ticket to the long text's 256 tokens)."""
    texts, _ = tickets
    features: Features = text_backbone.model.encode(
        texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
    )
    return features


@pytest.fixture(scope="module")
def text_head(text_features: Features, tickets: tuple[list[str], list[str]]) -> HeadArtifact:
    """A head trained by the trainer's own code on the first 200 tickets."""
    _, labels = tickets
    info = {"dataset_sha256": "ab" * 32, "seed": 0, "metrics": {"accuracy": 0.97}}
    return train_head(
        text_features[:200],
        labels[:200],
        HeadSettings(epochs=40, batch_size=64, seed=0),
        base_model=TEXT_BACKBONE,
        task=TEXT_TASK,
        info=info,
    )


@pytest.fixture(scope="module")
def text_zip(exports: Exports, text_head: HeadArtifact) -> bytes:
    return exports.export(text_head)


def random_head(base_model: str, task: str, classes: int, dims: int, scale: float) -> HeadArtifact:
    """Random weights large enough that the probabilities spread over the classes: the fusion check."""
    rng = np.random.default_rng(11)
    return HeadArtifact(
        labels=tuple(f"class {n}" for n in range(classes)),
        weight=(rng.standard_normal((classes, dims)) * scale).astype(np.float32),
        bias=rng.standard_normal(classes).astype(np.float32),
        base_model=base_model,
        task=task,
    )


def unzip(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def run_text_graph(files: dict[str, bytes], texts: list[str]) -> Features:
    """The exported graph under onnxruntime, its inputs prepared with the ZIP's tokenizer.json only."""
    tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode())
    session = ort.InferenceSession(files["model.onnx"], providers=["CPUExecutionProvider"])
    rows = []
    for start in range(0, len(texts), 32):
        encodings = tokenizer.encode_batch(texts[start : start + 32])
        feeds = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }
        rows.append(session.run(["probabilities"], feeds)[0])
    return np.concatenate(rows)


def assert_same_answers(exported: Features, expected: Features) -> None:
    assert exported.shape == expected.shape
    same_labels = float(np.mean(exported.argmax(axis=1) == expected.argmax(axis=1)))
    assert same_labels >= 0.99, f"the export agrees with the head on {same_labels:.1%} of inputs"
    np.testing.assert_allclose(exported, expected, atol=1e-3)


def test_reference_text_features_are_the_trainers(
    text_backbone: TextBackbone, text_features: Features, tickets: tuple[list[str], list[str]]
) -> None:
    texts, _ = tickets
    np.testing.assert_allclose(text_backbone.features(texts[:64]), text_features[:64], atol=1e-5)


def test_text_export_answers_as_the_head_on_held_out_tickets(
    text_zip: bytes, text_head: HeadArtifact, text_features: Features, tickets: tuple[list[str], list[str]]
) -> None:
    texts, labels = tickets
    held_out = slice(200, None)  # 100 tickets the head never saw, and the long text
    files = unzip(text_zip)
    exported = run_text_graph(files, texts[held_out])
    expected = text_head.probabilities(text_features[held_out])
    assert_same_answers(exported, expected)
    # The model is worth exporting: it labels unseen tickets mostly right.
    predicted = [text_head.labels[i] for i in exported.argmax(axis=1)]
    accuracy = np.mean([p == t for p, t in zip(predicted, labels[held_out], strict=True)])
    assert accuracy > 0.8, f"held-out accuracy {accuracy:.2f}"


def test_text_graph_fuses_any_head_exactly(
    exports: Exports, text_features: Features, tickets: tuple[list[str], list[str]]
) -> None:
    head = random_head(TEXT_BACKBONE, TEXT_TASK, classes=7, dims=384, scale=3.0)
    files = unzip(exports.export(head))
    texts, _ = tickets
    exported = run_text_graph(files, texts[:100])
    expected = head.probabilities(text_features[:100])
    assert expected.max(axis=1).mean() < 0.95, "the random head should not be near-certain on everything"
    assert_same_answers(exported, expected)


def test_text_zip_holds_the_graph_preprocessing_labels_and_card(text_zip: bytes, text_head: HeadArtifact) -> None:
    files = unzip(text_zip)
    assert set(files) == {
        "model.onnx",
        "preprocess.json",
        "tokenizer.json",
        "labels.json",
        "model.json",
        "example.py",
        "README.md",
    }
    model = onnx.load_from_string(files["model.onnx"])
    onnx.checker.check_model(model)
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert set(inputs) == {"input_ids", "attention_mask"}
    for tensor_type in inputs.values():
        assert tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in tensor_type.shape.dim] == ["batch", "sequence"]
    (output,) = model.graph.output
    assert output.name == "probabilities"
    assert [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim] == ["batch", len(text_head.labels)]
    assert json.loads(files["labels.json"]) == list(text_head.labels)
    card = json.loads(files["model.json"])
    assert (card["name"], card["version"], card["task"], card["base_model"]) == (
        "ticket-router",
        "3",
        TEXT_TASK,
        TEXT_BACKBONE,
    )
    assert card["labels"] == list(text_head.labels)
    assert card["info"]["dataset_sha256"] == "ab" * 32 and card["info"]["metrics"] == {"accuracy": 0.97}
    assert card["created"] and card["code_version"].startswith("aimass ")
    spec = json.loads(files["preprocess.json"])
    assert spec["tokenizer"]["file"] == "tokenizer.json" and spec["tokenizer"]["max_length"] == 256
    tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode())
    assert len(tokenizer.encode("word " * 1000).ids) == 256
    assert "pip install onnxruntime numpy tokenizers" in files["README.md"].decode()


# Images


@pytest.fixture(scope="module")
def image_backbone() -> ImageBackbone:
    return ImageBackbone("cpu")


@pytest.fixture(scope="module")
def digit_images() -> tuple[list[Image.Image], list[str]]:
    """150 of scikit-learn's digits as RGB images of varied sizes and shapes (square, wide, tall), so the resize and
    centre crop are exercised, not only a square upscale."""
    digits = load_digits()
    sizes = [(32, 32), (48, 30), (30, 52), (300, 260), (224, 224)]
    images = [
        Image.fromarray((pixels * (255 / 16)).astype(np.uint8))
        .resize(sizes[n % len(sizes)], Image.Resampling.BICUBIC)
        .convert("RGB")
        for n, pixels in enumerate(digits.images[:150])
    ]
    return images, [str(target) for target in digits.target[:150]]


@pytest.fixture(scope="module")
def image_features(digit_images: tuple[list[Image.Image], list[str]]) -> Features:
    """The reference: what EfficientNet-Lite0's ImageNet classifier reads (the input of ``_fc``), on the vision
    service's preprocessing, taken from the classifier itself with a hook."""
    images, _ = digit_images
    # channels-last convolutions: the same features, about twice as fast on CPUs.
    classifier = build_torch_classifier().to(memory_format=torch.channels_last)
    captured: list[torch.Tensor] = []
    handle = classifier._fc.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        with torch.inference_mode():
            for start in range(0, len(images), 50):
                pixels = np.stack([preprocess(image) for image in images[start : start + 50]])
                classifier(torch.from_numpy(pixels).contiguous(memory_format=torch.channels_last))
    finally:
        handle.remove()
    return torch.cat(captured).numpy().astype(np.float32)


@pytest.fixture(scope="module")
def image_head(image_features: Features, digit_images: tuple[list[Image.Image], list[str]]) -> HeadArtifact:
    _, labels = digit_images
    return train_head(
        image_features[:100],
        labels[:100],
        HeadSettings(epochs=60, batch_size=64, seed=0),
        base_model=IMAGE_BACKBONE,
        task=IMAGE_TASK,
        info={"dataset_sha256": "cd" * 32, "seed": 0},
    )


@pytest.fixture(scope="module")
def image_zip(exports: Exports, image_head: HeadArtifact) -> bytes:
    return exports.export(image_head, version="1")


def run_image_graph(files: dict[str, bytes], images: list[Image.Image]) -> Features:
    """The exported graph under onnxruntime, its pixels prepared as preprocess.json says (read from the ZIP)."""
    spec = json.loads(files["preprocess.json"])["image"]
    mean, std, size = np.array(spec["mean"], np.float32), np.array(spec["std"], np.float32), spec["size"]
    batch = []
    for image in images:
        scale = spec["resize"]["short_side"] / min(image.size)
        resized = image.resize(
            (max(size, round(image.width * scale)), max(size, round(image.height * scale))),
            Image.Resampling.BILINEAR,
            reducing_gap=3.0,
        )
        left, top = (resized.width - size) // 2, (resized.height - size) // 2
        crop = resized.crop((left, top, left + size, top + size))
        batch.append(((np.asarray(crop, np.float32) - mean) / std).transpose(2, 0, 1))
    session = ort.InferenceSession(files["model.onnx"], providers=["CPUExecutionProvider"])
    result: Features = session.run(["probabilities"], {"pixel_values": np.stack(batch)})[0]
    return result


def test_reference_image_features_are_the_trainers(
    image_backbone: ImageBackbone, image_features: Features, digit_images: tuple[list[Image.Image], list[str]]
) -> None:
    images, _ = digit_images
    np.testing.assert_allclose(image_backbone.features(images[:20]), image_features[:20], atol=1e-4)


def test_image_export_answers_as_the_head_on_held_out_digits(
    image_zip: bytes,
    image_head: HeadArtifact,
    image_features: Features,
    digit_images: tuple[list[Image.Image], list[str]],
) -> None:
    images, labels = digit_images
    files = unzip(image_zip)
    exported = run_image_graph(files, images[100:])
    assert_same_answers(exported, image_head.probabilities(image_features[100:]))
    predicted = [image_head.labels[i] for i in exported.argmax(axis=1)]
    accuracy = np.mean([p == t for p, t in zip(predicted, labels[100:], strict=True)])
    assert accuracy > 0.5, f"held-out accuracy {accuracy:.2f} (chance: 0.1)"


def test_image_graph_fuses_any_head_exactly(
    exports: Exports, image_features: Features, digit_images: tuple[list[Image.Image], list[str]]
) -> None:
    head = random_head(IMAGE_BACKBONE, IMAGE_TASK, classes=5, dims=1280, scale=0.3)
    files = unzip(exports.export(head))
    images, _ = digit_images
    exported = run_image_graph(files, images[100:])
    expected = head.probabilities(image_features[100:])
    assert expected.max(axis=1).mean() < 0.95, "the random head should not be near-certain on everything"
    assert_same_answers(exported, expected)


def test_image_zip_says_how_to_prepare_pixels(image_zip: bytes, image_head: HeadArtifact) -> None:
    files = unzip(image_zip)
    assert "tokenizer.json" not in files
    model = onnx.load_from_string(files["model.onnx"])
    (pixels,) = model.graph.input
    assert pixels.name == "pixel_values" and pixels.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in pixels.type.tensor_type.shape.dim] == ["batch", 3, 224, 224]
    spec = json.loads(files["preprocess.json"])["image"]
    assert (spec["size"], spec["layout"], spec["channel_order"], spec["resize"]["short_side"]) == (
        224,
        "NCHW",
        "RGB",
        256,
    )
    np.testing.assert_allclose(spec["mean"], [123.675, 116.28, 103.53], atol=1e-3)
    np.testing.assert_allclose(spec["std"], [58.395, 57.12, 57.375], atol=1e-3)
    assert json.loads(files["model.json"])["version"] == "1"
    assert "pip install onnxruntime numpy Pillow" in files["README.md"].decode()


# The example, without aimass


@pytest.fixture
def isolated_env() -> Iterator[dict[str, str]]:
    yield {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}


def run_example(zip_bytes: bytes, folder: Path, args: list[str], env: dict[str, str]) -> list[list[str]]:
    """Extracts the ZIP into ``folder`` (outside the repository) and runs its example.py there, isolated (-I: no
    PYTHONPATH, no user site, not even the script's folder on the path), with aimass and torch refused."""
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as archive:
        archive.extractall(folder)
    done = subprocess.run(
        [sys.executable, "-I", "-c", ISOLATED_RUNNER, *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [line.split("\t") for line in done.stdout.splitlines()]


def test_the_text_example_runs_without_aimass(
    text_zip: bytes,
    text_head: HeadArtifact,
    text_features: Features,
    tickets: tuple[list[str], list[str]],
    tmp_path: Path,
    isolated_env: dict[str, str],
) -> None:
    texts, _ = tickets
    chosen = [200, 201, 202, 300]  # three held-out tickets and the long one
    lines = run_example(text_zip, tmp_path, [texts[n] for n in chosen], isolated_env)
    expected = text_head.probabilities(text_features[chosen])
    assert [line[0] for line in lines] == [text_head.labels[i] for i in expected.argmax(axis=1)]
    assert [line[2] for line in lines] == [texts[n] for n in chosen]
    np.testing.assert_allclose([float(line[1]) for line in lines], expected.max(axis=1), atol=2e-3)


def test_the_image_example_runs_without_aimass(
    image_zip: bytes,
    image_head: HeadArtifact,
    image_features: Features,
    digit_images: tuple[list[Image.Image], list[str]],
    tmp_path: Path,
    isolated_env: dict[str, str],
) -> None:
    images, _ = digit_images
    chosen = [100, 101, 102]  # square, wide and tall
    paths = []
    for n in chosen:
        paths.append(str(tmp_path / f"digit-{n}.png"))
        images[n].save(paths[-1])
    lines = run_example(image_zip, tmp_path / "export", paths, isolated_env)
    expected = image_head.probabilities(image_features[chosen])
    assert [line[0] for line in lines] == [image_head.labels[i] for i in expected.argmax(axis=1)]
    np.testing.assert_allclose([float(line[1]) for line in lines], expected.max(axis=1), atol=2e-3)


# The cache and the refusals


def test_later_exports_reuse_the_exported_backbone(exports: Exports, text_head: HeadArtifact) -> None:
    exports.messages.clear()
    started = time.monotonic()
    data = exports.export(text_head, version="4")
    seconds = time.monotonic() - started
    assert not any("exporting the" in message for message in exports.messages), exports.messages
    assert seconds < 5, f"a cached export took {seconds:.1f} s"
    assert json.loads(unzip(data)["model.json"])["version"] == "4"
    cached = [path.name for path in exports.cache_dir.iterdir()]
    assert [name for name in cached if name.startswith(TEXT_BACKBONE)], cached
    assert all(name.endswith(".onnx") for name in cached), cached  # no half-written file left behind
    firsts = ", ".join(f"{model} {seconds:.1f} s" for model, seconds in exports.first_seconds.items())
    print(f"\nfirst exports: {firsts}; a cached text export {seconds:.2f} s; ZIP {len(data) / 1e6:.1f} MB")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model_name": " ", "version": "1"}, "model_name is empty"),
        ({"model_name": "m", "version": ""}, "version is empty"),
    ],
)
def test_export_refuses_a_missing_name_or_version(
    exports: Exports, text_head: HeadArtifact, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        export_zip(text_head, cache_dir=exports.cache_dir, **kwargs)


def test_export_refuses_a_head_whose_task_is_not_its_base_models(exports: Exports, text_head: HeadArtifact) -> None:
    mismatched = HeadArtifact(
        labels=text_head.labels,
        weight=text_head.weight,
        bias=text_head.bias,
        base_model=TEXT_BACKBONE,
        task=IMAGE_TASK,
    )
    with pytest.raises(InvalidArgument, match="does not match its base model"):
        export_zip(mismatched, model_name="m", version="1", cache_dir=exports.cache_dir)
