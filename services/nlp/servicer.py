"""aimass.v1.NlpService: validate, hand the work to the engine through batchers, shape the reply.

Thin by design: limits and model names are checked here (INVALID_ARGUMENT / NOT_FOUND with what is allowed),
the models live in ``engine``, and errors become statuses in the runtime's error interceptor. ``meta.priority``
orders the batchers' queues when the replica is contended (higher priorities are batched first).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from aimass.runtime.batcher import DynamicBatcher
from aimass.runtime.config import NlpConfig
from aimass.runtime.custom_heads import CustomHeads, custom_model, refuse_labels
from aimass.runtime.errors import InvalidArgument
from aimass.runtime.models import serving_model
from aimass.runtime.scope import QueueTerms, current_scope, deadline_of, priority_rank
from aimass.training.artifact import HeadArtifact
from aimass.v1 import common_pb2, nlp_pb2, nlp_pb2_grpc
from services.nlp.engine import (
    EMBED_MODEL,
    MODELS,
    NER_MODEL,
    SENTIMENT_MODEL,
    Embedded,
    EmbedJob,
    EntitySpan,
    NlpEngine,
    SentimentResult,
    zero_shot_scores,
)

Context = grpc.aio.ServicerContext[Any, Any]
DEFAULT_HYPOTHESIS = "This text is about {}."
LABEL_CACHE_SIZE = 4096
# VADER scores ~100 characters in ~12 µs, while a hop to a worker thread costs ~100 µs: short ASCII inputs run
# inline (well under a millisecond on the event loop), long ones in the pool. Not other text: VADER reads each emoji
# as its description ("grinning face"), so 2,000 emoji are ~30,000 characters of work (~90 ms).
INLINE_SENTIMENT_CHARS = 2_000


class NlpServicer(nlp_pb2_grpc.NlpServiceServicer):
    """``heads``: tenants' own text classifiers this replica hosts (Classify by their name)."""

    def __init__(self, engine: NlpEngine, config: NlpConfig, heads: CustomHeads | None = None) -> None:
        self.engine = engine
        self.config = config
        self.heads = heads
        batching = config.embed_batching
        self.embed_batcher: DynamicBatcher[EmbedJob, Embedded] = DynamicBatcher.from_config(
            engine.embed_batch, batching, name="embed", size_of=lambda job: len(job.texts)
        )
        # One NER batch at a time, whatever max_concurrent_batches embed_batching allows.
        self.ner_batcher: DynamicBatcher[tuple[str, ...], list[list[EntitySpan]]] = DynamicBatcher.from_config(
            engine.entities_batch,
            batching.model_copy(update={"max_concurrent_batches": 1}),
            name="entities",
            size_of=len,
        )
        # Sentiment is cheap and lock-free: long inputs go to a small pool, off the event loop, with no batching delay.
        self.cpu_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nlp-cpu")
        self._label_cache: dict[tuple[str, str], npt.NDArray[np.float32]] = {}

    async def start(self) -> None:
        await self.embed_batcher.start()
        await self.ner_batcher.start()

    async def close(self) -> None:
        await self.embed_batcher.close(drain=True)
        await self.ner_batcher.close(drain=True)
        self.cpu_pool.shutdown(wait=True)

    # -- validation ---------------------------------------------------------------------------------------------

    def _model(self, requested: common_pb2.ModelRef, served: str, where: str) -> common_pb2.ModelRef:
        return serving_model(requested, served, where, loaded=self.engine.loaded)

    def _check_texts(
        self, texts: Sequence[str], field: str = "texts", *, max_request_chars: int | None = None
    ) -> tuple[str, ...]:
        limit = self.config.max_text_chars
        request_limit = max_request_chars or self.config.max_request_chars
        if not texts:
            raise InvalidArgument(
                f"{field} is empty; send between 1 and {self.config.max_items} texts", reason="NO_INPUT"
            )
        if len(texts) > self.config.max_items:
            raise InvalidArgument(
                f"{field} has {len(texts)} items; the limit is {self.config.max_items} per request",
                reason="TOO_MANY_ITEMS",
                metadata={"limit": str(self.config.max_items)},
            )
        for index, text in enumerate(texts):
            if not text.strip():
                raise InvalidArgument(
                    f"{field}[{index}] is empty; every text needs at least one non-space character", reason="EMPTY_TEXT"
                )
            if len(text) > limit:
                raise InvalidArgument(
                    f"{field}[{index}] is {len(text)} characters; the limit is {limit}",
                    reason="TEXT_TOO_LONG",
                    metadata={"limit": str(limit), "index": str(index)},
                )
        total = sum(map(len, texts))
        if total > request_limit:
            raise InvalidArgument(
                f"{field} has {total} characters in all; the limit is {request_limit} per request "
                "(send fewer or shorter texts per call)",
                reason="REQUEST_TOO_LARGE",
                metadata={"limit": str(request_limit)},
            )
        return tuple(texts)

    def _check_labels(self, request: nlp_pb2.ClassifyRequest) -> tuple[str, ...]:
        labels = tuple(label.strip() for label in request.labels)
        minimum = 1 if request.multi_label else 2
        if not minimum <= len(labels) <= self.config.max_labels:
            raise InvalidArgument(
                f"labels has {len(labels)} items; send between {minimum} and {self.config.max_labels}"
                + ("" if request.multi_label else " (or set multi_label for a single label)"),
                reason="BAD_LABELS",
            )
        if any(not label for label in labels):
            raise InvalidArgument("labels contains an empty label", reason="BAD_LABELS")
        if len(set(labels)) != len(labels):
            raise InvalidArgument("labels contains duplicates", reason="BAD_LABELS")
        limit = self.config.max_label_chars
        for index, label in enumerate(labels):
            if len(label) > limit:
                raise InvalidArgument(
                    f"labels[{index}] ({label[:20]!r}...) is {len(label)} characters; the limit is {limit}",
                    reason="BAD_LABELS",
                    metadata={"limit": str(limit), "index": str(index)},
                )
        return labels

    def _check_template(self, template: str) -> tuple[str, str]:
        """The text before and after the template's one ``{}``. The caller's template never reaches str.format: a
        format spec such as ``{0:>400000000}`` would make it build a string of any size."""
        limit = self.config.max_template_chars
        if len(template) > limit:
            raise InvalidArgument(
                f"hypothesis_template is {len(template)} characters; the limit is {limit}",
                reason="BAD_TEMPLATE",
                metadata={"limit": str(limit)},
            )
        before, placeholder, after = template.partition("{}")
        if not placeholder or any(brace in before + after for brace in "{}"):
            raise InvalidArgument(
                "hypothesis_template must contain '{}' exactly once and no other '{' or '}' (fields, format specs "
                f"and escapes such as '{{0}}', '{{:>9}}' or '{{{{' are not allowed), e.g. {DEFAULT_HYPOTHESIS!r}",
                reason="BAD_TEMPLATE",
            )
        return before, after

    # -- methods ------------------------------------------------------------------------------------------------

    async def Embed(self, request: nlp_pb2.EmbedRequest, context: Context) -> nlp_pb2.EmbedResponse:
        model = self._model(request.model, EMBED_MODEL, "NlpService.Embed")
        texts = self._check_texts(request.texts)
        terms = current_scope().queue_terms(request.meta.priority)
        embedded = await self.embed_batcher.submit(EmbedJob(texts, request.normalize, count_tokens=True), **terms)
        return nlp_pb2.EmbedResponse(
            model=model,
            embeddings=[nlp_pb2.Embedding(values=row.tolist()) for row in embedded.vectors],
            dimensions=int(embedded.vectors.shape[1]),
            input_tokens=embedded.tokens,
        )

    async def Sentiment(self, request: nlp_pb2.SentimentRequest, context: Context) -> nlp_pb2.SentimentResponse:
        model = self._model(request.model, SENTIMENT_MODEL, "NlpService.Sentiment")
        texts = self._check_texts(request.texts)
        priority_rank(request.meta.priority)  # not queued, so it has no effect here, but it must be valid
        if sum(map(len, texts)) <= INLINE_SENTIMENT_CHARS and all(map(str.isascii, texts)):
            results = self.engine.sentiment(texts)
        else:
            results = await self._sentiment_in_pool(texts, deadline_of(context))
        return nlp_pb2.SentimentResponse(
            model=model,
            results=[
                nlp_pb2.SentimentScore(
                    label=r.label, compound=r.compound, positive=r.positive, negative=r.negative, neutral=r.neutral
                )
                for r in results
            ],
        )

    async def _sentiment_in_pool(self, texts: tuple[str, ...], deadline: float | None) -> list[SentimentResult]:
        """Sentiment in the worker pool, stopped between texts once the call is cancelled or past its deadline."""
        loop = asyncio.get_running_loop()
        expires = None if deadline is None else time.monotonic() + (deadline - loop.time())
        done = threading.Event()

        def stop() -> bool:
            return done.is_set() or (expires is not None and time.monotonic() >= expires)

        try:
            return await loop.run_in_executor(self.cpu_pool, self.engine.sentiment, texts, stop)
        finally:
            done.set()  # cancelled (or finished): whatever is left is for nobody

    async def Entities(self, request: nlp_pb2.EntitiesRequest, context: Context) -> nlp_pb2.EntitiesResponse:
        model = self._model(request.model, NER_MODEL, "NlpService.Entities")
        texts = self._check_texts(request.texts, max_request_chars=self.config.max_entities_request_chars)
        documents = await self.ner_batcher.submit(texts, **current_scope().queue_terms(request.meta.priority))
        return nlp_pb2.EntitiesResponse(
            model=model,
            documents=[
                nlp_pb2.DocumentEntities(
                    entities=[
                        nlp_pb2.Entity(text=e.text, label=e.label, start_char=e.start_char, end_char=e.end_char)
                        for e in spans
                    ]
                )
                for spans in documents
            ],
        )

    def _check_pairs(self, texts: int, labels: int) -> None:
        pairs = texts * labels
        if pairs > self.config.max_classify_pairs:
            raise InvalidArgument(
                f"{texts} texts x {labels} labels is {pairs} scores; the limit is "
                f"{self.config.max_classify_pairs} per request (send fewer texts per call)",
                reason="TOO_MANY_PAIRS",
                metadata={"limit": str(self.config.max_classify_pairs)},
            )

    async def Classify(self, request: nlp_pb2.ClassifyRequest, context: Context) -> nlp_pb2.ClassifyResponse:
        custom = custom_model(
            self.heads,
            request.model,
            builtin=MODELS,
            served=EMBED_MODEL,
            where="NlpService.Classify",
            loaded=self.engine.loaded,
        )
        if custom is not None:
            return await self._classify_with_head(request, *custom)
        model = self._model(request.model, EMBED_MODEL, "NlpService.Classify")
        texts = self._check_texts(request.texts)
        labels = self._check_labels(request)
        template = request.hypothesis_template or DEFAULT_HYPOTHESIS
        self._check_template(template)
        self._check_pairs(len(texts), len(labels))
        terms = current_scope().queue_terms(request.meta.priority)
        text_vectors, label_vectors = await asyncio.gather(
            self.embed_batcher.submit(EmbedJob(texts, True), **terms), self._label_vectors(labels, template, terms)
        )
        scores = zero_shot_scores(text_vectors.vectors, label_vectors, multi_label=request.multi_label)
        return nlp_pb2.ClassifyResponse(model=model, results=_ranked(scores, labels))

    async def _classify_with_head(
        self, request: nlp_pb2.ClassifyRequest, model: common_pb2.ModelRef, head: HeadArtifact
    ) -> nlp_pb2.ClassifyResponse:
        """A tenant's trained classifier: its head over the texts' normalised MiniLM embeddings (the features it
        was trained on), through the same batcher as Embed; every one of its labels, best first."""
        texts = self._check_texts(request.texts)
        if request.labels:
            raise refuse_labels(model, head)
        if request.multi_label:
            raise InvalidArgument(
                f"{model.name} is a trained single-label classifier (its scores sum to 1); leave multi_label unset",
                reason="MULTI_LABEL_NOT_ALLOWED",
            )
        if request.hypothesis_template:
            raise InvalidArgument(
                f"{model.name} is a trained classifier: hypothesis_template is for zero-shot labels; leave it empty",
                reason="BAD_TEMPLATE",
            )
        self._check_pairs(len(texts), len(head.labels))
        terms = current_scope().queue_terms(request.meta.priority)
        embedded = await self.embed_batcher.submit(EmbedJob(texts, True), **terms)
        return nlp_pb2.ClassifyResponse(model=model, results=_ranked(head.probabilities(embedded.vectors), head.labels))

    async def _label_vectors(
        self, labels: tuple[str, ...], template: str, terms: QueueTerms
    ) -> npt.NDArray[np.float32]:
        """Embeddings of the label hypotheses; labels recur across requests, so they are cached."""
        missing = tuple(label for label in labels if (label, template) not in self._label_cache)
        if missing:
            before, after = self._check_template(template)
            hypotheses = tuple(before + label + after for label in missing)
            embedded = await self.embed_batcher.submit(EmbedJob(hypotheses, True), **terms)
            for label, vector in zip(missing, embedded.vectors, strict=True):
                if len(self._label_cache) >= LABEL_CACHE_SIZE:
                    self._label_cache.pop(next(iter(self._label_cache)))  # oldest first: dicts keep insertion order
                self._label_cache[(label, template)] = vector
        return np.stack([self._label_cache[(label, template)] for label in labels])


def _ranked(scores: npt.NDArray[np.floating[Any]], labels: Sequence[str]) -> list[nlp_pb2.Classification]:
    """One Classification per row of ``scores`` (texts x labels), every label, highest score first."""
    results = []
    for row in scores:
        order = np.argsort(-row, kind="stable")
        results.append(
            nlp_pb2.Classification(scores=[nlp_pb2.LabelScore(label=labels[i], score=float(row[i])) for i in order])
        )
    return results
