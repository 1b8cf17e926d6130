"""aimass's own REST endpoints under /v1/aimass/ (text sentiment, entities, zero-shot and trained classifiers; image
classes, faces and text), called with httpx on a mesh started by `aimass up`, on real text and real photos."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import skimage.data as skimage_data

from aimass.local_mesh import LocalMesh
from aimass.store.blobs import BlobStore
from aimass.store.sql import SqlStore
from aimass.tenancy import keys
from aimass.training.artifact import TEXT_BACKBONE
from aimass.v1 import common_pb2, deployments_pb2, deployments_pb2_grpc
from tests.security import key_for, settings
from tests.test_deployments import LABELS, add_version, head
from tests.test_vision import Photo, astronaut, encode, rendered_text

ESPRESSO = 967  # ImageNet-1k class index


def coffee() -> Photo:
    """skimage's coffee cup (600 x 400), typed for modules that check untyped calls."""
    photo: Photo = skimage_data.coffee()  # type: ignore[no-untyped-call]
    return photo


@pytest.fixture(scope="module")
def http(front_door_mesh: LocalMesh) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=f"{front_door_mesh.rest_url}/aimass",
        headers={"authorization": f"Bearer {front_door_mesh.api_key}"},
        timeout=120,
    ) as client:
        yield client


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def test_sentiment_entities_and_zero_shot_classify(http: httpx.Client) -> None:
    sentiment = ok(http.post("/sentiment", json={"input": ["I love this, it is wonderful!", "This is awful."]}))
    assert sentiment["model"]["name"] == "vader"
    assert [r["label"] for r in sentiment["results"]] == ["positive", "negative"]
    assert sentiment["results"][0]["compound"] > 0.5 and sentiment["results"][1]["compound"] < -0.3

    text = "Angela Merkel visited Paris in March 2019."
    entities = ok(http.post("/entities", json={"input": text}))
    found = {(e["label"], text[e["start_char"] : e["end_char"]]) for e in entities["documents"][0]["entities"]}
    assert {("PERSON", "Angela Merkel"), ("GPE", "Paris"), ("DATE", "March 2019")} <= found, found

    classified = ok(
        http.post(
            "/classify",
            json={"input": "The striker scored twice in the final.", "labels": ["cooking", "football", "finance"]},
        )
    )
    scores = classified["results"][0]["scores"]
    assert scores[0]["label"] == "football" and sum(s["score"] for s in scores) == pytest.approx(1, abs=1e-4)
    missing = error(http.post("/classify", json={"labels": ["a", "b"]}), 400)
    assert missing["param"] == "input" and "'input' is required" in missing["message"]


def test_vision_classify_as_upload_and_as_base64(http: httpx.Client) -> None:
    jpeg = encode(coffee())
    uploaded = ok(
        http.post("/vision/classify", files={"image": ("coffee.jpg", jpeg, "image/jpeg")}, data={"top_k": "3"})
    )
    as_json = ok(http.post("/vision/classify", json={"images": [base64.b64encode(jpeg).decode()], "top_k": 3}))
    for reply in (uploaded, as_json):
        assert reply["model"]["name"] == "efficientnet-lite0"
        (result,) = reply["results"]
        assert len(result["labels"]) == 3 and result["labels"][0]["class_index"] == ESPRESSO
        assert (result["width"], result["height"]) == (600, 400)
    assert uploaded["results"] == as_json["results"]


def test_faces_and_text(http: httpx.Client) -> None:
    photo = encode(astronaut())
    faces = ok(http.post("/vision/faces", files={"image": ("astronaut.jpg", photo)}))
    (face,) = faces["results"][0]["faces"]
    assert face["score"] > 0.9 and {lm["name"] for lm in face["landmarks"]} >= {"left_eye", "right_eye", "nose"}
    box = face["box"]
    assert 150 < box["x"] + box["width"] / 2 < 300 and 50 < box["y"] + box["height"] / 2 < 200

    wanted = ["Hello aimass vision", "Invoice 2026 total 42"]
    data_url = "data:image/png;base64," + base64.b64encode(rendered_text(wanted)).decode()
    text = ok(http.post("/vision/ocr", json={"images": [data_url], "languages": ["en"]}))
    assert text["results"][0]["text"] == "\n".join(wanted)
    assert [line["text"] for line in text["results"][0]["lines"]] == wanted


def test_image_refusals(front_door_mesh: LocalMesh, http: httpx.Client) -> None:
    url = error(http.post("/vision/classify", json={"images": ["https://example.com/cat.jpg"]}), 400)
    assert "never fetches" in url["message"] and url["param"] == "images[0]"
    corrupt = error(http.post("/vision/classify", files={"image": ("x.jpg", b"\xff\xd8\xff not really a jpeg")}), 400)
    assert "image" in corrupt["message"]
    none = error(http.post("/vision/faces", data={"max_faces": "1"}, files={"other": ("a.txt", b"a")}), 400)
    assert none["param"] == "image"
    wrong = error(
        http.post("/vision/classify", json={"images": [base64.b64encode(b"x").decode()], "top_k": "many"}), 400
    )
    assert wrong["param"] == "top_k"
    bad_key = httpx.post(
        f"{front_door_mesh.rest_url}/aimass/vision/faces",
        files={"image": ("a.jpg", encode(astronaut()))},
        headers={"authorization": "Bearer not-a-key"},
        timeout=60,
    )
    assert error(bad_key, 401)["code"] == "invalid_api_key"


@pytest.fixture(scope="module")
def custom_model(front_door_mesh: LocalMesh) -> tuple[str, str]:
    """A tenant's trained text classifier (a head in the artifact format replicas load), deployed through the
    gateway as `aimass models deploy` does; returns (model name, the owner's key)."""
    artifact = head(TEXT_BACKBONE, 5)
    BlobStore(settings().blob_dir).put_bytes(artifact)
    store = SqlStore.open(settings().store_url)
    try:
        add_version(store, "rest-acme", "rest-router", seed=5, artifact=artifact)
    finally:
        store.close()
    owner = key_for("rest-acme", scopes=(keys.SCOPE_INFER, keys.SCOPE_MODELS_TRAIN))
    with front_door_mesh.channel(owner) as channel:
        deployed = deployments_pb2_grpc.DeploymentServiceStub(channel).DeployModel(
            deployments_pb2.DeployModelRequest(model=common_pb2.ModelRef(name="rest-router", version="1")), timeout=60
        )
    assert deployed.replicas_applied == 1
    return "rest-router", owner


def test_a_custom_classifier_by_name_is_its_owners_alone(
    front_door_mesh: LocalMesh, custom_model: tuple[str, str]
) -> None:
    name, owner = custom_model
    url = f"{front_door_mesh.rest_url}/aimass/classify"
    mine = ok(
        httpx.post(
            url,
            json={"model": name, "input": "my parcel never arrived"},
            headers={"authorization": f"Bearer {owner}"},
            timeout=60,
        )
    )
    assert (mine["model"]["name"], mine["model"]["version"]) == (name, "1")
    assert {s["label"] for s in mine["results"][0]["scores"]} == set(LABELS)

    other = key_for("rest-globex")
    theirs = httpx.post(
        url,
        json={"model": name, "input": "my parcel never arrived"},
        headers={"authorization": f"Bearer {other}"},
        timeout=60,
    )
    assert name in error(theirs, 404)["message"]
    nobody = httpx.post(
        url, json={"model": "no-such-model", "input": "x"}, headers={"authorization": f"Bearer {other}"}, timeout=60
    )
    error(nobody, 404)
