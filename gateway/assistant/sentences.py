"""Sentences out of a stream of LLM text deltas, so that each can be spoken while the next is being generated.

A sentence ends at ``.``, ``!``, ``?`` (or a run of them, with closing quotes or brackets) followed by white space,
at ``;`` or ``:`` followed by white space once it has ``MIN_CLAUSE_CHARS``, and at a line break. "Dr." and "e.g."
end nothing (a short list of abbreviations), nor does a decimal point ("3.5"), which no white space follows. A
sentence that runs past ``MAX_SENTENCE_CHARS`` without ending is cut at its last comma or space, so that a model
that never stops a sentence does not keep the listener waiting for audio. What is left when generation ends is
the last sentence.

The first piece of a reply may be shorter: it ends at a comma too, once it has ``FIRST_CLAUSE_CHARS``. The listener
hears the reply start as soon as its first clause is generated, not its whole first sentence (a long first sentence
was most of the wait for the first sound); the rest is spoken sentence by sentence.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Final

MIN_CLAUSE_CHARS: Final = 40
FIRST_CLAUSE_CHARS: Final = 30
MAX_SENTENCE_CHARS: Final = 240
ABBREVIATIONS: Final = frozenset(
    {"mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "vs", "etc", "e.g", "i.e", "no", "approx", "fig", "inc"}
)
# A terminator run, optional closing quotes/brackets, then the white space after it.
_END = re.compile(r"([.!?\u2026]+[\"'\u201d\u2019)\]]*)(\s+)|([;:])(\s+)|(\n+)")


class SentenceSplitter:
    """Feed deltas; take complete sentences as they form, and the rest at the end."""

    def __init__(self) -> None:
        self._buffer = ""
        self._first = True

    def feed(self, delta: str) -> Iterator[str]:
        self._buffer += delta
        while True:
            cut = self._next_cut()
            if cut is None:
                return
            sentence, self._buffer = self._buffer[:cut].strip(), self._buffer[cut:]
            if sentence:
                self._first = False
                yield sentence

    def flush(self) -> str | None:
        """What is left at the end of generation, or None when nothing is."""
        rest, self._buffer = self._buffer.strip(), ""
        return rest or None

    def _next_cut(self) -> int | None:
        searched = 0
        while (match := _END.search(self._buffer, searched)) is not None:
            searched = match.end()
            if match.group(1) is not None:
                if match.group(1).startswith(".") and self._abbreviation_before(match.start()):
                    continue
                return match.end(2)
            if match.group(3) is not None:
                if match.start() >= MIN_CLAUSE_CHARS:
                    return match.end(4)
                continue
            return match.end(5)
        if self._first and (comma := self._buffer.find(", ", FIRST_CLAUSE_CHARS - 1)) >= 0:
            return comma + 2
        if len(self._buffer) > MAX_SENTENCE_CHARS:
            head = self._buffer[:MAX_SENTENCE_CHARS]
            comma = head.rfind(", ")
            space = head.rfind(" ")
            cut = comma + 2 if comma > 0 else space + 1 if space > 0 else MAX_SENTENCE_CHARS
            return cut
        return None

    def _abbreviation_before(self, dot: int) -> bool:
        word = self._buffer[:dot].rsplit(None, 1)[-1] if self._buffer[:dot].strip() else ""
        return word.lower().rstrip(".") in ABBREVIATIONS
