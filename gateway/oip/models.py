"""Which aimass models the Open Inference Protocol exposes, under which names, with which tensors.

The catalogue (ModelService.ListModels, as the caller sees it: the mesh's models and the caller's own) decides what
exists; this module only says how each tensor-shaped method looks as OIP tensors. Every model's inputs and outputs
below are exactly what ``gateway.oip.servicer`` takes and gives (ModelMetadata reports them; a test builds its
inputs from them). Dimensions that vary are -1.

=========================  ==============================  ===========================================================
OIP model                  inputs                          outputs
=========================  ==============================  ===========================================================
<embedder> (NlpService.    TEXT BYTES [-1] (UTF-8)         EMBEDDING FP32 [-1, dim] (dim from the model)
Embed)
<embedder>-zero-shot       TEXT BYTES [-1],                LABELS BYTES [-1, -1], SCORES FP32 [-1, -1]: per text, the
(NlpService.Classify)      CANDIDATE_LABELS BYTES [-1]     candidate labels best first and their scores
<sentiment model>          TEXT BYTES [-1]                 LABEL BYTES [-1], COMPOUND, POSITIVE, NEGATIVE, NEUTRAL FP32
(NlpService.Sentiment)                                     [-1]
<custom text classifier>   TEXT BYTES [-1]                 LABELS BYTES [-1, k], SCORES FP32 [-1, k] (k: its labels)
<image classifier>         IMAGE BYTES [-1] (encoded       LABELS BYTES [-1, -1], SCORES FP32 [-1, -1], CLASS_INDEX
(VisionService.Classify)   image files)                    INT32 [-1, -1]: per image, its top_k classes best first
<speech model>             AUDIO BYTES [-1] (audio files)  TEXT BYTES [-1], LANGUAGE BYTES [-1]
(SpeechService.Transcribe)
=========================  ==============================  ===========================================================

Request parameters: ``normalize`` (bool, embeddings), ``multi_label`` (bool) and ``hypothesis_template`` (string)
for zero-shot, ``top_k`` (int) for images, ``language`` (string) for speech. Triton's ``priority`` and ``timeout``
are accepted and left to the gateway (the call's deadline applies); any other parameter is refused.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from aimass.oip.v2 import grpc_predict_v2_pb2 as oip
from aimass.v1 import models_pb2

ZERO_SHOT_SUFFIX: Final = "-zero-shot"
# The platform ModelMetadata names (Triton's would be e.g. "onnxruntime_onnx"): the mesh serves them.
PLATFORM: Final = "aimass"
# Parameters tritonclient sets on its own (priority=, timeout=): accepted and not acted on.
TRITON_PARAMETERS: Final = frozenset({"priority", "timeout"})


class Kind(enum.Enum):
    EMBED = "aimass.v1.NlpService/Embed"
    ZERO_SHOT = "aimass.v1.NlpService/Classify"
    TEXT_CLASSIFIER = "aimass.v1.NlpService/Classify (custom)"
    SENTIMENT = "aimass.v1.NlpService/Sentiment"
    IMAGE_CLASSIFIER = "aimass.v1.VisionService/Classify"
    TRANSCRIBE = "aimass.v1.SpeechService/Transcribe"

    @property
    def method(self) -> str:
        """The aimass.v1 gRPC path a ModelInfer of this kind becomes."""
        return "/" + self.value.split(" ")[0]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> oip.ModelMetadataResponse.TensorMetadata:
        return oip.ModelMetadataResponse.TensorMetadata(name=self.name, datatype=self.datatype, shape=self.shape)


@dataclass(frozen=True, slots=True)
class OipModel:
    """One model as the protocol sees it: its name, the aimass model and method behind it, and its tensors."""

    name: str
    kind: Kind
    model: str  # the aimass model's name
    versions: tuple[str, ...]
    default_version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Parameter name → the InferParameter field it must be sent in.
    parameters: Mapping[str, str] = field(default_factory=dict)

    def input(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.inputs if spec.name == name), None)

    def metadata(self) -> oip.ModelMetadataResponse:
        return oip.ModelMetadataResponse(
            name=self.name,
            versions=self.versions,
            platform=PLATFORM,
            inputs=[spec.metadata() for spec in self.inputs],
            outputs=[spec.metadata() for spec in self.outputs],
        )


def _text(name: str = "TEXT") -> TensorSpec:
    return TensorSpec(name, "BYTES", (-1,))


def _model(info: models_pb2.ModelInfo, name: str, kind: Kind, **tensors: object) -> OipModel:
    versions = tuple(version.version for version in info.versions)
    return OipModel(
        name=name,
        kind=kind,
        model=info.name,
        versions=versions,
        default_version=info.default_version or (versions[-1] if versions else ""),
        **tensors,  # type: ignore[arg-type]
    )


def _custom_labels(info: models_pb2.ModelInfo) -> tuple[str, ...]:
    """A trained classifier's labels, from the version it serves by default (else its newest)."""
    versions = info.custom.versions
    serving = [v for v in versions if v.version == info.custom.deployment.default_version] or list(versions[-1:])
    return tuple(serving[0].labels) if serving else ()


