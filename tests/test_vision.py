"""VisionService on its real models (EfficientNet-Lite0 via ONNX, MTCNN, PP-OCR) behind a real in-process server,
called over gRPC on loopback: right answers on real photos and rendered text, and every bad image refused with
INVALID_ARGUMENT naming the problem, after which the server keeps serving."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import skimage.data as skimage_data  # public-domain test photos (cat, coffee, astronaut)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image, ImageDraw, ImageFont

from aimass.local_mesh import free_port
from aimass.runtime.config import BatchingConfig, ServerConfig, Settings, VisionConfig
from aimass.runtime.errors import InvalidArgument
from aimass.runtime.metadata import ERROR_INFO_KEY
from aimass.runtime.server import ServerRunner
from aimass.v1 import common_pb2, vision_pb2, vision_pb2_grpc
from gateway.app import build_runner as build_gateway
from scheduler.app import build_runner as build_scheduler
from services.vision.app import VisionApp, build_runner
from services.vision.engine import CLASSIFY_MODEL, VisionEngine, preprocess, softmax
from services.vision.images import decode_image
from services.vision.nms import nms
from tests.inprocess_mesh import mesh_settings
from tests.security import as_gateway, keyed

# ImageNet-1k indices (a public fact): 281-285 are the domestic cats, 967 espresso.
CAT_CLASSES = {281, 282, 283, 284, 285}
ESPRESSO = 967
MAX_PIXELS = 1_000_000
MAX_BYTES = 1_000_000
MAX_IMAGES = 4
ORIENTATION_TAG = 0x0112

Photo = npt.NDArray[np.uint8]


def astronaut() -> Photo:
    """skimage's astronaut (512 x 512, one face), typed for modules that check untyped calls."""
    photo: Photo = skimage_data.astronaut()
    return photo


def encode(array: Photo | Image.Image, fmt: str = "JPEG", **params: object) -> bytes:
    image = Image.fromarray(array) if isinstance(array, np.ndarray) else array
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def vision_config(cache_dir: Path, **overrides: object) -> VisionConfig:
    base: dict[str, object] = {
        "server": ServerConfig(port=0, drain_delay_s=0.05),
        "device": "cpu",
        "backend": "onnx",
        "cache_dir": cache_dir,
        "max_pixels": MAX_PIXELS,
        "max_image_bytes": MAX_BYTES,
        "max_images": MAX_IMAGES,
    }
    return VisionConfig.model_validate({**base, **overrides})


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A fresh cache per run, so the one-off ONNX export is exercised too.
    return tmp_path_factory.mktemp("vision-cache")


@pytest.fixture(scope="session")
def vision_engine(onnx_cache: Path) -> VisionEngine:
    engine = VisionEngine(vision_config(onnx_cache))
    engine.load()
    return engine


async def serve(engine: VisionEngine, config: VisionConfig) -> AsyncIterator[tuple[ServerRunner, grpc.aio.Channel]]:
    runner = build_runner(Settings(), config, register=False, engine=engine)
    await runner.start()
    channel = as_gateway(runner.address, "vision")  # a replica's caller: a gateway, over mesh mTLS
    try:
        yield runner, channel
    finally:
        await channel.close()
        await runner.drain()


@pytest.fixture(scope="session")
async def vision(
    vision_engine: VisionEngine, onnx_cache: Path
) -> AsyncIterator[tuple[ServerRunner, vision_pb2_grpc.VisionServiceAsyncStub]]:
    async for runner, channel in serve(vision_engine, vision_config(onnx_cache)):
        yield runner, vision_pb2_grpc.VisionServiceStub(channel)


@pytest.fixture
def stub(vision: tuple[ServerRunner, vision_pb2_grpc.VisionServiceAsyncStub]) -> vision_pb2_grpc.VisionServiceAsyncStub:
    return vision[1]


def images(*blobs: bytes) -> list[vision_pb2.Image]:
    return [vision_pb2.Image(data=blob) for blob in blobs]


# -- classification -------------------------------------------------------------------------------------------


