"""Image decoding with limits: JPEG, PNG and WebP bytes → upright RGB, or InvalidArgument naming the problem.

Two steps, so that nothing expensive happens before every limit is checked:
- ``probe_image`` reads only the header (Pillow's ``Image.open`` is lazy): format from the magic numbers (never
  from the client's mime_type), size, pixel mode. ``probe_all`` checks a whole request (count, per-image and
  per-request pixels) before any pixel of it is decoded, so a decompression bomb costs nothing.
- ``decode_image`` decodes one image, downscaling as early as the format allows (JPEG's reduced DCT scales while
  decoding, ``thumbnail``'s ``reduce`` before any conversion), then applies the EXIF orientation to the small copy.
Animated PNG and WebP files are read for their first frame only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from aimass.runtime.config import VisionConfig
from aimass.runtime.errors import InvalidArgument

log = logging.getLogger(__name__)

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
ALLOWED_TEXT = "JPEG, PNG or WebP"
ORIENTATION_TAG = 0x0112
# Pixel modes JPEG, PNG and WebP files open in that are turned into RGB. Anything else (LAB or HSV JPEGs, float
# data) is refused before decoding: Pillow cannot convert it to RGB.
SUPPORTED_MODES = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "I", "I;16", "I;16B", "I;16L"}
)
# EXIF orientation (2-8) → the transpose that makes the picture upright (as ImageOps.exif_transpose).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class ImageHeader:
    index: int
    format: str
    width: int  # as stored (before the EXIF orientation, which may swap them)
    height: int
    mode: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied; smaller than width x height when decoded downscaled
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


def _pillow_error(index: int, fmt: str, err: Exception, config: VisionConfig) -> InvalidArgument:
    if isinstance(err, Image.DecompressionBombError):
        return _invalid(
            index, f"is too many pixels ({err}); the limit is {config.max_pixels} pixels", "TOO_MANY_PIXELS"
        )
    if isinstance(err, UnidentifiedImageError):
        return _invalid(index, f"is corrupt: its {fmt} header cannot be read", "CORRUPT_IMAGE")
    # Pillow reports truncated files as OSError("image file is truncated ...") and bad streams as OSError,
    # SyntaxError, ValueError (or worse, from a plugin's parsing) depending on the plugin.
    detail = str(err) or type(err).__name__
    reason = "TRUNCATED_IMAGE" if "truncated" in detail else "CORRUPT_IMAGE"
    what = "is truncated" if reason == "TRUNCATED_IMAGE" else "is corrupt"
    return _invalid(index, f"{what}: {fmt} decoding failed ({detail})", reason)


def _check_bytes(data: bytes, index: int, config: VisionConfig) -> str:
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
    return sniffed


def _check_header(index: int, fmt: str, opened: Image.Image, config: VisionConfig) -> ImageHeader:
    width, height = opened.size
    _check_size(index, width, height, config)
    if opened.mode not in SUPPORTED_MODES:
        raise _invalid(
            index,
            f"has pixel mode {opened.mode}, which cannot be turned into RGB; send RGB, greyscale, palette or CMYK",
            "UNSUPPORTED_MODE",
            mode=opened.mode,
        )
    return ImageHeader(index, fmt, width, height, opened.mode)


def probe_image(data: bytes, index: int, config: VisionConfig) -> ImageHeader:
    """The image's header, checked against the limits; no pixel is decoded."""
    sniffed = _check_bytes(data, index, config)
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as opened:
            return _check_header(index, sniffed, opened, config)
    except InvalidArgument:
        raise
    except Exception as err:  # whatever a malformed header makes a plugin raise, the client sent it
        raise _pillow_error(index, sniffed, err, config) from err


