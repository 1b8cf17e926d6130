"""Coverage-guided fuzzing of one byte decoder with atheris (libFuzzer), for `make fuzz`.

    python -m tests.fuzz.run TARGET [libFuzzer flags, e.g. -max_total_time=60 -rss_limit_mb=2048 -timeout=10]

TARGET is one of tests/fuzz/targets.py's TARGETS. It starts from the committed corpus (tests/fuzz/corpus/TARGET/)
and the seed media; an input that makes the target raise anything but its documented error, run past -timeout or
past -rss_limit_mb stops the run and is written as crash-*/timeout-*/oom-* in the current directory: add it to the
corpus (and fix the bug), and tests/test_fuzz_corpus.py replays it in `make test` from then on.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris  # type: ignore[import-untyped]

CORPUS = Path(__file__).resolve().parent / "corpus"


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    name, flags = sys.argv[1], sys.argv[2:]
    with atheris.instrument_imports():
        from tests.fuzz.seeds import seed_blobs
        from tests.fuzz.targets import TARGETS
    if name not in TARGETS:
        raise SystemExit(f"unknown target {name!r}; one of {', '.join(TARGETS)}")
    target = TARGETS[name]
    committed = CORPUS / name
    # libFuzzer adds what it finds to the first corpus folder: a scratch one, so the committed corpus only
    # grows by hand (inputs that found bugs).
    scratch = Path(tempfile.mkdtemp(prefix=f"aimass-fuzz-{name}-"))
    for index, blob in enumerate(seed_blobs()):
        (scratch / f"seed-{index}").write_bytes(blob)
    folders = [str(scratch), *([str(committed)] if committed.is_dir() else [])]
    atheris.Setup([sys.argv[0], *flags, *folders], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
