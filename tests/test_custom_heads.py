"""Replicas serving tenants' own models: a real NLP replica on loopback is told by ModelHostService (called over mesh
mTLS as the scheduler calls it) which trained heads to host, fetches them from a real BlobService (the control
plane's blob store), and answers NlpService.Classify by the model's name with the head's own labels, as a gateway
calls it (mesh mTLS, the tenant and request id in the gateway's metadata). The heads are trained here, with
scikit-learn, on the real all-MiniLM-L6-v2 embeddings of a few labelled sentences."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import io
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits  # type: ignore[import-untyped]
from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]

from aimass.client import error_info
from aimass.runtime.config import NlpConfig, SchedulerConfig, ServerConfig, Settings, VisionConfig
from aimass.runtime.custom_heads import canary_bucket
from aimass.runtime.identity import ANY_REPLICA, MeshPolicy, MeshPolicyInterceptor, mesh_channel
from aimass.runtime.interceptors import ErrorMappingInterceptor
from aimass.runtime.metadata import REQUEST_ID_KEY, TENANT_KEY
from aimass.runtime.server import ServerRunner
from aimass.store.blobs import BlobStore
from aimass.training.artifact import IMAGE_BACKBONE, IMAGE_TASK, TEXT_BACKBONE, TEXT_TASK, HeadArtifact
from aimass.training.backbones import ImageBackbone
from aimass.v1 import common_pb2, lifecycle_pb2, lifecycle_pb2_grpc, nlp_pb2, nlp_pb2_grpc, vision_pb2, vision_pb2_grpc
from scheduler.lifecycle.blobs import BlobServicer
from services.nlp.app import NlpApp, build_runner
from services.nlp.engine import NlpEngine
from services.vision import app as vision_app
from tests.security import as_gateway, credentials, settings

OWNER = "acme"
OTHER = "globex"
MODEL = "ticket-router"
CALL_TIMEOUT_S = 30.0
# Three kinds of support ticket, a dozen and more each.
TICKETS: dict[str, list[str]] = {
    "billing": [
        "I was charged twice for my subscription",
        "Please refund the extra payment on my card",
        "My invoice shows the wrong amount",
        "Why did my monthly bill go up?",
        "The credit card payment failed but money was taken",
        "I need a copy of last month's invoice",
        "Cancel my plan and refund the remaining balance",
        "There is an unknown charge on my bank statement",
        "How do I update my billing address for invoices?",
        "You billed me after I cancelled",
        "The discount code was not applied to my payment",
        "I want to pay by bank transfer instead of card",
        "My receipt has the wrong VAT number",
        "Double payment taken for one order",
    ],
    "shipping": [
        "My parcel has not arrived yet",
        "The package was delivered to the wrong address",
        "Where is my order? Tracking shows nothing",
        "The courier left the box damaged at my door",
        "How long does delivery to Canada take?",
        "Can I change the delivery address for my order?",
        "The tracking number does not work",
        "My shipment is stuck in customs",
        "Only half of my items arrived in the parcel",
        "The delivery driver never came",
        "Do you ship to Norway?",
        "Package marked delivered but nothing here",
        "Express shipping took two weeks",
        "I need to return the item, where do I send it?",
    ],
    "login": [
        "I forgot my password and cannot sign in",
        "The password reset email never arrives",
        "My account is locked after too many attempts",
        "Two-factor authentication code is rejected",
        "I cannot log in with my Google account",
        "The login page keeps saying invalid credentials",
        "How do I change my username?",
        "I lost my phone with the authenticator app",
        "Session expires every few minutes and logs me out",
        "Someone else may have accessed my account",
        "The sign-in button does nothing",
        "I never received the verification code by SMS",
        "My new password is not accepted",
        "Cannot access my profile after the update",
    ],
}
CLEAR = {
    "I was charged twice this month, please refund me": "billing",
    "My parcel is lost, the tracking has not moved for a week": "shipping",
    "I cannot sign in, the password reset link does not work": "login",
}


class ControlPlane:
    """The scheduler's BlobService over a real blob store (mesh mTLS; any replica may fetch), counting fetches."""

    def __init__(self, root: Path) -> None:
        self.store = BlobStore(root / "blobs")
        self.fetches: collections.Counter[str] = collections.Counter()
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self) -> None:
        fetches = self.fetches

        class CountingBlobServicer(BlobServicer):
            async def FetchBlob(
                self, request: lifecycle_pb2.FetchBlobRequest, context: Any
            ) -> AsyncIterator[lifecycle_pb2.FetchBlobResponse]:
                fetches[request.sha256] += 1
                async for chunk in super().FetchBlob(request, context):
                    yield chunk

        self.server = grpc.aio.server(
            interceptors=[
                MeshPolicyInterceptor(MeshPolicy({"/aimass.v1.BlobService/FetchBlob": (ANY_REPLICA,)})),
                ErrorMappingInterceptor(),
            ]
        )
        lifecycle_pb2_grpc.add_BlobServiceServicer_to_server(CountingBlobServicer(self.store, 1 << 20), self.server)
        port = self.server.add_secure_port("127.0.0.1:0", credentials("scheduler").server_credentials())
        self.address = f"127.0.0.1:{port}"
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)


