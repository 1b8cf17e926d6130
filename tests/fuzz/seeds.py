"""Small, valid media the fuzzers start from (made here, not stored): a PNG, a JPEG, a WAV, a silent PCM16 chunk.
Decoders reject random bytes at their first check; mangled real files reach their deeper paths."""

from __future__ import annotations

import functools
import io

import numpy as np
import soundfile  # type: ignore[import-untyped]
from PIL import Image


@functools.cache
def seed_blobs() -> tuple[bytes, ...]:
    rng = np.random.default_rng(7)
    pixels = Image.fromarray(rng.integers(0, 255, size=(32, 48, 3), dtype=np.uint8))
    png, jpeg, wav = io.BytesIO(), io.BytesIO(), io.BytesIO()
    pixels.save(png, format="PNG")
    pixels.save(jpeg, format="JPEG")
    tone = (0.2 * np.sin(np.linspace(0, 440 * 2 * np.pi, 8000))).astype(np.float32)
    soundfile.write(wav, tone, 16000, format="WAV", subtype="PCM_16")
    pcm16 = (tone * 32767).astype("<i2").tobytes()
    return png.getvalue(), jpeg.getvalue(), wav.getvalue(), pcm16[:3200]
