"""Every input that once found a bug in a byte decoder (tests/fuzz/corpus/<target>/, kept from `make fuzz` runs)
is replayed through its target: it must now get the target's documented answer (tests/fuzz/targets.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.seeds import seed_blobs
from tests.fuzz.targets import TARGETS

CORPUS = Path(__file__).resolve().parent / "fuzz" / "corpus"
CASES = sorted(path for path in CORPUS.glob("*/*") if path.is_file())


@pytest.mark.parametrize("path", CASES, ids=[f"{p.parent.name}/{p.name}" for p in CASES])
def test_a_corpus_input_gets_its_documented_answer(path: Path) -> None:
    TARGETS[path.parent.name](path.read_bytes())


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_target_takes_the_seed_media_and_random_junk(name: str) -> None:
    for blob in (*seed_blobs(), b"", b"\x00" * 64, b"RIFF" + b"\xff" * 60, b"\x89PNG\r\n\x1a\n" + b"\x00" * 40):
        TARGETS[name](blob)