def train_head(engine: NlpEngine, *, seed: int, labels: Sequence[str] = tuple(TICKETS)) -> HeadArtifact:
    """A head trained as the trainer trains one: a linear layer over normalised MiniLM embeddings."""
    texts = [text for label in labels for text in TICKETS[label]]
    targets = [label for label in labels for _ in TICKETS[label]]
    features = engine.encode(texts, normalize=True)
    classifier = LogisticRegression(C=10.0, max_iter=2000, random_state=seed).fit(features, targets)
    weight, bias = classifier.coef_, classifier.intercept_
    if len(classifier.classes_) == 2:  # one logit for the second class: as two, softmax is the same sigmoid
        weight, bias = np.concatenate([-weight / 2, weight / 2]), np.concatenate([-bias / 2, bias / 2])
    return HeadArtifact(
        labels=tuple(str(label) for label in classifier.classes_),
        weight=weight.astype(np.float32),
        bias=bias.astype(np.float32),
        base_model=TEXT_BACKBONE,
        task=TEXT_TASK,
        info={"seed": seed},
    )


@pytest.fixture(scope="module")
async def plane(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ControlPlane]:
    control = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    await control.start()
    yield control
    await control.stop()


@pytest.fixture(scope="module")
def artifacts(nlp_engine: NlpEngine, plane: ControlPlane) -> dict[str, str]:
    """Version -> the SHA-256 of its head in the blob store: "1" and "2" (other seeds, the same tickets), "3" (two
    labels only), "image" (a head on the image backbone) and "junk" (bytes that are no head)."""
    image_head = HeadArtifact(
        labels=("cat", "dog"),
        weight=np.zeros((2, 1280), np.float32),
        bias=np.zeros(2, np.float32),
        base_model=IMAGE_BACKBONE,
        task=IMAGE_TASK,
    )
    return {
        "1": plane.store.put_bytes(train_head(nlp_engine, seed=1).to_bytes()),
        "2": plane.store.put_bytes(train_head(nlp_engine, seed=2).to_bytes()),
        "3": plane.store.put_bytes(train_head(nlp_engine, seed=3, labels=("billing", "shipping")).to_bytes()),
        "image": plane.store.put_bytes(image_head.to_bytes()),
        "junk": plane.store.put_bytes(b"not a head at all"),
    }


@pytest.fixture(scope="module")
async def replica(
    nlp_engine: NlpEngine, plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServerRunner]:
    """An NLP replica built as `python -m services.nlp` builds it, its scheduler being the control plane above."""
    replica_settings = Settings(
        state_dir=tmp_path_factory.mktemp("replica-state"),
        mesh=settings().mesh.model_copy(update={"pki_dir": settings().pki_dir}),
        nlp=NlpConfig(server=ServerConfig(port=0, drain_delay_s=0.05, access_log=False), device="cpu"),
        scheduler=SchedulerConfig(address=plane.address, report_interval_s=3600),
    )
    runner = build_runner(replica_settings, register=False, engine=nlp_engine)
    await runner.start()
    yield runner
    await runner.drain()


@pytest.fixture(scope="module")
async def nlp(replica: ServerRunner) -> AsyncIterator[nlp_pb2_grpc.NlpServiceAsyncStub]:
    channel = as_gateway(replica.address, "nlp")
    yield nlp_pb2_grpc.NlpServiceStub(channel)
    await channel.close()


