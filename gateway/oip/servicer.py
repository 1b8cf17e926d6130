"""``inference.GRPCInferenceService`` (the Open Inference Protocol v2, as KServe and Triton serve it) on the gateway
port: an adapter over aimass.v1, adding no capability of its own.

ModelInfer decodes the request's tensors (gateway.oip.tensors), checks them against the model's inputs
(gateway.oip.models) before anything is sent, builds the aimass.v1 request (NlpService.Embed/Classify/Sentiment,
VisionService.Classify, SpeechService.Transcribe) and sends it through the gateway's own Forwarder in this process:
the caller's OIP call was authenticated, admitted and metered by the gateway's interceptors like any call, and the
forwarded call is routed, retried and traced exactly as the same aimass.v1 call would be. A replica's error ends the
OIP call with the replica's status and message. Which models exist for the caller is the catalogue's answer
(ModelService.ListModels, asked in this process with the caller's scope, so a tenant sees its own trained models and
no one else's), kept per tenant for ``CATALOGUE_TTL_S`` and asked again at once for a name it does not know.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc
import numpy as np
from google.protobuf.message import Message

import aimass
from aimass.oip.v2 import grpc_predict_v2_pb2 as oip
from aimass.runtime.config import Settings
from aimass.runtime.errors import InvalidArgument, NotFound
from aimass.runtime.interceptors import SERVED_ELSEWHERE
from aimass.runtime.scope import current_scope
from aimass.tenancy.keys import SCOPE_MODELS_TRAIN
from aimass.v1 import common_pb2, models_pb2, nlp_pb2, speech_pb2, vision_pb2
from gateway.forwarder import Forwarder
from gateway.model_catalogue import ModelCatalogueServicer
from gateway.oip.models import TRITON_PARAMETERS, Kind, OipModel, exposed, some_names
from gateway.oip.reflection import OIP_SERVICE
from gateway.oip.tensors import Outputs, Tensor, decode_inputs

Context = grpc.aio.ServicerContext[Any, Any]
Parameter = bool | int | str | float

# How long a tenant's view of the catalogue is reused (a name not in it is looked up again at once).
CATALOGUE_TTL_S: Final = 5.0
# A name the catalogue did not know is looked up again at most this often per tenant.
MISS_REFRESH_S: Final = 1.0
MAX_CACHED_VIEWS: Final = 1024
# Audio files per ModelInfer (each is one Transcribe).
MAX_AUDIO_FILES: Final = 16
# Text of the dimension probe an embedder's ModelMetadata sends once, when its width is not known yet.
PROBE_TEXT: Final = "dimension probe"
SERVICES: Final = ("aimass.v1.NlpService", "aimass.v1.VisionService", "aimass.v1.SpeechService")


@dataclass(slots=True)
class _View:
    """One tenant's models as the catalogue listed them."""

    infos: Sequence[models_pb2.ModelInfo]
    listed_at: float
    models: dict[str, OipModel]
    dimensions_seen: int  # len(embed dimensions) when ``models`` was built


