"""Image decoding with limits: JPEG, PNG and WebP bytes → upright RGB, or InvalidArgument naming the problem.

The format comes from the bytes (magic numbers), never from the client's mime_type. The pixel limit is checked
from the header before any pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from aimass.runtime.config import VisionConfig
from aimass.runtime.errors import InvalidArgument

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
ALLOWED_TEXT = "JPEG, PNG or WebP"
ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied; smaller than width x height when decoded with min_side
    width: int  # full size, upright
    height: int


def sniff_format(data: bytes) -> str | None:
    """The container format from magic numbers, in Pillow's spelling; None when unknown."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def _invalid(index: int, message: str, reason: str, **facts: str) -> InvalidArgument:
    return InvalidArgument(f"images[{index}] {message}", reason=reason, metadata={"index": str(index), **facts})


def decode_image(data: bytes, index: int, config: VisionConfig, *, min_side: int | None = None) -> DecodedImage:
    """Decode one image. With ``min_side`` the caller needs only that many pixels on the short side: a JPEG is then
    decoded at a reduced DCT scale (2-8x less work on phone photos); width and height still give the full size."""
    if not data:
        raise _invalid(index, "is empty; send the encoded bytes of a JPEG, PNG or WebP file", "EMPTY_IMAGE")
    if len(data) > config.max_image_bytes:
        raise _invalid(
            index,
            f"is {len(data)} bytes; the limit is {config.max_image_bytes} bytes per image",
            "IMAGE_TOO_LARGE",
            limit=str(config.max_image_bytes),
        )
    sniffed = sniff_format(data)
    if sniffed is None:
        raise _invalid(index, f"is not a recognisable image; send {ALLOWED_TEXT}", "CORRUPT_IMAGE")
    if sniffed not in ALLOWED_FORMATS:
        raise _invalid(
            index, f"is {sniffed}, which is not supported; send {ALLOWED_TEXT}", "UNSUPPORTED_FORMAT", format=sniffed
        )
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as opened:
            width, height = opened.size
            _check_size(index, width, height, config)
            # EXIF orientations 5-8 turn the picture a quarter: the upright size swaps.
            if opened.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8):
                width, height = height, width
            if min_side is not None and sniffed == "JPEG" and min(width, height) > 2 * min_side:
                scale = min_side / min(width, height)
                opened.draft(None, (math.ceil(opened.width * scale), math.ceil(opened.height * scale)))
            opened.load()  # decodes now: truncated or corrupt pixel data fails here, not later in a model
            upright = ImageOps.exif_transpose(opened)
            rgb = upright.convert("RGB")
    except InvalidArgument:
        raise
    except Image.DecompressionBombError as err:
        raise _invalid(
            index, f"is too many pixels ({err}); the limit is {config.max_pixels} pixels", "TOO_MANY_PIXELS"
        ) from err
    except UnidentifiedImageError as err:
        raise _invalid(index, f"is corrupt: its {sniffed} header cannot be read", "CORRUPT_IMAGE") from err
    except (OSError, SyntaxError, ValueError) as err:
        # Pillow reports truncated files as OSError("image file is truncated ...") and bad streams as OSError or
        # SyntaxError depending on the plugin.
        detail = str(err) or type(err).__name__
        reason = "TRUNCATED_IMAGE" if "truncated" in detail else "CORRUPT_IMAGE"
        what = "is truncated" if reason == "TRUNCATED_IMAGE" else "is corrupt"
        raise _invalid(index, f"{what}: {sniffed} decoding failed ({detail})", reason) from err
    return DecodedImage(rgb, width, height)


def _check_size(index: int, width: int, height: int, config: VisionConfig) -> None:
    pixels = width * height
    if pixels > config.max_pixels:
        raise _invalid(
            index,
            f"is {width}x{height} = {pixels} pixels; the limit is {config.max_pixels} pixels",
            "TOO_MANY_PIXELS",
            limit=str(config.max_pixels),
        )
    if min(width, height) < config.min_side:
        raise _invalid(
            index,
            f"is {width}x{height} pixels; each side must be at least {config.min_side}",
            "IMAGE_TOO_SMALL",
            limit=str(config.min_side),
        )


def check_count(count: int, config: VisionConfig) -> None:
    if count == 0:
        raise InvalidArgument(f"images is empty; send between 1 and {config.max_images} images", reason="NO_INPUT")
    if count > config.max_images:
        raise InvalidArgument(
            f"images has {count} items; the limit is {config.max_images} per request",
            reason="TOO_MANY_IMAGES",
            metadata={"limit": str(config.max_images)},
        )


def decode_all(blobs: Sequence[bytes], config: VisionConfig, *, min_side: int | None = None) -> list[DecodedImage]:
    check_count(len(blobs), config)
    return [decode_image(data, index, config, min_side=min_side) for index, data in enumerate(blobs)]