def models_of(info: models_pb2.ModelInfo, embed_dimensions: Mapping[str, int]) -> list[OipModel]:
    """The OIP models one catalogue entry gives (none when it serves no tensor-shaped method).
    ``embed_dimensions``: an embedder's output width once known (-1 until then)."""
    found: list[OipModel] = []
    methods = set(info.methods)
    custom = info.HasField("custom")
    ranked = (TensorSpec("LABELS", "BYTES", (-1, -1)), TensorSpec("SCORES", "FP32", (-1, -1)))
    if Kind.EMBED.value in methods:
        dim = embed_dimensions.get(info.name, -1)
        found.append(
            _model(
                info,
                info.name,
                Kind.EMBED,
                inputs=(_text(),),
                outputs=(TensorSpec("EMBEDDING", "FP32", (-1, dim)),),
                parameters={"normalize": "bool_param"},
            )
        )
    if Kind.ZERO_SHOT.value in methods and custom:
        k = len(_custom_labels(info)) or -1
        found.append(
            _model(
                info,
                info.name,
                Kind.TEXT_CLASSIFIER,
                inputs=(_text(),),
                outputs=(TensorSpec("LABELS", "BYTES", (-1, k)), TensorSpec("SCORES", "FP32", (-1, k))),
            )
        )
    elif Kind.ZERO_SHOT.value in methods:
        found.append(
            _model(
                info,
                info.name + ZERO_SHOT_SUFFIX,
                Kind.ZERO_SHOT,
                inputs=(_text(), _text("CANDIDATE_LABELS")),
                outputs=ranked,
                parameters={"multi_label": "bool_param", "hypothesis_template": "string_param"},
            )
        )
    if Kind.SENTIMENT.value in methods:
        scores = tuple(TensorSpec(name, "FP32", (-1,)) for name in ("COMPOUND", "POSITIVE", "NEGATIVE", "NEUTRAL"))
        found.append(
            _model(
                info,
                info.name,
                Kind.SENTIMENT,
                inputs=(_text(),),
                outputs=(TensorSpec("LABEL", "BYTES", (-1,)), *scores),
            )
        )
    if Kind.IMAGE_CLASSIFIER.value in methods:
        found.append(
            _model(
                info,
                info.name,
                Kind.IMAGE_CLASSIFIER,
                inputs=(TensorSpec("IMAGE", "BYTES", (-1,)),),
                outputs=(*ranked, TensorSpec("CLASS_INDEX", "INT32", (-1, -1))),
                parameters={"top_k": "int64_param"},
            )
        )
    if Kind.TRANSCRIBE.value in methods:
        found.append(
            _model(
                info,
                info.name,
                Kind.TRANSCRIBE,
                inputs=(TensorSpec("AUDIO", "BYTES", (-1,)),),
                outputs=(TensorSpec("TEXT", "BYTES", (-1,)), TensorSpec("LANGUAGE", "BYTES", (-1,))),
                parameters={"language": "string_param"},
            )
        )
    return found


def exposed(infos: Iterable[models_pb2.ModelInfo], embed_dimensions: Mapping[str, int]) -> dict[str, OipModel]:
    """OIP name → model, for every tensor-shaped model of a catalogue (ListModels gives a name to one model only;
    should a tenant's own model be called like a zero-shot name, the first listed keeps it)."""
    found: dict[str, OipModel] = {}
    for info in infos:
        for model in models_of(info, embed_dimensions):
            found.setdefault(model.name, model)
    return found


def some_names(models: Sequence[str] | Iterable[str], most: int = 8) -> str:
    """A few model names for a NOT_FOUND message."""
    names = sorted(models)
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "") if names else "none"