@pytest.fixture(scope="module")
async def host(replica: ServerRunner) -> AsyncIterator[lifecycle_pb2_grpc.ModelHostServiceAsyncStub]:
    """ModelHostService as the scheduler calls it (its mesh certificate)."""
    channel = mesh_channel(replica.address, credentials("scheduler"), server_role="nlp")
    yield lifecycle_pb2_grpc.ModelHostServiceStub(channel)
    await channel.close()


class Generations:
    """Sync requests with ever higher generations (the store's counter)."""

    def __init__(self) -> None:
        self.last = 100

    def next(self) -> int:
        self.last += 1
        return self.last


GENERATIONS = Generations()


def sync_request(
    artifacts: dict[str, str],
    versions: Sequence[str],
    *,
    default: str = "1",
    canary: str = "",
    percent: int = 0,
    generation: int | None = None,
    owner: str = OWNER,
    name: str = MODEL,
) -> lifecycle_pb2.SyncCustomModelsRequest:
    return lifecycle_pb2.SyncCustomModelsRequest(
        generation=GENERATIONS.next() if generation is None else generation,
        versions=[
            lifecycle_pb2.HostedVersion(owner=owner, name=name, version=v, artifact_sha256=artifacts[v])
            for v in versions
        ],
        routes=[
            lifecycle_pb2.HostedRoute(
                owner=owner, name=name, default_version=default, canary_version=canary, canary_percent=percent
            )
        ],
    )


def scope(tenant: str = OWNER, request_id: str = "") -> tuple[tuple[str, str], ...]:
    """The metadata a gateway sends with a call of ``tenant`` (request id: the gateway always sets one)."""
    entries = [(TENANT_KEY, tenant)]
    if request_id:
        entries.append((REQUEST_ID_KEY, request_id))
    return tuple(entries)


async def classify(
    nlp: nlp_pb2_grpc.NlpServiceAsyncStub,
    texts: Sequence[str],
    *,
    version: str = "",
    tenant: str = OWNER,
    request_id: str = "",
    name: str = MODEL,
    labels: Sequence[str] = (),
) -> nlp_pb2.ClassifyResponse:
    request = nlp_pb2.ClassifyRequest(
        model=common_pb2.ModelRef(name=name, version=version), texts=list(texts), labels=list(labels)
    )
    response: nlp_pb2.ClassifyResponse = await nlp.Classify(
        request, metadata=scope(tenant, request_id), timeout=CALL_TIMEOUT_S
    )
    return response


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def said(err: grpc.aio.AioRpcError) -> str:
    return err.details() or ""


async def test_classify_by_name_answers_with_the_heads_own_labels(
    nlp: nlp_pb2_grpc.NlpServiceAsyncStub,
    host: lifecycle_pb2_grpc.ModelHostServiceAsyncStub,
    artifacts: dict[str, str],
    plane: ControlPlane,
    nlp_engine: NlpEngine,
) -> None:
    synced = await host.SyncCustomModels(sync_request(artifacts, ["1"]), timeout=CALL_TIMEOUT_S)
    assert list(synced.serving) == [f"{OWNER}/{MODEL}@1"] and not synced.failed

    reply = await classify(nlp, list(CLEAR))
    assert reply.model == common_pb2.ModelRef(name=MODEL, version="1")
    assert [result.scores[0].label for result in reply.results] == list(CLEAR.values())
    # The scores are the trained head's over the texts' normalised embeddings, as the trainer computes them.
    head = HeadArtifact.from_bytes(plane.store.path_for(artifacts["1"]).read_bytes())
    expected = head.probabilities(nlp_engine.encode(list(CLEAR), normalize=True))
    for result, row in zip(reply.results, expected, strict=True):
        assert {s.label: s.score for s in result.scores} == pytest.approx(
            dict(zip(head.labels, row.tolist(), strict=True)), abs=1e-4
        )
    for result in reply.results:
        assert sorted(score.label for score in result.scores) == sorted(TICKETS)
        scores = [score.score for score in result.scores]
        assert scores == sorted(scores, reverse=True)
        assert sum(scores) == pytest.approx(1.0, abs=1e-5)
        assert scores[0] > 0.6

    # Zero-shot Classify on the same replica is as before.
    zero_shot = await nlp.Classify(
        nlp_pb2.ClassifyRequest(texts=["The striker scored twice"], labels=["sports", "cooking"]),
        metadata=scope(),
        timeout=CALL_TIMEOUT_S,
    )
    assert zero_shot.model.name == "all-MiniLM-L6-v2" and zero_shot.results[0].scores[0].label == "sports"


