"""The web console's Scenarios section in a real browser against a real mesh (front_door_mesh): signing in (and a
wrong key refused), the gallery, and every built-in scenario run on real inputs with the result checked as a user
sees it: sentiment, entities, the embedding map, zero-shot labels, a cat photo, a face, text in a picture, an
espeak-ng recording and a microphone recording (Chromium's fake device) transcribed, speech streamed and played,
chat streamed and stopped; the code samples under a result. Every page must stay on 127.0.0.1 and log no error (the
``watched`` fixture)."""

from __future__ import annotations

import io
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont
from playwright.sync_api import Page, expect
from skimage import data as skimage_data

from aimass.datasets.samples import TICKET_LABELS, tickets_csv
from aimass.local_mesh import LocalMesh
from aimass.tenancy import keys
from aimass.v1 import common_pb2, datasets_pb2, deployments_pb2, deployments_pb2_grpc
from tests.console_browser import Watched, sign_in
from tests.security import key_for
from tests.test_lifecycle_e2e import train, upload

pytestmark = pytest.mark.slow

CALL_TIMEOUT_MS = 120_000
SPOKEN = "The quick brown fox jumps over the lazy dog."


# -- inputs -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The files a user would pick: scikit-image's cat and astronaut as JPEGs, a PNG with rendered text, and a
    sentence spoken by espeak-ng as a WAV."""
    folder = tmp_path_factory.mktemp("scenario-inputs")
    files = {}
    for name, photo in (("cat", "chelsea"), ("astronaut", "astronaut")):
        path = folder / f"{name}.jpg"
        Image.fromarray(getattr(skimage_data, photo)()).save(path, "JPEG", quality=90)
        files[name] = path
    font = ImageFont.load_default(size=48)
    picture = Image.new("RGB", (1000, 260), "white")
    draw = ImageDraw.Draw(picture)
    for row, line in enumerate(["Hello aimass vision", "Invoice 2026 total 42"]):
        draw.text((40, 40 + 110 * row), line, fill="black", font=font)
    files["text"] = folder / "text.png"
    picture.save(files["text"], "PNG")
    wav = subprocess.run(["espeak-ng", "-v", "en-us", "--stdout", "--", SPOKEN], capture_output=True, check=True)
    files["speech"] = folder / "speech.wav"
    files["speech"].write_bytes(wav.stdout)
    files["not-a-photo"] = folder / "notes.jpg"
    files["not-a-photo"].write_bytes(b"this is not an image, only text with a .jpg name\n" * 4)
    # A sanity check of the inputs themselves (not of the console): the photo decodes.
    Image.open(io.BytesIO(files["cat"].read_bytes())).verify()
    return files


# -- helpers ----------------------------------------------------------------------------------------------------


def open_scenario(page: Page, mesh: LocalMesh, title: str) -> None:
    """Signs in and follows the scenario's tile from the gallery, as a user would."""
    sign_in(page, mesh)
    page.get_by_role("link", name=title).click()
    expect(page.locator("#page h1")).to_have_text(title)
    assert mesh.api_key not in page.url


def run(page: Page, button: str = "Run") -> str:
    """Presses the scenario's Run button and waits for the result (or a shown error); returns the result's text."""
    page.get_by_role("button", name=button, exact=True).click()
    region = page.locator(".scenario-result")
    expect(region).to_have_attribute("data-state", "done", timeout=CALL_TIMEOUT_MS)
    assert region.locator(".error").count() == 0, region.inner_text()
    return page.locator(".result-body").inner_text()


def result(page: Page) -> str:
    return page.locator(".result-body").inner_text()


# -- signing in, the gallery -----------------------------------------------------------------------------------