async def test_classify_recognises_a_cat_and_an_espresso(stub: vision_pb2_grpc.VisionServiceAsyncStub) -> None:
    cat, coffee = skimage_data.chelsea(), skimage_data.coffee()
    reply = await stub.Classify(
        vision_pb2.VisionServiceClassifyRequest(images=images(encode(cat), encode(coffee, "PNG"))), timeout=30
    )
    assert reply.model.name == "efficientnet-lite0"
    cat_result, coffee_result = reply.results
    assert (cat_result.width, cat_result.height) == (451, 300)
    assert len(cat_result.labels) == 5
    assert {label.class_index for label in cat_result.labels[:3]} <= CAT_CLASSES
    assert "cat" in cat_result.labels[0].label
    assert coffee_result.labels[0].class_index == ESPRESSO
    assert coffee_result.labels[0].label == "espresso"
    assert coffee_result.labels[0].score > 0.5
    scores = [label.score for label in coffee_result.labels]
    assert scores == sorted(scores, reverse=True)


async def test_classify_top_k_and_webp(stub: vision_pb2_grpc.VisionServiceAsyncStub) -> None:
    coffee = encode(skimage_data.coffee(), "WEBP", quality=90)
    reply = await stub.Classify(vision_pb2.VisionServiceClassifyRequest(images=images(coffee), top_k=20), timeout=30)
    labels = reply.results[0].labels
    assert len(labels) == 20
    assert labels[0].class_index == ESPRESSO
    assert sum(label.score for label in labels) <= 1.0001  # softmax probabilities of 20 of the 1000 classes


async def test_concurrent_classify_requests_share_batches(vision_engine: VisionEngine, onnx_cache: Path) -> None:
    config = vision_config(onnx_cache, classify_batching=BatchingConfig(max_batch_size=16, max_queue_delay_ms=50))
    coffee = encode(skimage_data.coffee())
    async for runner, channel in serve(vision_engine, config):
        app = runner.app
        assert isinstance(app, VisionApp)
        stub = vision_pb2_grpc.VisionServiceStub(channel)
        replies = await asyncio.gather(
            *(
                stub.Classify(vision_pb2.VisionServiceClassifyRequest(images=images(coffee)), timeout=30)
                for _ in range(8)
            )
        )
        stats = app.servicer.classify_batcher.stats
        assert stats.executed_requests == 8
        assert stats.executed_batches < 8, "concurrent requests were not batched"
        first = replies[0].results[0].labels
        for reply in replies:
            # Same image, same answer, whichever batch it ran in.
            assert [label.class_index for label in reply.results[0].labels] == [label.class_index for label in first]
            assert reply.results[0].labels[0].score == pytest.approx(first[0].score, abs=1e-4)


