"""Audio in and out: encoded files → 16 kHz mono float32 for Whisper, streamed PCM/WAV decoding, WAV headers.

Every problem with client audio becomes ``InvalidArgument`` naming what was wrong and what is accepted.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import soundfile as sf  # type: ignore[import-untyped]
import soxr  # type: ignore[import-untyped]

from aimass.runtime.errors import InvalidArgument

MODEL_RATE = 16_000
MIN_RATE = 8_000
MAX_RATE = 48_000
# Channels a recording or stream may have (7.1 surround is 8); each is decoded before the mix to mono.
MAX_CHANNELS = 8
# Bytes of a streamed WAV header (RIFF, fmt, LIST... up to the data chunk) the server waits for: a header whose
# chunk claims gigabytes would otherwise be buffered while it never ends.
MAX_STREAM_HEADER_BYTES = 64 * 1024
# Frames decoded at a time: a file's channels are mixed to mono block by block, so a multichannel or compressed file
# never holds more than one block of its channels in memory.
DECODE_BLOCK_FRAMES = 1 << 16

Samples = npt.NDArray[np.float32]

# Containers and codecs the contract accepts (libsndfile reads more, e.g. MP3, but the contract does not promise it).
ACCEPTED_SUBTYPES: dict[str, frozenset[str]] = {
    "WAV": frozenset({"PCM_16", "PCM_24", "PCM_32", "PCM_U8", "FLOAT", "DOUBLE"}),
    "WAVEX": frozenset({"PCM_16", "PCM_24", "PCM_32", "PCM_U8", "FLOAT", "DOUBLE"}),
    "FLAC": frozenset({"PCM_16", "PCM_24", "PCM_S8"}),
    "OGG": frozenset({"VORBIS", "OPUS"}),
}
ACCEPTED = "WAV (PCM 8/16/24/32-bit or float), FLAC or OGG (Vorbis/Opus)"

# Magic bytes of formats people send that we do not take, so the error can name them.
KNOWN_UNSUPPORTED: tuple[tuple[bytes, int, str], ...] = (
    (b"ID3", 0, "MP3"),
    (b"\xff\xfb", 0, "MP3"),
    (b"\xff\xf3", 0, "MP3"),
    (b"\xff\xf1", 0, "AAC (ADTS)"),
    (b"ftyp", 4, "MP4/M4A"),
    (b"\x1a\x45\xdf\xa3", 0, "WebM/Matroska"),
    (b"FORM", 0, "AIFF"),
    (b"caff", 0, "CAF"),
)


@dataclass(frozen=True)
class DecodedAudio:
    samples: Samples  # mono float32 at MODEL_RATE
    source_rate: int
    channels: int
    format: str

    @property
    def duration_s(self) -> float:
        return len(self.samples) / MODEL_RATE


def check_rate(rate: int, what: str = "sample rate") -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InvalidArgument(
            f"{what} is {rate} Hz; accepted are {MIN_RATE}..{MAX_RATE} Hz",
            reason="BAD_SAMPLE_RATE",
            metadata={"min": str(MIN_RATE), "max": str(MAX_RATE)},
        )


def check_channels(channels: int, what: str = "audio") -> None:
    if not 1 <= channels <= MAX_CHANNELS:
        raise InvalidArgument(
            f"{what} has {channels} channels; accepted are 1..{MAX_CHANNELS}",
            reason="BAD_CHANNELS",
            metadata={"max": str(MAX_CHANNELS)},
        )


def check_finite(samples: Samples, what: str = "audio") -> None:
    # A single NaN makes Whisper loop until the call's deadline (found by test_hardening_speech).
    if not np.isfinite(samples).all():
        raise InvalidArgument(
            f"{what} contains NaN or infinite samples; float audio must hold finite values in -1..1",
            reason="NON_FINITE_SAMPLES",
        )


def _unsupported_name(data: bytes) -> str | None:
    for magic, offset, name in KNOWN_UNSUPPORTED:
        if data[offset : offset + len(magic)] == magic:
            return name
    return None


def decode_audio(data: bytes, *, max_bytes: int, max_seconds: float) -> DecodedAudio:
    """Decodes a whole WAV/FLAC/OGG file to 16 kHz mono float32, enforcing the size and duration limits."""
    if not data:
        raise InvalidArgument(f"audio is empty; send a {ACCEPTED} file", reason="EMPTY_AUDIO")
    if len(data) > max_bytes:
        raise InvalidArgument(
            f"audio is {len(data)} bytes; the limit is {max_bytes}",
            reason="AUDIO_TOO_LARGE",
            metadata={"limit": str(max_bytes)},
        )
    unsupported = _unsupported_name(data)
    if unsupported:
        raise InvalidArgument(
            f"audio is {unsupported}, which is not supported; send {ACCEPTED}", reason="UNSUPPORTED_CODEC"
        )
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        if data[:4] in (b"RIFF", b"fLaC", b"OggS"):
            raise InvalidArgument(
                f"audio looks like {data[:4].decode()} but cannot be read ({err}); it may be truncated, corrupt or "
                f"use an unsupported codec; send {ACCEPTED}",
                reason="CORRUPT_AUDIO",
            ) from None
        raise InvalidArgument(f"audio is not a recognised audio file; send {ACCEPTED}", reason="NOT_AUDIO") from None
    accepted = ACCEPTED_SUBTYPES.get(info.format)
    if accepted is None or info.subtype not in accepted:
        raise InvalidArgument(
            f"audio is {info.format} with codec {info.subtype}, which is not supported; send {ACCEPTED}",
            reason="UNSUPPORTED_CODEC",
            metadata={"format": info.format, "codec": info.subtype},
        )
    check_rate(int(info.samplerate), "audio sample rate")
    if info.frames <= 0:
        raise InvalidArgument("audio contains no samples", reason="EMPTY_AUDIO")
    duration = info.frames / info.samplerate
    if duration > max_seconds:
        # Checked from the header, before decoding, so a long file costs no decoding work.
        raise InvalidArgument(
            f"audio is {duration:.1f} s long; the limit is {max_seconds:g} s",
            reason="AUDIO_TOO_LONG",
            metadata={"limit_seconds": f"{max_seconds:g}"},
        )
    check_channels(int(info.channels))
    # Block by block: mixed to mono and resampled as it goes, so only the 16 kHz result grows (a multichannel or
    # compressed file never expands in memory), and at most info.frames frames are read (the header's count, already
    # within the duration limit), whatever the body claims or expands to.
    rate = int(info.samplerate)
    resampler = None if rate == MODEL_RATE else soxr.ResampleStream(rate, MODEL_RATE, 1, dtype="float32")
    pieces: list[Samples] = []
    read = 0
    try:
        with sf.SoundFile(io.BytesIO(data)) as source:
            for block in source.blocks(
                blocksize=DECODE_BLOCK_FRAMES, dtype="float32", always_2d=True, frames=info.frames
            ):
                mono: Samples = block.mean(axis=1, dtype=np.float32)
                check_finite(mono)
                read += len(mono)
                pieces.append(mono if resampler is None else resampler.resample_chunk(mono))
    except (sf.LibsndfileError, RuntimeError) as err:
        raise InvalidArgument(f"audio cannot be decoded ({err}); it may be truncated", reason="CORRUPT_AUDIO") from None
    if read == 0:
        raise InvalidArgument("audio contains no samples", reason="EMPTY_AUDIO")
    if resampler is not None:
        pieces.append(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
    samples: Samples = np.concatenate(pieces).astype(np.float32, copy=False)
    return DecodedAudio(samples, rate, int(info.channels), info.format)


class StreamDecoder:
    """Incremental decoding of a streamed PCM16 or WAV byte stream to 16 kHz mono float32.

    Chunks may split samples or the WAV header anywhere; leftover bytes wait for the next chunk. Resampling is
    stateful (soxr's stream resampler), so chunk boundaries leave no clicks.
    """

    def __init__(self, *, wav: bool, sample_rate: int = 0, channels: int = 1) -> None:
        self.wav = wav
        self.rate = sample_rate
        self.channels = max(channels, 1)
        self.dtype: np.dtype[Any] = np.dtype("<i2")
        self._header_done = not wav
        self._pending = b""
        self._resampler: Any = None
        if not wav:
            check_rate(sample_rate, "config.sample_rate_hz")
            check_channels(self.channels, "config")
            self._start()

    def _start(self) -> None:
        if self.rate != MODEL_RATE:
            self._resampler = soxr.ResampleStream(self.rate, MODEL_RATE, 1, dtype="float32")

    def _parse_header(self) -> bool:
        """Consumes the RIFF header once the data chunk starts; False while more bytes are needed."""
        buf = self._pending
        if len(buf) < 12:
            return False
        if buf[:4] != b"RIFF" or buf[8:12] != b"WAVE":
            raise InvalidArgument("stream does not start with a RIFF/WAVE header", reason="NOT_AUDIO")
        pos = 12
        fmt: tuple[int, int, int, int] | None = None
        while True:
            if len(buf) < pos + 8:
                return False
            chunk_id, size = buf[pos : pos + 4], struct.unpack("<I", buf[pos + 4 : pos + 8])[0]
            if chunk_id == b"data":
                self._pending = buf[pos + 8 :]
                break
            if pos + 8 + size > MAX_STREAM_HEADER_BYTES:
                # A chunk before the data that ends this far in (one may claim 4 GiB): refuse rather than buffer a
                # header that never ends.
                raise InvalidArgument(
                    f"WAV stream header is longer than {MAX_STREAM_HEADER_BYTES} bytes without reaching its data chunk",
                    reason="CORRUPT_AUDIO",
                )
            if len(buf) < pos + 8 + size:
                return False
            if chunk_id == b"fmt ":
                if size < 16:
                    raise InvalidArgument(
                        f"WAV stream's fmt chunk is {size} bytes; it must be at least 16", reason="CORRUPT_AUDIO"
                    )
                tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", buf[pos + 8 : pos + 24])
                fmt = (tag, channels, rate, bits)
            pos += 8 + size + (size & 1)
        if fmt is None:
            raise InvalidArgument("WAV stream has no fmt chunk before its data", reason="CORRUPT_AUDIO")
        tag, channels, rate, bits = fmt
        # 0xFFFE (WAVE_FORMAT_EXTENSIBLE) is taken as PCM/float by its bit depth.
        if (tag, bits) in ((1, 16), (0xFFFE, 16)):
            self.dtype = np.dtype("<i2")
        elif (tag, bits) in ((3, 32), (0xFFFE, 32)):
            self.dtype = np.dtype("<f4")
        else:
            raise InvalidArgument(
                f"WAV stream has codec tag {tag:#06x} with {bits}-bit samples; streams take 16-bit PCM or 32-bit float",
                reason="UNSUPPORTED_CODEC",
            )
        check_rate(rate, "WAV sample rate")
        check_channels(channels, "WAV stream")
        self.rate, self.channels = rate, channels
        self._start()
        self._header_done = True
        return True

    def feed(self, data: bytes, *, last: bool = False) -> Samples:
        self._pending += data
        if not self._header_done and not self._parse_header():
            if last:
                raise InvalidArgument("stream ended inside the WAV header", reason="CORRUPT_AUDIO")
            return np.zeros(0, np.float32)
        frame = self.dtype.itemsize * self.channels
        usable = len(self._pending) - len(self._pending) % frame
        raw, self._pending = self._pending[:usable], self._pending[usable:]
        samples = np.frombuffer(raw, dtype=self.dtype).reshape(-1, self.channels)
        mono: Samples = samples.mean(axis=1, dtype=np.float32)
        if self.dtype.kind == "i":
            mono /= 32768.0
        else:
            check_finite(mono, "audio stream")
        if self._resampler is None:
            return mono
        out: Samples = np.asarray(self._resampler.resample_chunk(mono, last=last), dtype=np.float32)
        return out


def pcm16_bytes(samples: npt.NDArray[Any]) -> bytes:
    """Float samples in [-1, 1] → little-endian signed 16-bit PCM."""
    pcm: bytes = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
    return pcm


def streaming_wav_header(sample_rate: int, channels: int = 1) -> bytes:
    """A 16-bit PCM RIFF header whose sizes are 0xFFFFFFFF: the length is unknown while streaming."""
    block = 2 * channels
    return (
        b"RIFF"
        + struct.pack("<I", 0xFFFFFFFF)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, 16)
        + b"data"
        + struct.pack("<I", 0xFFFFFFFF)
    )


def wav_pcm_payload(data: bytes) -> tuple[bytes, int]:
    """(PCM16 payload, sample rate) of a mono 16-bit WAV as flite and espeak-ng write it (sizes may be bogus)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("synthesiser output is not WAV")
    pos, rate = 12, 0
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if chunk_id == b"fmt ":
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", data[pos + 8 : pos + 24])
            if (tag, channels, bits) != (1, 1, 16):
                raise ValueError(f"synthesiser wrote {bits}-bit, {channels}-channel audio (tag {tag})")
        elif chunk_id == b"data":
            payload = data[pos + 8 :]
            return payload[: len(payload) - len(payload) % 2], rate
        pos += 8 + size + (size & 1)
    raise ValueError("synthesiser output has no data chunk")
