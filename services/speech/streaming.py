"""Where a live stream is cut into final segments: at a pause found by a simple energy detector, or at a fixed
window when nobody pauses. Pure logic over a growing 16 kHz buffer, so it is tested without models."""

from __future__ import annotations

import numpy as np

from services.speech.audio import MODEL_RATE, Samples

FRAME = MODEL_RATE // 50  # 20 ms energy frames
# Frames quieter than this fraction of the loudest frame seen so far (or than an absolute floor) are silence.
RELATIVE_SILENCE = 0.05
ABSOLUTE_SILENCE = 0.003


class Segmenter:
    def __init__(self, *, min_segment_s: float, min_silence_s: float, max_segment_s: float) -> None:
        self.min_segment = int(min_segment_s * MODEL_RATE)
        self.min_silence_frames = max(1, int(min_silence_s * MODEL_RATE / FRAME))
        self.max_segment = int(max_segment_s * MODEL_RATE)
        # Pending audio lives in _data[_start:_end], a buffer that doubles when full and is compacted when more than
        # half of it has been taken: adding a chunk costs its own length, not the whole pending audio again.
        self._data = np.zeros(MODEL_RATE, np.float32)
        self._start = self._end = 0
        self.offset = 0  # samples of the stream already committed as final segments
        self.peak = 0.0

    @property
    def buffer(self) -> Samples:
        """The pending audio (a view: copy it to keep it past the next add or take)."""
        return self._data[self._start : self._end]

    @property
    def pending_s(self) -> float:
        return (self._end - self._start) / MODEL_RATE

    @property
    def offset_s(self) -> float:
        return self.offset / MODEL_RATE

    def add(self, samples: Samples) -> None:
        count = len(samples)
        if not count:
            return
        if self._end + count > len(self._data):
            pending = self._end - self._start
            size = len(self._data)
            while pending + count > size // 2:
                size *= 2
            grown = np.zeros(size, np.float32) if size != len(self._data) else self._data
            grown[:pending] = self._data[self._start : self._end]
            self._data, self._start, self._end = grown, 0, pending
        self._data[self._end : self._end + count] = samples
        self._end += count

    def _frame_rms(self) -> Samples:
        usable = len(self.buffer) - len(self.buffer) % FRAME
        frames = self.buffer[:usable].reshape(-1, FRAME)
        rms: Samples = np.sqrt(np.mean(frames * frames, axis=1)).astype(np.float32)
        if len(rms):
            self.peak = max(self.peak, float(rms.max()))
        return rms

    def is_silence(self, samples: Samples) -> bool:
        return len(samples) == 0 or float(np.sqrt(np.mean(samples * samples))) < ABSOLUTE_SILENCE

    def next_cut(self, *, closed: bool) -> int | None:
        """Samples to commit now as one final segment, or None to wait for more audio."""
        if closed:
            return len(self.buffer) or None
        if len(self.buffer) < self.min_segment:
            return None
        rms = self._frame_rms()
        quiet = rms < max(self.peak * RELATIVE_SILENCE, ABSOLUTE_SILENCE)
        # The middle of the first long-enough pause after min_segment: both halves keep a little silence.
        run = 0
        for index in range(self.min_segment // FRAME, len(quiet)):
            run = run + 1 if quiet[index] else 0
            if run >= self.min_silence_frames:
                return (index - run // 2) * FRAME
        if len(self.buffer) >= self.max_segment:
            # No pause: cut at the quietest frame in the last third of the window, to avoid splitting a word.
            start = (2 * self.max_segment // 3) // FRAME
            end = self.max_segment // FRAME
            return (start + int(np.argmin(rms[start:end]))) * FRAME
        return None

    def take(self, count: int) -> Samples:
        count = min(count, self._end - self._start)
        piece = self._data[self._start : self._start + count].copy()
        self._start += count
        self.offset += count
        return piece