async def test_classify_through_the_gateway(vision_engine: VisionEngine, onnx_cache: Path) -> None:
    """A replica registers with the registry (in an in-process scheduler), and an in-process gateway forwards
    VisionService calls to it."""
    settings = mesh_settings(free_port())
    scheduler = build_scheduler(settings)
    await scheduler.start()
    gateway = build_gateway(settings)
    await gateway.start()
    replica = build_runner(settings, vision_config(onnx_cache), register=True, engine=vision_engine)
    await replica.start()
    try:
        async with keyed(gateway.address) as channel:  # the session's admin key on every call
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="aimass.v1.VisionService")
            for _ in range(100):
                if (await health.Check(check, timeout=5)).status == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.05)
            stub = vision_pb2_grpc.VisionServiceStub(channel)
            request = vision_pb2.VisionServiceClassifyRequest(images=images(encode(skimage_data.coffee())), top_k=1)
            reply = await stub.Classify(request, timeout=30)
            assert reply.results[0].labels[0].label == "espresso"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Classify(vision_pb2.VisionServiceClassifyRequest(images=images(b"GIF89a")), timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "images[0] is GIF" in (caught.value.details() or "")
    finally:
        await replica.drain()
        await gateway.drain()
        await scheduler.drain()


# -- EXIF orientation -----------------------------------------------------------------------------------------


def with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    return encode(image, "JPEG", exif=exif.tobytes(), quality=92)


async def test_exif_orientation_is_applied(stub: vision_pb2_grpc.VisionServiceAsyncStub) -> None:
    upright = Image.fromarray(skimage_data.coffee())  # 600 x 400
    # Stored lying on its side (rotated 90° anticlockwise) with orientation 6, "rotate 90° clockwise to view".
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    assert stored.size == (400, 600)
    reply = await stub.Classify(
        vision_pb2.VisionServiceClassifyRequest(images=images(with_orientation(stored, 6))), timeout=30
    )
    result = reply.results[0]
    assert (result.width, result.height) == (600, 400)
    assert result.labels[0].class_index == ESPRESSO


async def test_large_jpeg_is_classified_from_a_reduced_decode(stub: vision_pb2_grpc.VisionServiceAsyncStub) -> None:
    large = Image.fromarray(skimage_data.coffee()).resize((1200, 800), Image.Resampling.BICUBIC)
    reply = await stub.Classify(
        vision_pb2.VisionServiceClassifyRequest(images=images(encode(large), with_orientation(large, 8))), timeout=30
    )
    plain, turned = reply.results
    assert (plain.width, plain.height) == (1200, 800)  # the full size, though decoded at half scale
    assert (turned.width, turned.height) == (800, 1200)
    assert plain.labels[0].class_index == ESPRESSO


def test_reduced_decode_keeps_enough_pixels(tmp_path: Path) -> None:
    large = Image.fromarray(skimage_data.coffee()).resize((1200, 800), Image.Resampling.BICUBIC)
    decoded = decode_image(encode(large), 0, vision_config(tmp_path), min_side=256)
    assert (decoded.width, decoded.height) == (1200, 800)
    assert decoded.image.size == (600, 400)  # the largest DCT reduction that keeps 256 pixels on the short side
    png = decode_image(encode(large, "PNG"), 0, vision_config(tmp_path, max_image_bytes=10_000_000), min_side=256)
    assert png.image.size == (1200, 800)  # only JPEG can decode at a reduced scale


def test_decoder_applies_each_exif_rotation(tmp_path: Path) -> None:
    config = vision_config(tmp_path)
    # A 40 x 20 image with a red left half: after decoding, where the red half lies shows the rotation applied.
    image = Image.new("RGB", (40, 20), "blue")
    image.paste((255, 0, 0), (0, 0, 20, 20))
    plain = decode_image(with_orientation(image, 1), 0, config)
    assert (plain.width, plain.height) == (40, 20)
    turned = decode_image(with_orientation(image, 6), 0, config)  # rotate 90° clockwise: left half goes on top
    assert (turned.width, turned.height) == (20, 40)
    top, bottom = turned.image.getpixel((10, 5)), turned.image.getpixel((10, 35))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert top[0] > 200 and bottom[2] > 200


# -- faces ----------------------------------------------------------------------------------------------------


async def test_detects_the_astronauts_face(stub: vision_pb2_grpc.VisionServiceAsyncStub) -> None:
    astronaut = encode(skimage_data.astronaut())
    reply = await stub.DetectFaces(
        vision_pb2.DetectFacesRequest(images=images(astronaut, encode(skimage_data.coffee()))), timeout=30
    )
    assert reply.model.name == "mtcnn"
    faces, no_faces = reply.results
    assert (faces.width, faces.height) == (512, 512)
    assert len(faces.faces) == 1
    assert len(no_faces.faces) == 0
    face = faces.faces[0]
    assert face.score > 0.99
    # Her face lies around x 180-270, y 60-175 in the 512 x 512 photo.
    box = face.box
    assert 150 < box.x < 210 and 40 < box.y < 90
    assert 60 < box.width < 120 and 80 < box.height < 140
    marks = {mark.name: mark.point for mark in face.landmarks}
    assert set(marks) == {"left_eye", "right_eye", "nose", "mouth_left", "mouth_right"}
    for point in marks.values():
        assert box.x <= point.x <= box.x + box.width and box.y <= point.y <= box.y + box.height
    # Subject's right eye is on the picture's left; eyes above the nose, nose above the mouth.
    assert marks["right_eye"].x < marks["left_eye"].x
    assert max(marks["left_eye"].y, marks["right_eye"].y) < marks["nose"].y < marks["mouth_left"].y


async def test_face_filters(stub: vision_pb2_grpc.VisionServiceAsyncStub) -> None:
    astronaut = encode(skimage_data.astronaut())
    # Two faces side by side: max_faces keeps the best one.
    pair = Image.new("RGB", (1024, 512))
    pair.paste(Image.fromarray(skimage_data.astronaut()), (0, 0))
    pair.paste(Image.fromarray(skimage_data.astronaut()), (512, 0))
    reply = await stub.DetectFaces(
        vision_pb2.DetectFacesRequest(images=images(encode(pair), astronaut), max_faces=1), timeout=30
    )
    assert [len(result.faces) for result in reply.results] == [1, 1]
    both = await stub.DetectFaces(vision_pb2.DetectFacesRequest(images=images(encode(pair))), timeout=30)
    assert len(both.results[0].faces) == 2
    strict = await stub.DetectFaces(vision_pb2.DetectFacesRequest(images=images(astronaut), min_score=1.0), timeout=30)
    assert len(strict.results[0].faces) == 0


# -- OCR ------------------------------------------------------------------------------------------------------


def rendered_text(lines: list[str]) -> bytes:
    # Pillow's bundled scalable font: no system fonts needed.
    font = ImageFont.load_default(size=48)
    image = Image.new("RGB", (1000, 110 * len(lines) + 40), "white")
    draw = ImageDraw.Draw(image)
    for row, line in enumerate(lines):
        draw.text((40, 40 + 110 * row), line, fill="black", font=font)
    return encode(image, "PNG")


async def test_reads_rendered_text_in_reading_order(stub: vision_pb2_grpc.VisionServiceAsyncStub) -> None:
    wanted = ["Hello aimass vision", "Invoice 2026 total 42"]
    reply = await stub.ReadText(vision_pb2.ReadTextRequest(images=images(rendered_text(wanted))), timeout=30)
    assert reply.model.name == "pp-ocr"
    result = reply.results[0]
    assert [line.text for line in result.lines] == wanted
    assert result.text == "\n".join(wanted)
    first, second = result.lines
    assert first.confidence > 0.8 and second.confidence > 0.8
    assert len(first.polygon) == 4
    assert 30 < first.box.x < 60 and 30 < first.box.y < 70 and first.box.width > 300
    assert second.box.y > first.box.y + first.box.height
    high = await stub.ReadText(
        vision_pb2.ReadTextRequest(images=images(rendered_text(wanted)), min_confidence=1.0, languages=["en"]),
        timeout=30,
    )
    assert high.results[0].lines == [] and high.results[0].text == ""


# -- bad input ------------------------------------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but carries almost no data: a decompression bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def noisy_jpeg(side: int) -> bytes:
    rng = np.random.default_rng(7)
    return encode(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), quality=95)