async def test_a_version_can_be_named_and_an_undeployed_one_is_not_found(
    nlp: nlp_pb2_grpc.NlpServiceAsyncStub,
    host: lifecycle_pb2_grpc.ModelHostServiceAsyncStub,
    artifacts: dict[str, str],
) -> None:
    await host.SyncCustomModels(sync_request(artifacts, ["1", "3"], default="1"), timeout=CALL_TIMEOUT_S)
    pinned = await classify(nlp, list(CLEAR), version="3")
    assert pinned.model == common_pb2.ModelRef(name=MODEL, version="3")
    # Version 3 knows two labels only; the default (1) knows three.
    assert all(sorted(s.label for s in r.scores) == ["billing", "shipping"] for r in pinned.results)
    unnamed = await classify(nlp, list(CLEAR))
    assert unnamed.model.version == "1" and len(unnamed.results[0].scores) == 3

    err = await refused(classify(nlp, ["hello"], version="7"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert said(err) == f"version '7' of model '{MODEL}' is not deployed; deployed: 1, 3"


async def test_canary_takes_its_share_of_requests_chosen_by_request_id(
    nlp: nlp_pb2_grpc.NlpServiceAsyncStub,
    host: lifecycle_pb2_grpc.ModelHostServiceAsyncStub,
    artifacts: dict[str, str],
) -> None:
    await host.SyncCustomModels(
        sync_request(artifacts, ["1", "2"], default="1", canary="2", percent=10), timeout=CALL_TIMEOUT_S
    )
    request_ids = [f"req-{i:05d}" for i in range(1000)]
    semaphore = asyncio.Semaphore(64)

    async def version_for(request_id: str) -> str:
        async with semaphore:
            reply = await classify(nlp, ["where is my parcel"], request_id=request_id)
            return reply.model.version

    versions = await asyncio.gather(*(version_for(request_id) for request_id in request_ids))
    counts = collections.Counter(versions)
    assert set(counts) == {"1", "2"}
    assert 50 <= counts["2"] <= 150, counts
    # The split is a function of the request id: a retried request keeps its version.
    assert versions == ["2" if canary_bucket(request_id) < 10 else "1" for request_id in request_ids]
    again = [await version_for(request_id) for request_id in request_ids[:40] for _ in range(3)]
    assert again == [version for version in versions[:40] for _ in range(3)]


async def test_another_tenants_model_is_not_found_like_one_that_does_not_exist(
    nlp: nlp_pb2_grpc.NlpServiceAsyncStub,
    host: lifecycle_pb2_grpc.ModelHostServiceAsyncStub,
    artifacts: dict[str, str],
) -> None:
    await host.SyncCustomModels(sync_request(artifacts, ["1"]), timeout=CALL_TIMEOUT_S)
    theirs = await refused(classify(nlp, ["hello"], tenant=OTHER))
    nothing = await refused(classify(nlp, ["hello"], tenant=OTHER, name="no-such-model"))
    anonymous = await refused(classify(nlp, ["hello"], tenant=""))
    for err in (theirs, nothing, anonymous):
        assert err.code() == grpc.StatusCode.NOT_FOUND
    assert said(theirs) == f"model '{MODEL}' is not served by NlpService.Classify; available: all-MiniLM-L6-v2"
    assert said(nothing) == said(theirs).replace(MODEL, "no-such-model")
    assert said(anonymous) == said(theirs)
    info = error_info(theirs)
    assert info is not None and MODEL not in info.metadata["available"]
    # Naming a version changes nothing.
    pinned = await refused(classify(nlp, ["hello"], tenant=OTHER, version="1"))
    assert pinned.code() == grpc.StatusCode.NOT_FOUND and said(pinned) == said(theirs)

    # Its owner, asking for a name it does not have, is told which of its own models exist.
    own = await refused(classify(nlp, ["hello"], name="no-such-model"))
    assert said(own).endswith(f"available: all-MiniLM-L6-v2; your models: {MODEL}")


async def test_sending_labels_or_zero_shot_options_is_invalid_argument(
    nlp: nlp_pb2_grpc.NlpServiceAsyncStub,
    host: lifecycle_pb2_grpc.ModelHostServiceAsyncStub,
    artifacts: dict[str, str],
) -> None:
    await host.SyncCustomModels(sync_request(artifacts, ["1"]), timeout=CALL_TIMEOUT_S)
    err = await refused(classify(nlp, ["hello"], labels=["billing", "other"]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        said(err) == f"{MODEL} is a trained classifier with its own labels (billing, login, shipping); send no labels"
    )
    multi = await refused(
        nlp.Classify(
            nlp_pb2.ClassifyRequest(model=common_pb2.ModelRef(name=MODEL), texts=["hi"], multi_label=True),
            metadata=scope(),
            timeout=CALL_TIMEOUT_S,
        )
    )
    assert multi.code() == grpc.StatusCode.INVALID_ARGUMENT and "multi_label" in said(multi)
    empty = await refused(classify(nlp, ["  "]))
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT and said(empty).startswith("texts[0] is empty")


async def test_sync_is_idempotent_and_a_dropped_version_is_not_found(
    nlp: nlp_pb2_grpc.NlpServiceAsyncStub,
    host: lifecycle_pb2_grpc.ModelHostServiceAsyncStub,
    artifacts: dict[str, str],
    plane: ControlPlane,
    replica: ServerRunner,
) -> None:
    both = sync_request(artifacts, ["1", "2"], default="2")
    first = await host.SyncCustomModels(both, timeout=CALL_TIMEOUT_S)
    fetched = dict(plane.fetches)
    again = await host.SyncCustomModels(both, timeout=CALL_TIMEOUT_S)
    assert again == first and first.generation == both.generation
    assert sorted(first.serving) == [f"{OWNER}/{MODEL}@1", f"{OWNER}/{MODEL}@2"]
    # Held heads are neither fetched nor parsed again; each artifact crossed the network once in the whole module.
    assert dict(plane.fetches) == fetched and all(count == 1 for count in fetched.values())
    assert (await classify(nlp, ["hi"], version="1")).model.version == "1"

    dropped = await host.SyncCustomModels(sync_request(artifacts, ["2"], default="2"), timeout=CALL_TIMEOUT_S)
    assert list(dropped.serving) == [f"{OWNER}/{MODEL}@2"]
    err = await refused(classify(nlp, ["hi"], version="1"))
    assert err.code() == grpc.StatusCode.NOT_FOUND and said(err).endswith("deployed: 2")
    assert (await classify(nlp, ["hi"])).model.version == "2"

    # A late push of an older generation changes nothing.
    stale = await host.SyncCustomModels(both.__class__(generation=both.generation), timeout=CALL_TIMEOUT_S)
    assert stale.generation == dropped.generation and list(stale.serving) == [f"{OWNER}/{MODEL}@2"]
    assert isinstance(replica.app, NlpApp) and replica.app.heads.generation == dropped.generation

    # Nothing hosted: the name is unknown again.
    await host.SyncCustomModels(lifecycle_pb2.SyncCustomModelsRequest(generation=GENERATIONS.next()))
    err = await refused(classify(nlp, ["hi"]))
    assert err.code() == grpc.StatusCode.NOT_FOUND and said(err).endswith("available: all-MiniLM-L6-v2")


async def test_versions_that_cannot_load_are_reported_and_the_others_serve(
    nlp: nlp_pb2_grpc.NlpServiceAsyncStub,
    host: lifecycle_pb2_grpc.ModelHostServiceAsyncStub,
    artifacts: dict[str, str],
) -> None:
    missing = hashlib.sha256(b"never stored").hexdigest()
    request = sync_request({**artifacts, "4": missing}, ["1", "image", "junk", "4"], default="1")
    response = await host.SyncCustomModels(request, timeout=CALL_TIMEOUT_S)
    assert list(response.serving) == [f"{OWNER}/{MODEL}@1"]
    failed = {entry.split(":", 1)[0]: entry for entry in response.failed}
    assert sorted(failed) == [f"{OWNER}/{MODEL}@{v}" for v in ("4", "image", "junk")]
    assert "this NlpService replica serves heads on all-MiniLM-L6-v2" in failed[f"{OWNER}/{MODEL}@image"]
    assert "not a head artifact" in failed[f"{OWNER}/{MODEL}@junk"]
    assert "is not in the blob store" in failed[f"{OWNER}/{MODEL}@4"]
    assert (await classify(nlp, list(CLEAR))).model.version == "1"
    err = await refused(classify(nlp, ["hi"], version="junk"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "could not be loaded on this NlpService replica" in said(err)


async def test_switching_the_default_under_load_loses_no_call(
    nlp: nlp_pb2_grpc.NlpServiceAsyncStub,
    host: lifecycle_pb2_grpc.ModelHostServiceAsyncStub,
    artifacts: dict[str, str],
) -> None:
    await host.SyncCustomModels(sync_request(artifacts, ["1", "2"], default="1"), timeout=CALL_TIMEOUT_S)
    stop = asyncio.Event()
    answered: list[str] = []

    async def caller(index: int) -> None:
        count = 0
        while not stop.is_set():
            reply = await classify(nlp, list(CLEAR), request_id=f"caller-{index}-{count}")
            assert [r.scores[0].label for r in reply.results] == list(CLEAR.values())
            answered.append(reply.model.version)
            count += 1

    callers = [asyncio.create_task(caller(index)) for index in range(8)]
    for default in ("2", "1", "2", "1", "2"):
        await asyncio.sleep(0.15)
        response = await host.SyncCustomModels(
            sync_request(artifacts, ["1", "2"], default=default), timeout=CALL_TIMEOUT_S
        )
        assert not response.failed
    await asyncio.sleep(0.15)
    stop.set()
    await asyncio.gather(*callers)  # any failed call fails the test here
    assert collections.Counter(answered).keys() == {"1", "2"} and len(answered) > 40
    assert (await classify(nlp, ["hi"])).model.version == "2"


async def test_only_the_scheduler_may_sync_and_only_gateways_may_classify(
    replica: ServerRunner, artifacts: dict[str, str]
) -> None:
    gateway = as_gateway(replica.address, "nlp")
    scheduler = mesh_channel(replica.address, credentials("scheduler"), server_role="nlp")
    try:
        denied = await refused(
            lifecycle_pb2_grpc.ModelHostServiceStub(gateway).SyncCustomModels(
                sync_request(artifacts, ["1"]), timeout=CALL_TIMEOUT_S
            )
        )
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "it is for scheduler" in said(denied)
        denied = await refused(
            nlp_pb2_grpc.NlpServiceStub(scheduler).Classify(
                nlp_pb2.ClassifyRequest(model=common_pb2.ModelRef(name=MODEL), texts=["hi"]), timeout=CALL_TIMEOUT_S
            )
        )
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await gateway.close()
        await scheduler.close()


# -- an image model on a vision replica ---------------------------------------------------------------------------

DIGITS = ("0", "1", "7")
TRAIN_PER_DIGIT = 20


def digit_images() -> tuple[list[Image.Image], list[str], list[Image.Image], list[str]]:
    """scikit-learn's 8x8 digits 0, 1 and 7 as 32x32 RGB images: 20 of each to train on, the next 5 of each held
    out."""
    digits = load_digits()
    train: list[tuple[Image.Image, str]] = []
    held_out: list[tuple[Image.Image, str]] = []
    for pixels, target in zip(digits.images, digits.target, strict=True):
        label = str(target)
        if label not in DIGITS:
            continue
        image = Image.fromarray((pixels * (255 / 16)).astype(np.uint8)).resize((32, 32), Image.Resampling.BICUBIC)
        seen = sum(1 for _, known in train + held_out if known == label)
        if seen < TRAIN_PER_DIGIT:
            train.append((image.convert("RGB"), label))
        elif seen < TRAIN_PER_DIGIT + 5:
            held_out.append((image.convert("RGB"), label))
    return [i for i, _ in train], [t for _, t in train], [i for i, _ in held_out], [t for _, t in held_out]


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


async def test_a_vision_replica_classifies_images_with_a_tenants_digit_model(
    plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> None:
    train_images, train_labels, test_images, test_labels = digit_images()
    backbone = ImageBackbone("cpu")
    classifier = LogisticRegression(C=1.0, max_iter=3000, random_state=0).fit(
        backbone.features(train_images), train_labels
    )
    head = HeadArtifact(
        labels=tuple(str(label) for label in classifier.classes_),
        weight=classifier.coef_.astype(np.float32),
        bias=classifier.intercept_.astype(np.float32),
        base_model=IMAGE_BACKBONE,
        task=IMAGE_TASK,
    )
    text_head = plane.store.put_bytes(
        HeadArtifact(
            labels=("a", "b"),
            weight=np.zeros((2, 384), np.float32),
            bias=np.zeros(2, np.float32),
            base_model=TEXT_BACKBONE,
            task=TEXT_TASK,
        ).to_bytes()
    )
    artifacts = {"1": plane.store.put_bytes(head.to_bytes()), "text": text_head}

    config = VisionConfig(
        server=ServerConfig(port=0, drain_delay_s=0.05, access_log=False),
        device="cpu",
        backend="onnx",
        cache_dir=tmp_path_factory.mktemp("vision-cache"),
    )
    replica_settings = Settings(
        state_dir=tmp_path_factory.mktemp("vision-replica-state"),
        mesh=settings().mesh.model_copy(update={"pki_dir": settings().pki_dir}),
        scheduler=SchedulerConfig(address=plane.address, report_interval_s=3600),
    )
    runner = vision_app.build_runner(replica_settings, config, register=False)
    await runner.start()
    gateway = as_gateway(runner.address, "vision")
    scheduler = mesh_channel(runner.address, credentials("scheduler"), server_role="vision")
    try:
        synced = await lifecycle_pb2_grpc.ModelHostServiceStub(scheduler).SyncCustomModels(
            sync_request(artifacts, ["1", "text"], name="digits"), timeout=120
        )
        assert list(synced.serving) == [f"{OWNER}/digits@1"]
        assert (
            len(synced.failed) == 1
            and "this VisionService replica serves heads on efficientnet-lite0" in (synced.failed[0])
        )
        stub = vision_pb2_grpc.VisionServiceStub(gateway)
        request = vision_pb2.VisionServiceClassifyRequest(
            model=common_pb2.ModelRef(name="digits"), images=[vision_pb2.Image(data=png(i)) for i in test_images[:4]]
        )
        reply = await stub.Classify(request, metadata=scope(), timeout=CALL_TIMEOUT_S)
        assert reply.model == common_pb2.ModelRef(name="digits", version="1")
        expected = head.probabilities(backbone.features(test_images[:4]))
        for result, row in zip(reply.results, expected, strict=True):
            assert (result.width, result.height) == (32, 32)
            assert len(result.labels) == 3  # top_k 0: 5, or every label of a smaller model
            assert result.labels[0].label == head.labels[int(np.argmax(row))]
            for label in result.labels:
                assert label.label == head.labels[label.class_index]
                assert label.score == pytest.approx(float(row[label.class_index]), abs=1e-3)

        right = 0
        for start in range(0, len(test_images), 4):
            batch = test_images[start : start + 4]
            answer = await stub.Classify(
                vision_pb2.VisionServiceClassifyRequest(
                    model=common_pb2.ModelRef(name="digits"),
                    images=[vision_pb2.Image(data=png(i)) for i in batch],
                    top_k=1,
                ),
                metadata=scope(),
                timeout=CALL_TIMEOUT_S,
            )
            assert all(len(result.labels) == 1 for result in answer.results)
            right += sum(
                result.labels[0].label == label
                for result, label in zip(answer.results, test_labels[start : start + 4], strict=True)
            )
        assert right >= 13, f"{right} of {len(test_images)} held-out digits right"

        too_many = await refused(
            stub.Classify(
                vision_pb2.VisionServiceClassifyRequest(
                    model=common_pb2.ModelRef(name="digits"), images=request.images[:1], top_k=4
                ),
                metadata=scope(),
                timeout=CALL_TIMEOUT_S,
            )
        )
        assert (
            too_many.code() == grpc.StatusCode.INVALID_ARGUMENT
            and said(too_many) == "top_k is 4; send 1..3 (0 means 3)"
        )
        theirs = await refused(stub.Classify(request, metadata=scope(OTHER), timeout=CALL_TIMEOUT_S))
        assert theirs.code() == grpc.StatusCode.NOT_FOUND
        assert said(theirs) == "model 'digits' is not served by VisionService.Classify; available: efficientnet-lite0"
        # ImageNet classification on the same replica is as before.
        imagenet = await stub.Classify(
            vision_pb2.VisionServiceClassifyRequest(images=request.images[:1]), metadata=scope(), timeout=CALL_TIMEOUT_S
        )
        assert imagenet.model.name == "efficientnet-lite0" and len(imagenet.results[0].labels) == 5
    finally:
        await gateway.close()
        await scheduler.close()
        await runner.drain()
