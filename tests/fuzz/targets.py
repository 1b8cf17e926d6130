"""The byte decoders a caller's bytes reach, as fuzz targets: each takes any bytes and may only answer or raise the
error it documents (a clear INVALID_ARGUMENT, a config validation error). Anything else escaping is a bug.

Run coverage-guided by atheris (`make fuzz`: ``python -m tests.fuzz.run TARGET``), and replayed from the committed
corpus of inputs that once found bugs by tests/test_fuzz_corpus.py in `make test`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable

from pydantic import ValidationError

from aimass.runtime.config import Settings, SpeechConfig, VisionConfig
from aimass.runtime.errors import InvalidArgument
from gateway.model_routing import requested_model

VISION = VisionConfig()
SPEECH = SpeechConfig()


def image(data: bytes) -> None:
    """Vision: header probe, then decode (formats, sizes, pixel budget, EXIF orientation)."""
    from services.vision.images import decode_all

    try:
        decoded = decode_all([data], VISION)
    except InvalidArgument as err:
        assert err.message
        return
    assert len(decoded) == 1


def audio(data: bytes) -> None:
    """Speech: a Transcribe request's audio bytes (format sniffing, header limits, decoding, resampling)."""
    from services.speech.audio import decode_audio

    try:
        decoded = decode_audio(data, max_bytes=SPEECH.max_audio_bytes, max_seconds=SPEECH.max_audio_seconds)
    except InvalidArgument as err:
        assert err.message
        return
    assert decoded is not None


def wire(data: bytes) -> None:
    """Gateway: the model a raw request names, for several field numbers (never raises; "" when unreadable)."""
    for number in (1, 2, 3, 15, 16, 536870911):
        assert isinstance(requested_model(data, number), str)


def config(data: bytes) -> None:
    """Every process's config: a TOML file (AIMASS_CONFIG) read into the typed Settings."""
    try:
        text = data.decode()
        Settings.model_validate(tomllib.loads(text))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, ValidationError):
        return


TARGETS: dict[str, Callable[[bytes], None]] = {"image": image, "audio": audio, "wire": wire, "config": config}
