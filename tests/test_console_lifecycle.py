"""The web console's lifecycle sections in a real browser against a real mesh (front_door_mesh: nlp, vision, speech,
llm, a trainer, the console): a dataset uploaded and validated on Data, a model trained, watched and evaluated on
Train, deployed as default then canary, called, promoted, rolled back and exported; the catalogue and where models
are loaded on Models; the live Cluster; keys made, shown once and revoked on Keys; and what a viewer key may not do
or see. Every page must stay on 127.0.0.1 and log no error (the ``watched`` fixture)."""

from __future__ import annotations

import contextlib
import csv
import io
import re
import time
import zipfile
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from playwright.sync_api import Dialog, Page, expect

from aimass.local_mesh import LocalMesh
from aimass.tenancy import keys
from aimass.v1 import datasets_pb2, datasets_pb2_grpc
from tests.console_browser import Watched, sign_in
from tests.security import key_for

DATASET = "console-tickets"
MODEL = "console-router"
# The lifecycle runs as a tenant of its own: the session's store is shared by every mesh of the suite, and a model
# trained as the admin tenant would show in other tests' model catalogues.
LAB = "console-lab"
PRIVATE_DATASET = "console-private"
TRAINING_TIMEOUT_MS = 300_000
DEPLOY_TIMEOUT_MS = 60_000

# Three classes of short, distinct support tickets: enough to train and evaluate in seconds on a CPU.
TICKETS: dict[str, list[str]] = {
    "billing": [
        "I was charged twice for my subscription this month",
        "my invoice shows the wrong amount",
        "please refund the duplicate payment on my card",
        "why did my bill go up without notice",
        "the receipt for my last order is missing the tax",
        "cancel the automatic renewal charge",
        "I need a copy of my billing statement",
        "my credit card was declined but money was taken",
        "update the payment method on my account",
        "there is an unknown fee on my invoice",
        "you billed me after I cancelled",
        "how do I get a refund for the annual plan",
    ],
    "login": [
        "I cannot log in to my account",
        "the password reset email never arrives",
        "my account is locked after too many attempts",
        "two factor code is not accepted",
        "I forgot my username and cannot sign in",
        "the login page keeps saying invalid credentials",
        "how do I change my password",
        "sign in with google fails with an error",
        "my session expires every few minutes",
        "I get logged out as soon as I sign in",
        "the authenticator app lost my codes",
        "reset link says it has expired",
    ],
    "shipping": [
        "my package has not arrived yet",
        "the tracking number does not work",
        "the parcel was delivered to the wrong address",
        "when will my order be shipped",
        "the courier left my box in the rain",
        "can I change the delivery address of my order",
        "my shipment is stuck in customs",
        "the delivery is two weeks late",
        "part of my order is missing from the box",
        "the item arrived damaged in transit",
        "do you ship to canada",
        "I want express delivery for my order",
    ],
}
LABELS = set(TICKETS)


def tickets_csv() -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["text", "label"])
    rows = [(text, label) for label, texts in TICKETS.items() for text in texts]
    # Interleaved, so every class is spread over the file.
    rows.sort(key=lambda row: TICKETS[row[1]].index(row[0]))
    writer.writerows(rows)
    return out.getvalue().encode()


def accept_dialogs(page: Page) -> None:
    """Confirms every window.confirm the pages ask (delete, revoke, roll back)."""

    def accept(dialog: Dialog) -> None:
        dialog.accept()

    page.on("dialog", accept)


def open_section(page: Page, section: str, heading: str) -> None:
    page.evaluate("(hash) => { location.hash = hash; }", f"#/{section}")
    expect(page.locator("#page h1").first).to_have_text(heading)


def signed_in(page: Page, mesh: LocalMesh, key: str | None = None) -> None:
    sign_in(page, mesh, key)
    # The landing page first, so the next navigation does not race its loading.
    expect(page.locator("#page h1").first).to_be_visible()