def test_sign_in_shows_the_gallery_and_keeps_the_key_out_of_urls(
    watched: Watched,
    front_door_mesh: LocalMesh,
) -> None:
    page = watched.page
    sign_in(page, front_door_mesh)
    expect(page.locator("#page h1")).to_have_text("Scenarios")
    tiles = page.locator("ul.gallery a.tile")
    expect(tiles).to_have_count(10)
    for title in (
        "How do customers feel?",
        "Find people, places and companies",
        "Group similar texts",
        "Sort texts into my labels",
        "What is in this photo?",
        "Find faces",
        "Read the text in a photo",
        "Transcribe a recording",
        "Read this aloud",
        "Chat",
    ):
        expect(page.get_by_role("link", name=title)).to_be_visible()
    expect(page.get_by_role("link", name="How do customers feel?")).to_contain_text("NlpService/Sentiment")
    assert front_door_mesh.api_key not in page.url
    # By keyboard: Tab reaches the tiles, Enter opens one.
    first = tiles.first
    first.focus()
    expect(first).to_be_focused()
    page.keyboard.press("Enter")
    expect(page).to_have_url(f"{front_door_mesh.console_url.rstrip('/')}/#/scenarios/sentiment")
    expect(page.locator("#page h1")).to_have_text("How do customers feel?")
    expect(page.get_by_label("Texts, one per line")).to_be_visible()
    assert front_door_mesh.api_key not in page.url
    # Every control of every view is labelled, the result region is announced politely.
    for scenario in ("entities", "embeddings", "zero-shot", "photo", "faces", "ocr", "transcribe", "speak", "chat"):
        page.goto(f"{front_door_mesh.console_url.rstrip('/')}/#/scenarios/{scenario}")
        expect(page.locator(".scenario-result")).to_have_attribute("aria-live", "polite")
        for control in page.locator(".scenario-form :is(input, textarea, select)").all():
            control_id = control.get_attribute("id")
            assert control_id and page.locator(f'label[for="{control_id}"]').count() == 1, (scenario, control_id)
        assert front_door_mesh.api_key not in page.url
    page.get_by_role("link", name="← All scenarios").click()
    expect(page.locator("#page h1")).to_have_text("Scenarios")


def test_a_wrong_key_is_refused_with_a_message(
    watched: Watched,
    front_door_mesh: LocalMesh,
) -> None:
    watched.expected_statuses.add(401)
    page = watched.page
    page.goto(front_door_mesh.console_url)
    wrong = "aimass_wrong_key_0123456789"
    page.get_by_label("API key").fill(wrong)
    page.get_by_role("button", name="Sign in").click()
    message = page.locator("#sign-in-error")
    expect(message).to_be_visible()
    expect(message).to_contain_text("Not signed in")
    expect(page.locator("#nav")).to_be_hidden()
    expect(page.locator("#page")).to_be_hidden()
    assert wrong not in page.url and front_door_mesh.api_key not in page.url


# -- text -------------------------------------------------------------------------------------------------------