class OipServicer:
    """The protocol's six methods; ``generic_handler()`` serves them under /inference.GRPCInferenceService/."""

    def __init__(self, forwarder: Forwarder, catalogue: ModelCatalogueServicer, settings: Settings) -> None:
        self.forwarder = forwarder
        self.catalogue = catalogue
        self.max_texts = settings.nlp.max_items
        self.max_labels = settings.nlp.max_labels
        self.max_images = settings.vision.max_images
        # Embedder → output width, learnt from its answers (never a constant: models differ).
        self.dimensions: dict[str, int] = {}
        # (tenant, sees its own models) → its view; shared lookups while one is under way.
        self._views: collections.OrderedDict[tuple[str, bool], _View] = collections.OrderedDict()
        self._listing: dict[tuple[str, bool], asyncio.Task[_View]] = {}

    def generic_handler(self) -> grpc.GenericRpcHandler:
        methods: dict[str, tuple[Callable[[Any, Context], Awaitable[Message]], type[Message], type[Message]]] = {
            "ServerLive": (self.ServerLive, oip.ServerLiveRequest, oip.ServerLiveResponse),
            "ServerReady": (self.ServerReady, oip.ServerReadyRequest, oip.ServerReadyResponse),
            "ModelReady": (self.ModelReady, oip.ModelReadyRequest, oip.ModelReadyResponse),
            "ServerMetadata": (self.ServerMetadata, oip.ServerMetadataRequest, oip.ServerMetadataResponse),
            "ModelMetadata": (self.ModelMetadata, oip.ModelMetadataRequest, oip.ModelMetadataResponse),
            "ModelInfer": (self.ModelInfer, oip.ModelInferRequest, oip.ModelInferResponse),
        }
        # Metrics label these calls by method (they are not in protobuf's default pool under their wire names).
        SERVED_ELSEWHERE.update(f"/{OIP_SERVICE}/{name}" for name in methods)
        return grpc.method_handlers_generic_handler(
            OIP_SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(
                    behaviour, request_deserializer=request.FromString, response_serializer=response.SerializeToString
                )
                for name, (behaviour, request, response) in methods.items()
            },
        )

    # -- server ---------------------------------------------------------------------------------------------------

    async def ServerLive(self, request: oip.ServerLiveRequest, context: Context) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request: oip.ServerReadyRequest, context: Context) -> oip.ServerReadyResponse:
        # Ready when some replica of a service with tensor-shaped models is healthy.
        replicas = self.forwarder.replicas
        return oip.ServerReadyResponse(ready=any(replicas.healthy(service) for service in SERVICES))

    async def ServerMetadata(self, request: oip.ServerMetadataRequest, context: Context) -> oip.ServerMetadataResponse:
        # "parameters": requests' parameters are honoured (see gateway.oip.models).
        return oip.ServerMetadataResponse(name="aimass", version=aimass.__version__, extensions=["parameters"])

    # -- models ---------------------------------------------------------------------------------------------------

    async def ModelReady(self, request: oip.ModelReadyRequest, context: Context) -> oip.ModelReadyResponse:
        models = exposed(await self._list(context, loaded_only=True), self.dimensions)
        model = models.get(request.name)
        ready = model is not None and (not request.version or request.version == model.default_version)
        return oip.ModelReadyResponse(ready=ready)

    async def ModelMetadata(self, request: oip.ModelMetadataRequest, context: Context) -> oip.ModelMetadataResponse:
        model = await self._model(request.name, request.version, context)
        if model.kind is Kind.EMBED and model.model not in self.dimensions:
            # Its width is learnt from one short embedding, once.
            await self._embed(model, [PROBE_TEXT], {}, request.version, context)
            model = await self._model(request.name, request.version, context)
        return model.metadata()

    async def _list(self, context: Context, *, loaded_only: bool = False) -> Sequence[models_pb2.ModelInfo]:
        answer = await self.catalogue.ListModels(models_pb2.ListModelsRequest(loaded_only=loaded_only), context)
        return answer.models

    async def _view(self, context: Context, *, fresh_within: float = CATALOGUE_TTL_S) -> _View:
        scope = current_scope()
        key = (scope.tenant, not scope.key_id or SCOPE_MODELS_TRAIN in scope.scopes)
        view = self._views.get(key)
        now = time.monotonic()
        if view is None or now - view.listed_at > fresh_within:
            task = self._listing.get(key)
            if task is None:
                task = self._listing[key] = asyncio.get_running_loop().create_task(self._fetch_view(context))
                task.add_done_callback(lambda _: self._listing.pop(key, None))
            view = await asyncio.shield(task)
            self._views[key] = view
            while len(self._views) > MAX_CACHED_VIEWS:
                self._views.popitem(last=False)
        if view.dimensions_seen != len(self.dimensions):
            view.models = exposed(view.infos, self.dimensions)
            view.dimensions_seen = len(self.dimensions)
        return view

    async def _fetch_view(self, context: Context) -> _View:
        infos = await self._list(context)
        return _View(infos, time.monotonic(), exposed(infos, self.dimensions), len(self.dimensions))

    async def _model(self, name: str, version: str, context: Context) -> OipModel:
        """The model ``name`` as the caller may use it; NOT_FOUND (naming some that exist) when there is none."""
        if not name:
            raise InvalidArgument("model_name is empty: name a model (ModelMetadata lists its tensors)")
        view = await self._view(context)
        model = view.models.get(name)
        if model is None:
            view = await self._view(context, fresh_within=MISS_REFRESH_S)
            model = view.models.get(name)
        if model is None:
            raise NotFound(
                f"no model {name!r} is served over the Open Inference Protocol here; models: {some_names(view.models)}",
                reason="MODEL_NOT_FOUND",
                metadata={"model": name},
            )
        if version and version not in model.versions:
            raise NotFound(
                f"{name} has no version {version!r}; its versions are {', '.join(model.versions) or 'none'}",
                reason="VERSION_NOT_FOUND",
                metadata={"model": name, "version": version},
            )
        return model

    # -- inference ------------------------------------------------------------------------------------------------

    async def ModelInfer(self, request: oip.ModelInferRequest, context: Context) -> oip.ModelInferResponse:
        model = await self._model(request.model_name, request.model_version, context)
        parameters = _parameters(model, request.parameters)
        _check_outputs(model, request)
        inputs = decode_inputs(request, max_elements=self._check_inputs(model, request))
        version = request.model_version
        outputs = Outputs.empty()
        texts = _texts(inputs.get("TEXT"))
        if model.kind is Kind.EMBED:
            vectors = await self._embed(model, texts, parameters, version, context)
            outputs.add_array("EMBEDDING", "FP32", vectors)
        elif model.kind in (Kind.ZERO_SHOT, Kind.TEXT_CLASSIFIER):
            classify = nlp_pb2.ClassifyRequest(
                model=_ref(model, version),
                texts=texts,
                labels=_texts(inputs.get("CANDIDATE_LABELS")),
                multi_label=bool(parameters.get("multi_label", False)),
                hypothesis_template=str(parameters.get("hypothesis_template", "")),
            )
            answer = await self._call(Kind.ZERO_SHOT.method, classify, nlp_pb2.ClassifyResponse, context)
            _ranked(outputs, [[(s.label, s.score) for s in result.scores] for result in answer.results])
        elif model.kind is Kind.SENTIMENT:
            sentiment = nlp_pb2.SentimentRequest(model=_ref(model, version), texts=texts)
            scored = await self._call(model.kind.method, sentiment, nlp_pb2.SentimentResponse, context)
            outputs.add_bytes("LABEL", [len(scored.results)], [r.label.encode() for r in scored.results])
            for name in ("compound", "positive", "negative", "neutral"):
                outputs.add_array(name.upper(), "FP32", np.array([getattr(r, name) for r in scored.results]))
        elif model.kind is Kind.IMAGE_CLASSIFIER:
            images = inputs["IMAGE"].data
            assert isinstance(images, list)
            vision = vision_pb2.VisionServiceClassifyRequest(
                model=_ref(model, version),
                images=[vision_pb2.Image(data=image) for image in images],
                top_k=int(parameters.get("top_k", 0)),
            )
            found = await self._call(model.kind.method, vision, vision_pb2.VisionServiceClassifyResponse, context)
            _ranked(outputs, [[(label.label, label.score) for label in r.labels] for r in found.results])
            outputs.add_array(
                "CLASS_INDEX", "INT32", np.array([[x.class_index for x in r.labels] for r in found.results])
            )
        else:
            audio = inputs["AUDIO"].data
            assert isinstance(audio, list)
            language = str(parameters.get("language", ""))
            calls = [
                asyncio.ensure_future(
                    self._call(
                        model.kind.method,
                        speech_pb2.TranscribeRequest(model=_ref(model, version), audio=clip, language=language),
                        speech_pb2.TranscribeResponse,
                        context,
                    )
                )
                for clip in audio
            ]
            try:
                heard = await asyncio.gather(*calls)
            except BaseException:
                # The first failure ended the OIP call with its status: the other files' calls are of no use now.
                for call in calls:
                    call.cancel()
                raise
            outputs.add_bytes("TEXT", [len(heard)], [h.text.encode() for h in heard])
            outputs.add_bytes("LANGUAGE", [len(heard)], [h.language.encode() for h in heard])
        return outputs.response(request, version or model.default_version)

    def _check_inputs(self, model: OipModel, request: oip.ModelInferRequest) -> dict[str, int]:
        """Every input of ``model`` present, none other, each of its datatype and rank; the most elements each may
        hold. Only the request's descriptions are read: nothing is decoded yet."""
        sent = {tensor.name: tensor for tensor in request.inputs}
        expected = ", ".join(f"{s.name} ({s.datatype} {list(s.shape)})" for s in model.inputs)
        for spec in model.inputs:
            tensor = sent.get(spec.name)
            if tensor is None:
                raise InvalidArgument(
                    f"{model.name} needs input {spec.name!r}; send {expected}",
                    reason="MISSING_INPUT",
                    metadata={"input": spec.name},
                )
            if tensor.datatype != spec.datatype:
                raise InvalidArgument(
                    f"input {spec.name!r} of {model.name} is {spec.datatype}, not {tensor.datatype or '(none)'}",
                    reason="BAD_DATATYPE",
                    metadata={"input": spec.name},
                )
            fits = len(tensor.shape) == len(spec.shape) and all(
                want in (-1, got) for want, got in zip(spec.shape, tensor.shape, strict=True)
            )
            if not fits:
                raise InvalidArgument(
                    f"input {spec.name!r} of {model.name} has shape {list(tensor.shape)}; it takes {list(spec.shape)} "
                    "(-1: any size)",
                    reason="BAD_SHAPE",
                    metadata={"input": spec.name},
                )
        unknown = sorted(set(sent) - {spec.name for spec in model.inputs})
        if unknown:
            raise InvalidArgument(
                f"{model.name} has no input {', '.join(map(repr, unknown))}; send {expected}", reason="UNKNOWN_INPUT"
            )
        limits = {"TEXT": self.max_texts, "CANDIDATE_LABELS": self.max_labels, "IMAGE": self.max_images}
        return {spec.name: limits.get(spec.name, MAX_AUDIO_FILES) for spec in model.inputs}

    async def _embed(
        self, model: OipModel, texts: list[str], parameters: Mapping[str, Parameter], version: str, context: Context
    ) -> np.ndarray[Any, np.dtype[np.float32]]:
        embed = nlp_pb2.EmbedRequest(
            model=_ref(model, version), texts=texts, normalize=bool(parameters.get("normalize", False))
        )
        answer = await self._call(Kind.EMBED.method, embed, nlp_pb2.EmbedResponse, context)
        self.dimensions[model.model] = answer.dimensions
        vectors = np.array([e.values for e in answer.embeddings], dtype=np.float32)
        return vectors.reshape(len(answer.embeddings), answer.dimensions)

    async def _call(self, method: str, request: Message, response: type[Any], context: Context) -> Any:
        return response.FromString(await self.forwarder.call_unary(method, request.SerializeToString(), context))


