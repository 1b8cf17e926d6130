"""The assistant's parts without a mesh: sentences out of streamed deltas (gateway/assistant/sentences.py), turns out
of microphone audio (gateway/assistant/turns.py, on espeak-ng speech), sessions' length budget."""

from __future__ import annotations

import io
import subprocess

import numpy as np
import pytest
import soundfile  # type: ignore[import-untyped]

from gateway.assistant.sentences import MAX_SENTENCE_CHARS, SentenceSplitter
from gateway.assistant.sessions import within_budget
from gateway.assistant.turns import FRAME_MS, Event, TurnDetector


def split(text: str, step: int = 3) -> list[str]:
    """``text`` fed ``step`` characters at a time (as an LLM streams it), then flushed."""
    splitter = SentenceSplitter()
    pieces = [s for i in range(0, len(text), step) for s in splitter.feed(text[i : i + step])]
    rest = splitter.flush()
    return pieces + ([rest] if rest else [])


def test_sentences_end_at_terminators_not_at_abbreviations_or_decimals() -> None:
    assert split("The capital of France is Paris. It costs 3.5 euros, e.g. for Dr. Smith! Really? Yes") == [
        "The capital of France is Paris.",
        "It costs 3.5 euros, e.g. for Dr. Smith!",
        "Really?",
        "Yes",
    ]


def test_the_first_clause_is_spoken_early_and_a_runaway_sentence_is_cut() -> None:
    # The first piece ends at a comma once it is long enough; later ones only at a sentence's end.
    assert split("The tallest mountain in the world is Mount Everest, but not the highest, as Chimborazo is. No.") == [
        "The tallest mountain in the world is Mount Everest,",
        "but not the highest, as Chimborazo is.",
        "No.",
    ]
    runaway = "word " * 100
    pieces = split(runaway)
    assert all(len(p) <= MAX_SENTENCE_CHARS for p in pieces) and " ".join(pieces).split() == runaway.split()


def test_a_line_break_ends_a_sentence_and_nothing_is_lost() -> None:
    text = "First line without a stop\nSecond: a clause that is long enough to stand alone; and the rest"
    pieces = split(text, step=1)
    assert pieces[0] == "First line without a stop"
    assert " ".join(pieces).split() == text.split()


def espeak(text: str, rate: int) -> np.ndarray:
    wav = subprocess.run(
        ["espeak-ng", "-v", "en-us", "--stdout", "--", text], capture_output=True, check=True, timeout=30
    ).stdout
    samples, native = soundfile.read(io.BytesIO(wav), dtype="int16")
    assert native == 22050
    if rate == native:
        return np.asarray(samples)
    positions = np.linspace(0, len(samples) - 1, round(len(samples) * rate / native))
    resampled: np.ndarray = np.interp(positions, np.arange(len(samples)), samples).astype(np.int16)
    return resampled


@pytest.mark.parametrize("rate", [16000, 22050, 48000])
def test_speech_starts_and_ends_turns_and_silence_does_not(rate: int) -> None:
    speech = espeak("What is the capital of France?", rate)
    silence = np.zeros(rate, dtype=np.int16)  # a second
    pcm = np.concatenate([silence, speech, silence, speech, silence]).astype("<i2").tobytes()
    detector = TurnDetector(rate, silence_ms=700)
    step = rate // 10 * 2  # 100 ms chunks
    events = []
    for start in range(0, len(pcm), step):
        chunk = pcm[start : start + step]
        for detected in detector.feed(chunk):
            assert 0 < detected.offset <= len(chunk)
            events.append((detected.event, detected.at_s))
            if detected.event is Event.ONSET:
                # The pre-roll holds the onset's own frames: it is speech, not the silence before it.
                roll = np.frombuffer(detector.pre_roll(), dtype="<i2")
                assert np.abs(roll[-len(roll) // 3 :]).max() > 1000
    speech_s = len(speech) / rate
    assert [e for e, _ in events] == [Event.ONSET, Event.END_OF_TURN] * 2
    first_onset, first_end, second_onset, _ = (at for _, at in events)
    # Onsets within a quarter second of the speech; ends 0.7 s of silence (plus espeak's trailing quiet) after it.
    assert 1.0 <= first_onset <= 1.25
    assert 1.0 + speech_s + 0.3 <= first_end <= 1.0 + speech_s + 0.7 + FRAME_MS / 1000
    assert 2.0 + speech_s <= second_onset <= 2.25 + speech_s


def test_a_click_is_not_speech() -> None:
    detector = TurnDetector(16000)
    click = np.zeros(16000, dtype=np.int16)
    click[8000:8080] = 20000
    assert list(detector.feed(click.astype("<i2").tobytes())) == []


def test_a_session_keeps_its_newest_turns_within_its_budget() -> None:
    turns = [("user", "a" * 10), ("assistant", "b" * 10), ("user", "c" * 10), ("assistant", "d" * 10)]
    assert within_budget(turns, 40) == tuple(turns)
    # Whole old turns go first (a user message with its reply), never half of one.
    assert within_budget(turns, 39) == tuple(turns[2:])
    assert within_budget([*turns, ("user", "e" * 50)], 40) == (("user", "e" * 50),)