def test_sentiment_and_its_code_samples(
    watched: Watched,
    front_door_mesh: LocalMesh,
) -> None:
    page = watched.page
    open_scenario(page, front_door_mesh, "How do customers feel?")
    page.get_by_label("Texts, one per line").fill("I love this\nThis is terrible and I hate it")
    run(page)
    rows = page.locator(".result-body tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("I love this")
    expect(rows.nth(0).locator(".sentiment")).to_have_text("positive")
    expect(rows.nth(1).locator(".sentiment")).to_have_text("negative")
    # The same call for one's own code.
    page.get_by_text("The same call from your code").click()
    grpcurl = page.locator('code[data-sample="grpcurl"]')
    expect(grpcurl).to_be_visible()
    expect(grpcurl).to_contain_text("aimass.v1.NlpService/Sentiment")
    expect(grpcurl).to_contain_text("I love this")
    expect(page.locator('code[data-sample="python"]')).to_contain_text("client.nlp.sentiment(request)")
    expect(page.locator('code[data-sample="curl"]')).to_contain_text("/v1/aimass/sentiment")
    assert front_door_mesh.api_key not in page.locator(".samples").inner_text()


def test_empty_input_is_a_readable_message(
    watched: Watched,
    front_door_mesh: LocalMesh,
) -> None:
    page = watched.page
    open_scenario(page, front_door_mesh, "How do customers feel?")
    page.get_by_label("Texts, one per line").fill("  \n ")
    page.get_by_role("button", name="Run").click()
    expect(page.locator(".scenario-result [role=alert]")).to_contain_text("Write at least one text")
    expect(page.get_by_role("button", name="Run")).to_be_enabled()


def test_entities_are_highlighted_and_listed(
    watched: Watched,
    front_door_mesh: LocalMesh,
) -> None:
    page = watched.page
    open_scenario(page, front_door_mesh, "Find people, places and companies")
    page.get_by_label("Texts, one per line").fill("Barack Obama flew to Paris on Monday.")
    run(page)
    expect(page.locator("mark.entity-PERSON")).to_contain_text("Barack Obama")
    expect(page.locator("mark.entity", has_text="Paris")).to_have_count(1)
    expect(page.locator(".result-body tbody tr", has_text="Barack Obama")).to_contain_text("PERSON")
    expect(page.locator(".result-body tbody tr", has_text="Paris")).to_contain_text("GPE")


def test_the_embedding_map_draws_a_point_per_text(
    watched: Watched,
    front_door_mesh: LocalMesh,
) -> None:
    page = watched.page
    open_scenario(page, front_door_mesh, "Group similar texts")
    texts = ["The cat sat on the mat.", "A kitten sleeps on the rug.", "Stocks fell sharply today.", "Shares dropped."]
    page.get_by_label("Texts, one per line (2 or more)").fill("\n".join(texts))
    run(page)
    chart = page.locator("svg.chart")
    expect(chart.locator("circle.point")).to_have_count(len(texts))
    expect(chart.locator("text.point-label")).to_have_count(len(texts))
    expect(chart.locator("text.point-label").first).to_have_text(texts[0])
    # The nearest neighbour of the cat is the kitten.
    expect(page.locator(".result-body tbody tr").first).to_contain_text("A kitten sleeps on the rug.")


def test_zero_shot_sorts_a_text_under_my_label(
    watched: Watched,
    front_door_mesh: LocalMesh,
) -> None:
    page = watched.page
    open_scenario(page, front_door_mesh, "Sort texts into my labels")
    page.get_by_label("Texts, one per line").fill("Book me a flight to Rome")
    page.get_by_label("Labels, separated by commas").fill("travel, billing, cooking")
    run(page)
    row = page.locator(".result-body tbody tr").first
    expect(row.locator(".best-label")).to_have_text("travel")


# -- photos -----------------------------------------------------------------------------------------------------


def test_a_cat_photo_is_labelled_a_cat(
    watched: Watched,
    front_door_mesh: LocalMesh,
    inputs: dict[str, Path],
) -> None:
    page = watched.page
    open_scenario(page, front_door_mesh, "What is in this photo?")
    page.get_by_label("Photo (JPEG, PNG or WebP)").set_input_files(inputs["cat"])
    expect(page.locator(".media-stage img")).to_be_visible()
    run(page)
    headline = page.locator(".result-body .headline").inner_text().lower()
    assert any(cat in headline for cat in ("tabby", "tiger cat", "egyptian cat", "persian", "siamese")), headline
    expect(page.locator(".media-stage img")).to_be_visible()


def test_a_face_gets_a_box(
    watched: Watched,
    front_door_mesh: LocalMesh,
    inputs: dict[str, Path],
) -> None:
    page = watched.page
    open_scenario(page, front_door_mesh, "Find faces")
    page.get_by_label("Photo (JPEG, PNG or WebP)").set_input_files(inputs["astronaut"])
    run(page)
    count = page.locator(".face-count")
    assert int(count.get_attribute("data-count") or 0) >= 1
    expect(count).to_contain_text("face")
    overlay = page.locator(".media-stage canvas.overlay")
    expect(overlay).to_have_count(1)
    # The overlay is in the photo's pixels (512 x 512) and covers the shown photo exactly.
    assert overlay.evaluate("c => [c.width, c.height]") == [512, 512]
    image_box = page.locator(".media-stage img").bounding_box()
    overlay_box = overlay.bounding_box()
    assert image_box and overlay_box
    assert abs(image_box["width"] - overlay_box["width"]) < 1.5
    assert abs(image_box["height"] - overlay_box["height"]) < 1.5
    # A laptop-sized window: the page still fits its width.
    page.set_viewport_size({"width": 1000, "height": 760})
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    # Something was drawn (the box): the canvas is not blank.
    assert overlay.evaluate("c => c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some(v => v > 0)")


def test_text_in_a_picture_is_read(
    watched: Watched,
    front_door_mesh: LocalMesh,
    inputs: dict[str, Path],
) -> None:
    page = watched.page
    open_scenario(page, front_door_mesh, "Read the text in a photo")
    page.get_by_label("Photo (JPEG, PNG or WebP)").set_input_files(inputs["text"])
    run(page)
    expect(page.locator(".read-text")).to_contain_text("Hello aimass vision")
    expect(page.locator(".read-text")).to_contain_text("Invoice 2026 total 42")
    expect(page.locator(".media-stage canvas.overlay")).to_have_count(1)


def test_a_file_that_is_not_a_photo_is_refused_readably(
    watched: Watched,
    front_door_mesh: LocalMesh,
    inputs: dict[str, Path],
) -> None:
    watched.expected_statuses.add(400)
    page = watched.page
    open_scenario(page, front_door_mesh, "What is in this photo?")
    page.get_by_label("Photo (JPEG, PNG or WebP)").set_input_files(inputs["not-a-photo"])
    page.get_by_role("button", name="Run").click()
    alert = page.locator(".scenario-result [role=alert]")
    expect(alert).to_be_visible(timeout=CALL_TIMEOUT_MS)
    assert len(alert.inner_text()) > 10
    expect(page.locator(".scenario-result")).to_have_attribute("data-state", "error")
    expect(page.get_by_role("button", name="Run")).to_be_enabled()


# -- speech -----------------------------------------------------------------------------------------------------


def test_an_uploaded_recording_is_transcribed(
    watched: Watched,
    front_door_mesh: LocalMesh,
    inputs: dict[str, Path],
) -> None:
    page = watched.page
    open_scenario(page, front_door_mesh, "Transcribe a recording")
    page.get_by_label("Audio file (WAV, FLAC or OGG)").set_input_files(inputs["speech"])
    page.get_by_label("Spoken language").select_option("en")
    run(page)
    transcript = page.locator(".transcript").inner_text().lower()
    assert "quick brown fox" in transcript and "lazy dog" in transcript, transcript
    expect(page.locator(".result-body audio")).to_have_count(1)


def test_a_microphone_recording_is_sent(
    watched: Watched,
    front_door_mesh: LocalMesh,
) -> None:
    page = watched.page
    open_scenario(page, front_door_mesh, "Transcribe a recording")
    page.get_by_role("button", name="Record from the microphone").click()
    expect(page.locator(".rec-status")).to_contain_text("Recording")
    time.sleep(1.5)
    page.get_by_role("button", name="Stop and transcribe").click()
    region = page.locator(".scenario-result")
    expect(region).to_have_attribute("data-state", "done", timeout=CALL_TIMEOUT_MS)
    assert region.locator(".error").count() == 0, region.inner_text()
    # Chromium's fake microphone beeps: the transcript may be empty, but the call went through with a WAV.
    expect(page.locator(".transcript")).to_be_visible()
    expect(page.locator(".result-body")).to_contain_text("recording.wav")
    expect(page.locator(".rec-status")).to_contain_text("Recorded")
    expect(page.get_by_role("button", name="Record from the microphone")).to_be_enabled()


def test_read_aloud_streams_and_plays_audio(
    watched: Watched,
    front_door_mesh: LocalMesh,
) -> None:
    page = watched.page
    open_scenario(page, front_door_mesh, "Read this aloud")
    page.get_by_label("Text to read").fill("Hello from the console. This sentence is spoken while it streams.")
    run(page, "Read aloud")
    received = page.locator(".tts-bytes")
    assert int(received.get_attribute("data-bytes") or 0) > 1000
    assert page.locator(".tts-status").get_attribute("data-playing") == "true"
    expect(page.locator(".tts-status")).to_contain_text("Played")
    expect(page.locator(".result-body audio")).to_have_count(1)
    expect(page.get_by_role("link", name="Download speech.wav")).to_have_attribute("download", "speech.wav")


# -- chat -------------------------------------------------------------------------------------------------------

# Records the length of the reply each time it changes (the page's own DOM, watched from the test).
WATCH_REPLY = """() => {
  window.__replyLengths = [];
  const log = document.querySelector('.chat-log');
  new MutationObserver(() => {
    const turns = log.querySelectorAll('.chat-turn.assistant .chat-text');
    const last = turns[turns.length - 1];
    if (last) window.__replyLengths.push(last.textContent.length);
  }).observe(log, {subtree: true, childList: true, characterData: true});
}"""


def test_chat_streams_and_stop_cuts_the_reply(
    watched: Watched,
    front_door_mesh: LocalMesh,
) -> None:
    page = watched.page
    open_scenario(page, front_door_mesh, "Chat")
    page.get_by_label("Longest reply, in tokens").fill("32")
    page.get_by_label("Your message").fill("Name three colours.")
    page.evaluate(WATCH_REPLY)
    run(page, "Send")
    lengths = page.evaluate("() => window.__replyLengths")
    growing = sorted({n for n in lengths if n > 0})
    assert len(growing) >= 2, f"the reply did not stream: {lengths}"
    turns = page.locator(".chat-turn")
    expect(turns).to_have_count(2)
    expect(turns.nth(0)).to_contain_text("Name three colours.")
    assert turns.nth(1).locator(".chat-text").inner_text().strip()

    # A long answer, stopped once it has started: the reply is marked stopped, Send works again.
    page.get_by_label("Longest reply, in tokens").fill("600")
    page.get_by_label("Your message").fill("Tell me a very long story about a dragon and a knight.")
    page.get_by_role("button", name="Send").click()
    reply = turns.nth(3)
    expect(reply).to_have_attribute("data-state", "streaming")
    expect(reply.locator(".chat-text")).not_to_have_text("", timeout=CALL_TIMEOUT_MS)
    page.get_by_role("button", name="Stop").click()
    expect(reply).to_have_attribute("data-state", "stopped")
    expect(reply).to_contain_text("Stopped")
    expect(page.locator(".scenario-result")).to_have_attribute("data-state", "stopped")
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    expect(page.get_by_role("button", name="Stop")).to_be_disabled()
    # The conversation keeps every turn, and goes on.
    expect(turns).to_have_count(4)
    page.get_by_label("Longest reply, in tokens").fill("8")
    page.get_by_label("Your message").fill("Thanks!")
    run(page, "Send")
    expect(turns).to_have_count(6)


# -- the tenant's own models -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_model(front_door_mesh: LocalMesh, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tenant's key whose tenant has trained and deployed a small text classifier, "scenario-router" (seconds on
    a CPU), through the public API."""
    key = key_for("console-scenarios", (keys.SCOPE_INFER, keys.SCOPE_MODELS_TRAIN))
    csv = tickets_csv(tmp_path_factory.mktemp("tickets") / "tickets.csv", rows=400, seed=3)
    with front_door_mesh.channel(key) as channel:
        upload(channel, csv, "scenario-tickets", datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION)
        train(channel, "scenario-tickets", "scenario-router")
        deployments_pb2_grpc.DeploymentServiceStub(channel).DeployModel(
            deployments_pb2.DeployModelRequest(model=common_pb2.ModelRef(name="scenario-router", version="1")),
            timeout=60,
        )
    return key


def test_a_trained_model_classifies_from_its_tile(
    watched: Watched,
    front_door_mesh: LocalMesh,
    own_model: str,
) -> None:
    page = watched.page
    sign_in(page, front_door_mesh, own_model)
    tile = page.get_by_role("link", name="Classify with scenario-router")
    expect(tile).to_contain_text("NlpService/Classify")
    tile.click()
    expect(page.locator("#page h1")).to_have_text("Classify with scenario-router")
    page.get_by_label("Texts, one per line").fill("I was charged twice for my subscription this month")
    run(page)
    expect(page.locator(".result-body tbody tr").first.locator(".best-label")).to_have_text("billing")
    expect(page.locator(".result-body tbody tr").first.locator("ul.scores li")).to_have_count(len(TICKET_LABELS))
    assert own_model not in page.url
