"""Text to speech with the Debian synthesisers flite and espeak-ng, run as subprocesses one sentence at a time.

Sentence by sentence is what makes streaming work: the first sentence's audio goes out while the rest is still
text, and cancelling the stream kills at most one short-lived process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from aimass.runtime.errors import DeadlineExceeded
from services.speech.audio import pcm16_bytes, wav_pcm_payload
from services.speech.kokoro import KOKORO, KokoroEngine

log = logging.getLogger(__name__)

FLITE = "flite"
ESPEAK = "espeak-ng"
DEFAULT_VOICE = {FLITE: "slt", ESPEAK: "en-us", KOKORO: "jm_kumo"}
# Sentences longer than this are split further at commas or spaces, so no single process runs long.
MAX_SENTENCE_CHARS = 300
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n\s*\n|\n")


@dataclass(frozen=True)
class TtsVoice:
    model: str
    voice_id: str
    display_name: str
    languages: tuple[str, ...]
    native_rate: int


def split_sentences(text: str) -> list[str]:
    """Sentences (and overlong ones cut at commas/spaces) in order, without empty pieces."""
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(text):
        sentence = " ".join(sentence.split())
        while len(sentence) > MAX_SENTENCE_CHARS:
            window = sentence[:MAX_SENTENCE_CHARS]
            cut = max(window.rfind(", "), window.rfind(" "))
            cut = cut + 1 if cut > 0 else MAX_SENTENCE_CHARS
            pieces.append(sentence[:cut].strip())
            sentence = sentence[cut:].strip()
        if sentence:
            pieces.append(sentence)
    return [piece for piece in pieces if any(ch.isalnum() for ch in piece)]


def _flite_voices() -> list[TtsVoice]:
    listing = subprocess.run([FLITE, "-lv"], capture_output=True, text=True, check=True, timeout=10).stdout
    names = listing.split(":", 1)[1].split() if ":" in listing else []
    voices = []
    for name in names:
        # The native rate is whatever the voice writes; one tiny synthesis per voice at load tells.
        probe = subprocess.run(
            [FLITE, "-voice", name, "-t", "a", "-o", "/dev/stdout"], capture_output=True, check=True, timeout=10
        ).stdout
        _, rate = wav_pcm_payload(probe)
        voices.append(TtsVoice(FLITE, name, f"flite {name}", ("en",), rate))
    return voices


def _espeak_voices() -> list[TtsVoice]:
    listing = subprocess.run([ESPEAK, "--voices"], capture_output=True, text=True, check=True, timeout=10).stdout
    voices: dict[str, TtsVoice] = {}
    for line in listing.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 5 or fields[4].startswith("mb/"):
            continue  # mbrola voices need the separate mbrola synthesiser
        language, name = fields[1], fields[3]
        display = f"espeak-ng {name.replace('_', ' ')}"
        voices.setdefault(language, TtsVoice(ESPEAK, language, display, (language.split("-")[0],), 22050))
    return list(voices.values())


class TtsEngine:
    def __init__(
        self,
        *,
        kokoro: bool = True,
        timeout_s: float = 30.0,
        timeout_base_s: float = 5.0,
        timeout_per_char_s: float = 0.05,
    ) -> None:
        # A synthesiser process still running past timeout_for(text) after it started is killed (DEADLINE_EXCEEDED).
        self.timeout_s = timeout_s
        self.timeout_base_s = timeout_base_s
        self.timeout_per_char_s = timeout_per_char_s
        # The neural voice is optional: it costs ~1 s to load and far more CPU per sentence than flite.
        self.kokoro = KokoroEngine() if kokoro and KokoroEngine.available() else None
        self.voices: dict[tuple[str, str], TtsVoice] = {}
        # Processes running right now; tests read it to see cancellation reach the synthesiser.
        self.running: set[asyncio.subprocess.Process] = set()
        self.spawned: list[int] = []  # pids of the most recent processes, for the same reason

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(model for model, _ in self.voices))

    def load(self) -> None:
        for model, lister in ((FLITE, _flite_voices), (ESPEAK, _espeak_voices)):
            if shutil.which(model) is None:
                log.warning("%s is not installed; its voices are unavailable (apt-get install %s)", model, model)
                continue
            for voice in lister():
                self.voices[(model, voice.voice_id)] = voice
            log.info("tts %s: %d voices", model, sum(1 for m, _ in self.voices if m == model))
        if self.kokoro is not None and shutil.which(ESPEAK) is not None:  # Kokoro reads espeak-ng's phonemes
            self.kokoro.load()
            for name in self.kokoro.voices:
                self.voices[(KOKORO, name)] = TtsVoice(KOKORO, name, f"Kokoro-82M {name}", ("en",), 24_000)
            log.info("tts %s: %d voices", KOKORO, len(self.kokoro.voices))

    def find_voice(self, model: str, voice_id: str) -> TtsVoice | None:
        """The voice for (model, voice); an empty model searches flite first, an empty voice takes the default."""
        for name in (model,) if model else self.models:
            found = self.voices.get((name, voice_id or DEFAULT_VOICE.get(name, "")))
            if found is not None:
                return found
        return None

    def _command(self, voice: TtsVoice, text: str) -> list[str]:
        if voice.model == FLITE:
            # "-t" takes the next argument verbatim, so text starting with "-" is still text.
            return [FLITE, "-voice", voice.voice_id, "-t", text, "-o", "/dev/stdout"]
        return [ESPEAK, "-v", voice.voice_id, "--stdout", "--", text]

    def timeout_for(self, text: str) -> float:
        """Seconds one sentence's process may run: longer for longer text, never more than timeout_s."""
        return min(self.timeout_s, self.timeout_base_s + self.timeout_per_char_s * len(text))

    async def synthesize_sentence(self, voice: TtsVoice, text: str) -> np.ndarray[tuple[int], np.dtype[np.int16]]:
        """PCM16 samples of one sentence at the voice's native rate. Cancelling kills the process."""
        if voice.model == KOKORO and self.kokoro is not None:
            return await self.kokoro.synthesize(text, voice.voice_id)
        process = await asyncio.create_subprocess_exec(
            *self._command(voice, text),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self.running.add(process)
        self.spawned = [*self.spawned[-99:], process.pid]
        timeout = self.timeout_for(text)
        try:
            async with asyncio.timeout(timeout):
                out, err = await process.communicate()
        except TimeoutError:
            raise DeadlineExceeded(
                f"{voice.model} took longer than {timeout:g} s for one sentence ({len(text)} characters) and "
                "was stopped",
                reason="TTS_TIMEOUT",
            ) from None
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            self.running.discard(process)
        if process.returncode != 0:
            raise RuntimeError(f"{voice.model} failed ({process.returncode}): {err.decode(errors='replace')[:200]}")
        payload, _ = wav_pcm_payload(out)
        return np.frombuffer(payload, dtype="<i2")

    async def stream(self, voice: TtsVoice, text: str, out_rate: int) -> AsyncIterator[bytes]:
        """PCM16 bytes at out_rate, one piece per sentence; the next sentence is synthesised while this one goes out."""
        sentences = split_sentences(text)
        ahead: asyncio.Task[np.ndarray[tuple[int], np.dtype[np.int16]]] | None = None
        try:
            for index, _ in enumerate(sentences):
                current = ahead or asyncio.ensure_future(self.synthesize_sentence(voice, sentences[index]))
                ahead = None
                samples = await current
                if index + 1 < len(sentences):
                    ahead = asyncio.ensure_future(self.synthesize_sentence(voice, sentences[index + 1]))
                if out_rate != voice.native_rate:
                    import soxr  # type: ignore[import-untyped]

                    resampled = soxr.resample(samples.astype(np.float32) / 32768.0, voice.native_rate, out_rate)
                    yield pcm16_bytes(resampled)
                else:
                    yield samples.tobytes()
        finally:
            if ahead is not None:
                ahead.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await ahead