def api(page: Page, path: str, body: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    """A call to the console's JSON API from the page, with ``key`` or the signed-in key: {status, body}."""
    answer: dict[str, Any] = page.evaluate(
        """async ([path, body, key]) => {
            const response = await fetch(path, {
                method: "POST",
                headers: {
                    "content-type": "application/json",
                    authorization: `Bearer ${key || sessionStorage.getItem("aimass.key")}`,
                },
                body: JSON.stringify(body),
            });
            let json = null;
            try { json = await response.json(); } catch (_) { json = null; }
            return { status: response.status, body: json };
        }""",
        [path, body, key],
    )
    return answer


def upload_over_grpc(channel: grpc.Channel, name: str) -> None:
    data = tickets_csv()
    header = datasets_pb2.UploadDatasetHeader(
        name=name, task=datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION, size_bytes=len(data)
    )
    datasets_pb2_grpc.DatasetServiceStub(channel).UploadDataset(
        iter([datasets_pb2.UploadDatasetRequest(header=header), datasets_pb2.UploadDatasetRequest(chunk=data)]),
        timeout=60,
    )


@pytest.fixture(scope="module")
def private_dataset(front_door_mesh: LocalMesh) -> Iterator[str]:
    """A dataset of the admin tenant (uploaded over gRPC), that other tenants must not see."""
    with front_door_mesh.channel() as channel:
        upload_over_grpc(channel, PRIVATE_DATASET)
        stub = datasets_pb2_grpc.DatasetServiceStub(channel)
        yield PRIVATE_DATASET
        with contextlib.suppress(grpc.RpcError):
            stub.DeleteDataset(
                datasets_pb2.DeleteDatasetRequest(dataset=datasets_pb2.DatasetRef(name=PRIVATE_DATASET)), timeout=30
            )


def wait_for_job(page: Page, version: str) -> None:
    expect(page.get_by_text(f"Done: {MODEL} version {version}.")).to_be_visible(timeout=TRAINING_TIMEOUT_MS)
    status = page.get_by_test_id("job-status")
    expect(status).to_have_attribute("data-state", "JOB_STATE_SUCCEEDED")
    expect(status).to_contain_text("100 %")
    expect(page.get_by_label("Training progress")).to_have_attribute("value", "100")


def model_card(page: Page) -> Any:
    return page.locator(f'[data-model="{MODEL}"]')


def test_upload_train_deploy_canary_and_export(
    front_door_mesh: LocalMesh,
    watched: Watched,
) -> None:
    page = watched.page
    accept_dialogs(page)
    signed_in(page, front_door_mesh, key_for(LAB, (keys.SCOPE_INFER, keys.SCOPE_MODELS_TRAIN)))

    # Data: upload with progress, then the validation report and class balance.
    open_section(page, "data", "Data")
    page.get_by_label("File").set_input_files({"name": "tickets.csv", "mimeType": "text/csv", "buffer": tickets_csv()})
    page.get_by_label("Dataset name").fill(DATASET)
    expect(page.get_by_label("Task")).to_have_value("TRAINING_TASK_TEXT_CLASSIFICATION")
    page.get_by_role("button", name="Upload", exact=True).click()
    progress = page.get_by_label("Upload progress")
    expect(progress).to_have_attribute("value", "100", timeout=DEPLOY_TIMEOUT_MS)
    expect(page.get_by_text("Done: version")).to_be_visible(timeout=DEPLOY_TIMEOUT_MS)
    report = page.locator(".upload-result").get_by_test_id("validation-report")
    expect(report).to_contain_text("36 rows read, 36 kept, 0 dropped.")
    balance = page.locator(".upload-result").get_by_test_id("class-balance")
    expect(balance.locator(".bar-row")).to_have_count(3)
    for label in LABELS:
        expect(balance).to_contain_text(label)
    # Listed, and described with a preview.
    page.get_by_role("button", name=f"Describe {DATASET}").click()
    detail = page.locator("section[aria-labelledby=dataset-detail-heading]")
    expect(detail.get_by_role("heading", name=f"Dataset {DATASET}")).to_be_visible()
    expect(detail.locator("table", has_text="Preview")).to_contain_text("I was charged twice")

    # Train with defaults: progress, the loss chart, the evaluation.
    detail.get_by_role("link", name="Train a model on it →").click()
    expect(page.locator("#page h1")).to_have_text("Train")
    expect(page.get_by_label("Dataset", exact=True)).to_have_value(f"{LAB}/{DATASET}")
    page.get_by_label("Model name").fill(MODEL)
    page.get_by_role("button", name="Start training").click()
    wait_for_job(page, "1")
    points = page.get_by_test_id("loss-chart").locator("path.series")
    expect(points).to_have_count(1)
    # The whole curve: a point for every epoch, though the job's updates came at most every so often.
    epochs = re.search(r"epoch (\d+) of \1\b", page.get_by_text(re.compile(r"epoch \d+ of \d+")).inner_text())
    assert epochs is not None and int(points.get_attribute("data-points") or 0) == int(epochs.group(1)) > 1
    evaluation = page.get_by_test_id("evaluation")
    expect(evaluation).to_contain_text("Accuracy")
    expect(evaluation).to_contain_text("Macro F1")
    matrix = evaluation.get_by_test_id("confusion-matrix")
    expect(matrix).to_contain_text("Predicted label")
    expect(matrix).to_contain_text("True label")
    expect(matrix.locator("tbody tr")).to_have_count(3)

    # Deploy version 1 as the default (the slider at 0 %), then call the model by name.
    card = model_card(page)
    expect(card).to_be_visible()
    expect(card.get_by_label("Canary percent")).to_have_value("0")
    card.get_by_role("button", name="Deploy", exact=True).click()
    expect(card.get_by_test_id("deployment")).to_contain_text("Default: version 1", timeout=DEPLOY_TIMEOUT_MS)
    answer = api(page, "/api/rpc/NlpService/Classify", {"texts": ["my invoice is wrong"], "model": {"name": MODEL}})
    assert answer["status"] == 200, answer
    assert answer["body"]["model"]["name"] == MODEL and answer["body"]["model"]["version"] == "1"
    assert {s["label"] for s in answer["body"]["results"][0]["scores"]} == LABELS
    classify_in_scenarios(page)

    # A second version, deployed as a 30 % canary with the slider (by keyboard), promoted, then rolled back.
    open_section(page, "train", "Train")
    page.get_by_label("Dataset", exact=True).select_option(f"{LAB}/{DATASET}")
    page.get_by_label("Model name").fill(MODEL)
    page.get_by_role("button", name="Start training").click()
    wait_for_job(page, "2")
    expect(page.get_by_test_id("evaluation")).to_contain_text("vs version 1")
    card = model_card(page)
    expect(card.get_by_label("Version", exact=True)).to_have_value("2", timeout=DEPLOY_TIMEOUT_MS)
    slider = card.get_by_label("Canary percent")
    slider.focus()
    page.keyboard.press("Home")
    for _ in range(30):
        page.keyboard.press("ArrowRight")
    expect(slider).to_have_value("30")
    expect(card.locator("output.range-value")).to_have_text("30 %")
    card.get_by_role("button", name="Deploy", exact=True).click()
    expect(model_card(page).get_by_test_id("deployment")).to_contain_text(
        "canary: version 2 at 30 %", timeout=DEPLOY_TIMEOUT_MS
    )
    versions = model_card(page).locator("table", has_text="Versions")
    expect(versions.locator("tbody tr").nth(1)).to_contain_text("canary")
    model_card(page).get_by_role("button", name="Promote canary").click()
    expect(model_card(page).get_by_test_id("deployment")).to_contain_text(
        "Default: version 2", timeout=DEPLOY_TIMEOUT_MS
    )
    expect(model_card(page).get_by_test_id("deployment")).to_contain_text("previous default: version 1")
    model_card(page).get_by_role("button", name="Roll back").click()
    expect(model_card(page).get_by_test_id("deployment")).to_contain_text(
        "Default: version 1", timeout=DEPLOY_TIMEOUT_MS
    )
    answer = api(page, "/api/rpc/NlpService/Classify", {"texts": ["where is my parcel"], "model": {"name": MODEL}})
    assert answer["status"] == 200 and answer["body"]["model"]["version"] == "1", answer

    # The edge export of version 1: a ZIP with the ONNX model.
    card = model_card(page)
    card.get_by_label("Version", exact=True).select_option("1")
    with page.expect_download(timeout=TRAINING_TIMEOUT_MS) as downloading:
        card.get_by_role("button", name="Download edge export").click()
    download = downloading.value
    assert download.suggested_filename == f"{MODEL}-v1.zip"
    path = download.path()
    assert zipfile.is_zipfile(path)
    with zipfile.ZipFile(path) as exported:
        assert {"model.onnx", "labels.json"} <= set(exported.namelist())

    # The jobs list has both jobs, finished.
    jobs = page.locator("section[aria-labelledby=jobs-heading] table")
    expect(jobs.locator("tbody tr", has_text=MODEL)).to_have_count(2)
    expect(jobs).to_contain_text("succeeded")


def classify_in_scenarios(page: Page) -> None:
    """The new model through the Scenarios page's own-model tile."""
    open_section(page, "scenarios", "Scenarios")
    page.get_by_role("link", name=f"Classify with {MODEL}").click()
    page.get_by_label("Texts, one per line").fill("my invoice is wrong\nI cannot log in to my account")
    page.get_by_role("button", name="Run", exact=True).click()
    result = page.locator(".scenario-result table")
    expect(result).to_contain_text(f"Labels by {MODEL}")
    expect(result.locator("tbody tr")).to_have_count(2)


def test_a_viewer_key_sees_no_admin_controls_or_other_tenants_data(
    front_door_mesh: LocalMesh,
    watched: Watched,
    private_dataset: str,
) -> None:
    viewer = key_for("console-viewer", (keys.SCOPE_INFER,))
    trainer = key_for("console-other", (keys.SCOPE_INFER, keys.SCOPE_MODELS_TRAIN))
    watched.expected_statuses.update({403, 404})
    page = watched.page
    signed_in(page, front_door_mesh, viewer)
    nav = [text.strip() for text in page.locator("#nav a").all_inner_texts()]
    assert nav == ["Scenarios", "Models", "Cluster"], nav

    open_section(page, "keys", "Keys")
    expect(page.locator("#page .error")).to_contain_text("lacks the keys:admin scope")
    open_section(page, "data", "Data")
    expect(page.locator("#page .error")).to_contain_text("lacks the models:train scope")

    open_section(page, "models", "Models")
    expect(page.locator("#page table")).to_contain_text("all-MiniLM-L6-v2")
    page.get_by_role("link", name="all-MiniLM-L6-v2").click()
    expect(page.locator("#model-heading")).to_have_text("all-MiniLM-L6-v2")
    expect(page.locator("section[aria-labelledby=model-heading] table", has_text="Where it is loaded")).to_be_visible()
    expect(page.locator(".admin-action")).to_have_count(0)
    expect(page.get_by_role("button", name="Unload everywhere")).to_have_count(0)

    refused = api(page, "/api/rpc/AdminService/CreateKey", {"scopes": ["infer"], "name": "sneaky"})
    assert refused["status"] == 403, refused
    assert api(page, "/api/rpc/DatasetService/ListDatasets", {})["status"] == 403
    # A key of another tenant that may train sees none of the admin tenant's datasets.
    listed = api(page, "/api/rpc/DatasetService/ListDatasets", {}, trainer)
    assert listed["status"] == 200 and all(d["owner"] != "admin" for d in listed["body"]["datasets"]), listed
    hidden = api(
        page,
        "/api/rpc/DatasetService/DescribeDataset",
        {"dataset": {"name": private_dataset, "owner": "admin"}},
        trainer,
    )
    assert hidden["status"] == 404, hidden


def test_a_dataset_is_shared_read_only_then_deleted(
    front_door_mesh: LocalMesh,
    watched: Watched,
) -> None:
    name = "console-shared"
    other = key_for("console-partner", (keys.SCOPE_INFER, keys.SCOPE_MODELS_TRAIN))
    with front_door_mesh.channel() as channel:
        upload_over_grpc(channel, name)
    watched.expected_statuses.add(404)
    page = watched.page
    accept_dialogs(page)
    signed_in(page, front_door_mesh)
    open_section(page, "data", "Data")
    page.get_by_role("button", name=f"Describe {name}").click()
    detail = page.locator("section[aria-labelledby=dataset-detail-heading]")
    expect(detail).to_contain_text("Not shared with any other tenant.")
    detail.get_by_label("Tenant", exact=True).fill("console-partner")
    detail.get_by_role("button", name="Share read-only").click()
    expect(detail).to_contain_text("Shared read-only with: console-partner.")
    ref = {"dataset": {"name": name, "owner": "admin"}}
    seen = api(page, "/api/rpc/DatasetService/DescribeDataset", ref, other)
    assert seen["status"] == 200 and seen["body"]["dataset"]["shared_with"] == [], seen
    detail.get_by_role("button", name="Stop sharing with console-partner").click()
    expect(detail).to_contain_text("Not shared with any other tenant.")
    assert api(page, "/api/rpc/DatasetService/DescribeDataset", ref, other)["status"] == 404
    detail.get_by_role("button", name="Delete every version").click()
    expect(detail).to_be_hidden()
    listing = page.locator("section[aria-labelledby=datasets-heading]")
    expect(listing.get_by_role("button", name=f"Describe {name}")).to_have_count(0)
    assert api(page, "/api/rpc/DatasetService/DescribeDataset", ref)["status"] == 404


def test_a_key_is_shown_once_works_and_is_refused_once_revoked(
    front_door_mesh: LocalMesh,
    watched: Watched,
) -> None:
    watched.expected_statuses.add(401)
    page = watched.page
    accept_dialogs(page)
    signed_in(page, front_door_mesh)
    open_section(page, "keys", "Keys")
    page.get_by_label("Name", exact=True).fill("console-test-key")
    expect(page.get_by_label("infer")).to_be_checked()
    page.get_by_label("audit:read").check()
    page.get_by_role("button", name="Create key").click()
    shown = page.get_by_test_id("new-key")
    expect(shown).to_be_visible()
    secret = shown.inner_text().strip()
    assert secret.startswith("aimass_")
    key_id = secret.split("_")[1]
    expect(page.get_by_text("shown this once")).to_be_visible()
    expect(page.locator(f'[data-key-state="{key_id}"]')).to_have_text("active")

    who = api(page, "/api/rpc/AdminService/WhoAmI", {}, secret)
    assert who["status"] == 200 and who["body"]["key_id"] == key_id, who
    assert sorted(who["body"]["scopes"]) == ["audit:read", "infer"]
    # Never kept: gone after leaving the page and coming back, and nowhere in the tab's storage.
    open_section(page, "models", "Models")
    open_section(page, "keys", "Keys")
    expect(page.locator(f'[data-key-state="{key_id}"]')).to_have_text("active")
    expect(page.get_by_test_id("new-key")).to_have_count(0)
    assert secret not in page.content()
    stored = page.evaluate("() => JSON.stringify({...sessionStorage}) + JSON.stringify({...localStorage})")
    assert secret not in stored

    page.get_by_role("button", name=f"Revoke key {key_id}").click()
    expect(page.locator(f'[data-key-state="{key_id}"]')).to_have_text("revoked")
    deadline = time.monotonic() + 30
    status = 200
    while time.monotonic() < deadline:
        status = api(page, "/api/rpc/AdminService/WhoAmI", {}, secret)["status"]
        if status == 401:
            break
        time.sleep(0.5)
    assert status == 401
    # The audit log shows the creation and the revocation.
    page.get_by_label("Action prefix").fill("keys.")
    page.get_by_role("button", name="Filter").click()
    audit = page.locator("form[aria-labelledby=audit-heading] table")
    expect(audit).to_contain_text("keys.revoke")
    expect(audit).to_contain_text("keys.create")


def test_models_page_shows_where_models_are_loaded(
    front_door_mesh: LocalMesh,
    watched: Watched,
) -> None:
    page = watched.page
    signed_in(page, front_door_mesh)
    open_section(page, "models", "Models")
    catalogue = page.locator("section[aria-labelledby=catalogue-heading] table")
    for name in ("all-MiniLM-L6-v2", "efficientnet-lite0"):
        expect(catalogue).to_contain_text(name)
    page.get_by_role("link", name="all-MiniLM-L6-v2").click()
    replicas = page.locator("section[aria-labelledby=model-heading] table", has_text="Where it is loaded")
    expect(replicas).to_contain_text("loaded")
    expect(replicas).to_contain_text("CPU")
    expect(replicas).to_contain_text("MiB")
    # An admin key (models:admin) gets the load and unload buttons.
    expect(page.get_by_role("button", name="Unload everywhere")).to_be_visible()
    expect(page.locator(".admin-action").first).to_be_visible()


def test_cluster_page_shows_devices_replicas_and_quotas_live(
    front_door_mesh: LocalMesh,
    watched: Watched,
) -> None:
    page = watched.page
    signed_in(page, front_door_mesh)
    open_section(page, "cluster", "Cluster")
    expect(page.get_by_test_id("cluster-status")).to_contain_text("Live", timeout=30_000)
    memory = page.get_by_test_id("device-memory").first
    expect(memory).to_contain_text("memory")
    expect(memory).to_contain_text(" of ")
    # Two snapshots at least: the chart has drawn a line of two points.
    line = page.locator(".device-card path.series").first
    expect(line).to_have_attribute("data-points", re.compile(r"^([2-9]|[1-9][0-9]+)$"), timeout=15_000)
    replicas = page.locator("section[aria-labelledby=replicas-heading] table")
    expect(replicas).to_contain_text("nlp-")
    expect(replicas).to_contain_text("all-MiniLM-L6-v2")
    expect(page.locator("section[aria-labelledby=services-heading] table")).to_contain_text("NlpService")
    expect(page.locator('.tenant-usage[data-tenant="admin"]')).to_contain_text("unlimited")


@pytest.mark.parametrize(
    ("section", "heading"),
    [("data", "Data"), ("train", "Train"), ("models", "Models"), ("cluster", "Cluster"), ("keys", "Keys")],
)
def test_every_page_loads_cleanly_on_a_laptop_screen(
    front_door_mesh: LocalMesh,
    watched: Watched,
    section: str,
    heading: str,
) -> None:
    page = watched.page
    page.set_viewport_size({"width": 1000, "height": 760})
    signed_in(page, front_door_mesh)
    open_section(page, section, heading)
    expect(page.locator("#page h2").first).to_be_visible()
    if section == "cluster":
        page.wait_for_timeout(2500)  # a live stream: never idle
    else:
        page.wait_for_load_state("networkidle")
    # Every control has a label; nothing is wider than the screen.
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('#page input, #page select, #page textarea')]
            .filter((c) => !c.labels?.length && !c.getAttribute('aria-label') && c.type !== 'hidden')
            .map((c) => c.outerHTML)"""
    )
    assert not unlabelled, unlabelled
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth + 1")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement !== document.body")
