"""Where the user's turns start and end in a stream of microphone audio: WebRTC's voice activity detector (the one
browsers ship, through ``webrtcvad``) over 30 ms frames, with the hysteresis voice front ends use.

- **Onset**: speech begins when most frames of the last ``ONSET_WINDOW_MS`` are voiced. A lone click or a breath
  is one or two voiced frames and starts nothing. Onset during the assistant's reply is a barge-in.
- **End of turn**: after an onset, ``silence_ms`` of consecutive unvoiced frames (700 ms by default: a pause, not
  the gap between two words, which is 100-300 ms).
- **Pre-roll**: the detector keeps the last ``PRE_ROLL_MS`` of audio before an onset, so the turn's recording
  starts with the onset's own first syllable (the frames that made the window voiced), not after it.

The detector takes PCM16 mono at any rate from 8 to 48 kHz; WebRTC's VAD runs at 8, 16, 32 or 48 kHz, so other
rates (22.05, 24, 44.1 kHz) are resampled to 16 kHz for the decision only (linear interpolation: plenty for voiced
or not). The audio passed on to recognition is the caller's, untouched.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import numpy as np
import webrtcvad  # type: ignore[import-untyped]

FRAME_MS: Final = 30
VAD_RATES: Final = (8000, 16000, 32000, 48000)
# WebRTC's aggressiveness, 0..3: 2 drops steady background noise without losing quiet speech.
AGGRESSIVENESS: Final = 2
# Speech begins when this share of the frames of the last ONSET_WINDOW_MS is voiced.
ONSET_WINDOW_MS: Final = 210
ONSET_SHARE: Final = 0.7
PRE_ROLL_MS: Final = 450
DEFAULT_SILENCE_MS: Final = 700


class Event(enum.Enum):
    ONSET = "onset"
    END_OF_TURN = "end_of_turn"


@dataclass(frozen=True)
class Detected:
    event: Event
    # Seconds of audio the detector had received when it decided (the end of the deciding frame).
    at_s: float
    # Where the deciding frame ends in the bytes just fed: what comes after belongs to the next stretch (the turn
    # after an onset; the silence after an end of turn).
    offset: int


class TurnDetector:
    """Feed it PCM16 mono bytes as they arrive; it says when speech starts and when the turn has ended."""

    def __init__(self, sample_rate_hz: int, *, silence_ms: int = DEFAULT_SILENCE_MS) -> None:
        if not 8000 <= sample_rate_hz <= 48000:
            raise ValueError(f"sample rate {sample_rate_hz} Hz is outside 8000..48000")
        self.sample_rate_hz = sample_rate_hz
        self.silence_frames = max(1, round(silence_ms / FRAME_MS))
        self._vad = webrtcvad.Vad(AGGRESSIVENESS)
        self._vad_rate = sample_rate_hz if sample_rate_hz in VAD_RATES else 16000
        self._frame_bytes = sample_rate_hz * FRAME_MS // 1000 * 2
        self._pending = b""
        self._frames = 0
        self._window: collections.deque[bool] = collections.deque(maxlen=ONSET_WINDOW_MS // FRAME_MS)
        self._pre_roll: collections.deque[bytes] = collections.deque(maxlen=PRE_ROLL_MS // FRAME_MS)
        self._silent_run = 0
        # True between an onset and its end of turn.
        self.speaking = False

    @property
    def seconds(self) -> float:
        """Audio received so far, in whole frames."""
        return self._frames * FRAME_MS / 1000

    def feed(self, pcm16: bytes) -> Iterator[Detected]:
        """Takes the next bytes of audio and yields what they decided (an onset, an end of turn, or both)."""
        carried = len(self._pending)
        data = self._pending + pcm16
        whole = len(data) - len(data) % self._frame_bytes
        self._pending = data[whole:]
        for start in range(0, whole, self._frame_bytes):
            frame = data[start : start + self._frame_bytes]
            self._frames += 1
            voiced = self._voiced(frame)
            self._pre_roll.append(frame)
            if not self.speaking:
                self._window.append(voiced)
                if len(self._window) == self._window.maxlen and sum(self._window) >= ONSET_SHARE * len(self._window):
                    self.speaking = True
                    self._silent_run = 0
                    yield Detected(Event.ONSET, self.seconds, start + self._frame_bytes - carried)
                continue
            self._silent_run = 0 if voiced else self._silent_run + 1
            if self._silent_run >= self.silence_frames:
                self.speaking = False
                self._window.clear()
                yield Detected(Event.END_OF_TURN, self.seconds, start + self._frame_bytes - carried)

    def pre_roll(self) -> bytes:
        """The last PRE_ROLL_MS of audio (at an onset: the speech that triggered it, and a little before)."""
        return b"".join(self._pre_roll)

    def reset(self) -> None:
        """Forget the current turn (an explicit end of turn, a typed turn): the next speech is a new onset."""
        self.speaking = False
        self._silent_run = 0
        self._window.clear()
        self._pre_roll.clear()

    def _voiced(self, frame: bytes) -> bool:
        if self._vad_rate == self.sample_rate_hz:
            return bool(self._vad.is_speech(frame, self._vad_rate))
        samples = np.frombuffer(frame, dtype="<i2").astype(np.float32)
        count = self._vad_rate * FRAME_MS // 1000
        positions = np.linspace(0, len(samples) - 1, count)
        resampled = np.interp(positions, np.arange(len(samples)), samples).astype("<i2")
        return bool(self._vad.is_speech(resampled.tobytes(), self._vad_rate))