GOOD = encode(np.full((32, 32, 3), 128, dtype=np.uint8))

BAD_IMAGES: dict[str, tuple[Callable[[], bytes], str, str]] = {
    "empty": (lambda: b"", "images[1] is empty", "EMPTY_IMAGE"),
    "corrupt": (lambda: b"this is not an image at all", "images[1] is not a recognisable image", "CORRUPT_IMAGE"),
    "corrupt_jpeg_body": (lambda: GOOD[:20] + b"\x00" * 200 + GOOD[-2:], "images[1] is", "CORRUPT_IMAGE"),
    "truncated_jpeg": (lambda: encode(skimage_data.coffee())[:5000], "images[1] is truncated", "TRUNCATED_IMAGE"),
    "oversize_bytes": (lambda: noisy_jpeg(1000), f"the limit is {MAX_BYTES} bytes", "IMAGE_TOO_LARGE"),
    "too_many_pixels": (
        lambda: encode(np.zeros((1000, 1200, 3), dtype=np.uint8), "PNG"),
        "1200x1000 = 1200000 pixels",
        "TOO_MANY_PIXELS",
    ),
    "decompression_bomb": (lambda: png_header_only(100_000, 100_000), "too many pixels", "TOO_MANY_PIXELS"),
    "too_small": (lambda: encode(np.zeros((4, 4, 3), dtype=np.uint8), "PNG"), "at least 8", "IMAGE_TOO_SMALL"),
    "gif": (lambda: encode(Image.new("P", (32, 32)), "GIF"), "is GIF, which is not supported", "UNSUPPORTED_FORMAT"),
    "bmp": (lambda: encode(Image.new("RGB", (32, 32)), "BMP"), "is BMP, which is not supported", "UNSUPPORTED_FORMAT"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
async def test_bad_image_is_invalid_argument_naming_it(stub: vision_pb2_grpc.VisionServiceAsyncStub, case: str) -> None:
    make, expected, reason = BAD_IMAGES[case]
    bad = make()
    calls: list[Awaitable[object]] = [
        stub.Classify(vision_pb2.VisionServiceClassifyRequest(images=images(GOOD, bad)), timeout=30),
        stub.DetectFaces(vision_pb2.DetectFacesRequest(images=images(GOOD, bad)), timeout=30),
        stub.ReadText(vision_pb2.ReadTextRequest(images=images(GOOD, bad)), timeout=30),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        details = caught.value.details() or ""
        assert details.startswith("images[1] "), details
        assert expected.lower() in details.lower(), details
        info = common_pb2.ErrorInfo.FromString(dict(caught.value.trailing_metadata() or ())[ERROR_INFO_KEY])
        assert info.reason == reason
        assert info.metadata["index"] == "1"
    # The server keeps serving.
    reply = await stub.Classify(vision_pb2.VisionServiceClassifyRequest(images=images(GOOD)), timeout=30)
    assert len(reply.results[0].labels) == 5


async def test_request_level_limits(stub: vision_pb2_grpc.VisionServiceAsyncStub) -> None:
    cases: list[tuple[Awaitable[object], grpc.StatusCode, str]] = [
        (
            stub.Classify(vision_pb2.VisionServiceClassifyRequest(), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "images is empty",
        ),
        (
            stub.Classify(
                vision_pb2.VisionServiceClassifyRequest(images=images(*[GOOD] * (MAX_IMAGES + 1))), timeout=10
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            f"images has {MAX_IMAGES + 1} items; the limit is {MAX_IMAGES}",
        ),
        (
            stub.Classify(vision_pb2.VisionServiceClassifyRequest(images=images(GOOD), top_k=1001), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_k is 1001",
        ),
        (
            stub.Classify(
                vision_pb2.VisionServiceClassifyRequest(
                    images=images(GOOD), model=common_pb2.ModelRef(name="resnet50")
                ),
                timeout=10,
            ),
            grpc.StatusCode.NOT_FOUND,
            "available: efficientnet-lite0",
        ),
        (
            stub.ReadText(vision_pb2.ReadTextRequest(images=images(GOOD), languages=["xx"]), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "supported: en, zh",
        ),
        (
            stub.DetectFaces(vision_pb2.DetectFacesRequest(images=images(GOOD), min_score=1.5), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT,
            "min_score is 1.5",
        ),
    ]
    for call, code, expected in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == code
        assert expected in (caught.value.details() or "")


def test_decoder_errors_carry_reason_and_index(tmp_path: Path) -> None:
    config = vision_config(tmp_path)
    with pytest.raises(InvalidArgument) as caught:
        decode_image(b"GIF89a" + b"\0" * 40, 3, config)
    assert caught.value.reason == "UNSUPPORTED_FORMAT"
    assert caught.value.metadata["index"] == "3"


# -- NMS ------------------------------------------------------------------------------------------------------


def test_nms_keeps_the_best_of_overlapping_boxes() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [2, 2, 5, 5]], dtype=np.float32)
    scores = np.array([0.9, 0.95, 0.5, 0.8], dtype=np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [1, 3, 2]  # box 0 overlaps box 1 heavily; box 3 is small inside
    assert nms(boxes, scores, 0.5, method="min").tolist() == [1, 2]  # "min": a box nested in another goes
    assert nms(np.empty((0, 4), dtype=np.float32), np.empty(0, dtype=np.float32), 0.5).tolist() == []


# -- engine paths ---------------------------------------------------------------------------------------------


def test_torch_path_agrees_with_onnx(vision_engine: VisionEngine, onnx_cache: Path) -> None:
    """The torch path (kept for GPUs) and the exported ONNX model give the same probabilities."""
    torch_engine = VisionEngine(vision_config(onnx_cache, backend="torch"))
    torch_engine.models.load(CLASSIFY_MODEL)  # only the classifier: faces and OCR are shared code
    pixels = np.stack(
        [preprocess(Image.fromarray(skimage_data.coffee())), preprocess(Image.fromarray(skimage_data.chelsea()))]
    )
    onnx_probs = softmax(vision_engine.classify_logits(pixels))
    torch_probs = softmax(torch_engine.classify_logits(pixels))
    np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-4)
    assert int(torch_probs[0].argmax()) == ESPRESSO


def test_large_images_are_searched_for_faces_downscaled(vision_engine: VisionEngine) -> None:
    # 4x the astronaut (2048 x 2048): searched at 1600 px, boxes reported in the original's pixels.
    big = Image.fromarray(skimage_data.astronaut()).resize((2048, 2048), Image.Resampling.BICUBIC)
    faces = vision_engine.detect_faces(big, min_score=0.0, max_faces=0)
    assert len(faces) == 1
    face = faces[0]
    assert 600 < face.x < 840 and 160 < face.y < 360 and 240 < face.width < 480


def test_a_broken_cached_export_is_replaced(tmp_path: Path) -> None:
    engine = VisionEngine(vision_config(tmp_path / "cache"))
    engine.onnx_path.parent.mkdir(parents=True)
    engine.onnx_path.write_bytes(b"half a file")
    engine.models.load(CLASSIFY_MODEL)
    assert engine.onnx_path.stat().st_size > 1_000_000
    pixels = preprocess(Image.fromarray(skimage_data.coffee()))[None]
    assert int(engine.classify_logits(pixels)[0].argmax()) == ESPRESSO