def probe_all(blobs: Sequence[bytes], config: VisionConfig) -> list[ImageHeader]:
    """Every image's header, and the request's limits: image count and pixels summed over its images."""
    check_count(len(blobs), config)
    headers = [probe_image(data, index, config) for index, data in enumerate(blobs)]
    total = sum(header.pixels for header in headers)
    if total > config.max_request_pixels:
        largest = max(headers, key=lambda h: h.pixels)
        raise InvalidArgument(
            f"images hold {total} pixels in all ({len(headers)} images, the largest {largest.width}x{largest.height}"
            f"); the limit is {config.max_request_pixels} pixels per request: send fewer or smaller images",
            reason="TOO_MANY_PIXELS_PER_REQUEST",
            metadata={"limit": str(config.max_request_pixels), "pixels": str(total)},
        )
    return headers


def _orientation(image: Image.Image) -> int:
    # A malformed EXIF block is ignored (the picture is then taken as stored), never a reason to refuse the image.
    try:
        value = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:
        return 1
    return value if isinstance(value, int) and value in UPRIGHT else 1


def _to_eight_bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit greyscale → 8-bit greyscale, keeping the top 8 bits (Pillow's own conversion clips)."""
    if image.mode.startswith("I;16"):
        array = np.asarray(image)
        return Image.fromarray((array >> 8).astype(np.uint8))
    if image.mode == "I":
        array = np.asarray(image)
        top = int(array.max()) if array.size else 0
        shift = 8 if top > 255 else 0  # 16-bit PNG greyscale opens as "I" with values up to 65535
        return Image.fromarray(np.clip(array >> shift, 0, 255).astype(np.uint8))
    return image


def decode_image(
    data: bytes,
    index: int,
    config: VisionConfig,
    *,
    min_side: int | None = None,
    max_side: int | None = None,
) -> DecodedImage:
    """Decode one image. With ``min_side`` the caller needs only that many pixels on the short side: a JPEG is then
    decoded at a reduced DCT scale (2-8x less work on phone photos). With ``max_side`` the image is downscaled to at
    most that many pixels on its long side as early as possible. ``width`` and ``height`` give the full size."""
    sniffed = _check_bytes(data, index, config)
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as opened:
            _check_header(index, sniffed, opened, config)
            width, height = opened.size
            if sniffed == "JPEG":
                scale = 1.0
                if min_side is not None and min(width, height) > 2 * min_side:
                    scale = min_side / min(width, height)
                if max_side is not None and max(width, height) > 2 * max_side:
                    scale = max_side / max(width, height)
                if scale < 1.0:
                    opened.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
            opened.load()  # decodes now: truncated or corrupt pixel data fails here, not later in a model
            orientation = _orientation(opened)  # after load(): a PNG's eXIf chunk may follow its pixels
            image: Image.Image = opened
            if image.mode in ("1", "P", "PA"):
                # Palettes are resampled only by nearest neighbour: expand first so a downscale stays readable.
                image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
            image = _to_eight_bit(image)
            if max_side is not None and max(image.size) > max_side:
                # In place: the full-size buffer is freed as soon as the small one replaces it.
                image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR, reducing_gap=2.0)
            if orientation in UPRIGHT:
                image = image.transpose(UPRIGHT[orientation])
            rgb = image if image.mode == "RGB" and image is not opened else image.convert("RGB")
            del image
    except InvalidArgument:
        raise
    except MemoryError:
        raise
    except Exception as err:  # whatever a malformed stream makes a plugin raise, the client sent it
        raise _pillow_error(index, sniffed, err, config) from err
    if orientation in (5, 6, 7, 8):  # a quarter turn: the upright size swaps
        width, height = height, width
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
    probe_all(blobs, config)
    return [decode_image(data, index, config, min_side=min_side) for index, data in enumerate(blobs)]


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def release_memory() -> None:
    """Hand freed heap back to the OS. Pillow allocates decoded images in 16 MiB blocks, below glibc's mmap
    threshold once it has grown, so freed images stay in the arenas (the resident size never falls) unless trimmed;
    malloc_trim(0) returns free pages of every arena."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