def _ref(model: OipModel, version: str) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=model.model, version=version)


def _texts(tensor: Tensor | None) -> list[str]:
    if tensor is None:
        return []
    texts = []
    for index, item in enumerate(tensor.data):
        try:
            texts.append(item.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise InvalidArgument(
                f"element {index} of input {tensor.name!r} is not UTF-8 text ({err.reason} at byte {err.start})",
                reason="BAD_TEXT",
                metadata={"input": tensor.name},
            ) from err
    return texts


def _ranked(outputs: Outputs, rows: Sequence[Sequence[tuple[str, float]]]) -> None:
    """LABELS and SCORES [n, k]: each row best first, as aimass.v1's classifiers rank them."""
    k = len(rows[0]) if rows else 0
    if any(len(row) != k for row in rows):
        raise RuntimeError("the classifier ranked a different number of labels for some inputs")
    outputs.add_bytes("LABELS", [len(rows), k], [label.encode() for row in rows for label, _ in row])
    scores = np.array([[score for _, score in row] for row in rows], dtype=np.float32).reshape(len(rows), k)
    outputs.add_array("SCORES", "FP32", scores)


def _parameters(model: OipModel, sent: Mapping[str, oip.InferParameter]) -> dict[str, Parameter]:
    """The request's parameters ``model`` takes, each checked for its type; any other refused."""
    taken: dict[str, Parameter] = {}
    for name, value in sent.items():
        if name in TRITON_PARAMETERS:
            continue
        kind = model.parameters.get(name)
        if kind is None:
            allowed = ", ".join(model.parameters) or "none"
            raise InvalidArgument(
                f"{model.name} takes no parameter {name!r}; its parameters: {allowed}", reason="UNKNOWN_PARAMETER"
            )
        choice = value.WhichOneof("parameter_choice")
        if choice is None or choice != kind:
            wanted = kind.removesuffix("_param")
            raise InvalidArgument(f"parameter {name!r} of {model.name} must be a {wanted}", reason="BAD_PARAMETER")
        taken[name] = getattr(value, choice)
    return taken


def _check_outputs(model: OipModel, request: oip.ModelInferRequest) -> None:
    names = {spec.name for spec in model.outputs}
    unknown = [output.name for output in request.outputs if output.name not in names]
    if unknown:
        raise InvalidArgument(
            f"{model.name} has no output {', '.join(map(repr, unknown))}; its outputs are "
            f"{', '.join(spec.name for spec in model.outputs)}",
            reason="UNKNOWN_OUTPUT",
        )
