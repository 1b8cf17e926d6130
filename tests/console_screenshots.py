"""Screenshots of the web console for the docs: ``python -m tests.console_screenshots`` starts a local mesh (every
modality and a trainer), signs in with its admin key in Debian's Chromium (Playwright; never ``playwright install``)
and saves a PNG of each page into docs/console/: the scenarios gallery, a few scenario results, and the Data, Train,
Models, Cluster and Keys sections as they are.

``--console URL --key-file PATH`` uses a mesh that is already running instead (the key is read from the file, never
given on the command line); ``--out DIR`` writes elsewhere."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from playwright.sync_api import ConsoleMessage, Page, ViewportSize, expect, sync_playwright
from skimage import data as skimage_data

from aimass.datasets.samples import tickets_csv
from aimass.local_mesh import LocalMesh
from tests.console_browser import CHROMIUM, CHROMIUM_ARGS

REPLICAS = {"nlp": 1, "vision": 1, "speech": 1, "llm": 1, "trainer": 1}
OUT = Path(__file__).resolve().parent.parent / "docs" / "console"
VIEWPORT: ViewportSize = {"width": 1280, "height": 860}
CALL_TIMEOUT_MS = 180_000
SECTIONS = ("data", "train", "models", "cluster", "keys")


def sample_files(folder: Path) -> dict[str, Path]:
    """A face photo, a picture with text and a labelled CSV of support tickets, to show results on."""
    files = {"astronaut": folder / "astronaut.jpg", "text": folder / "text.png"}
    photo = skimage_data.astronaut()  # type: ignore[no-untyped-call]
    Image.fromarray(photo).save(files["astronaut"], "JPEG", quality=90)
    picture = Image.new("RGB", (1000, 260), "white")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=48)
    for row, line in enumerate(["Hello aimass vision", "Invoice 2026 total 42"]):
        draw.text((40, 40 + 110 * row), line, fill="black", font=font)
    picture.save(files["text"], "PNG")
    files["tickets"] = tickets_csv(folder / "tickets.csv", rows=300, seed=5)
    return files


def open_hash(page: Page, console: str, route: str) -> None:
    page.goto(f"{console.rstrip('/')}/#/{route}")
    page.locator("#page h1").first.wait_for()


def run_scenario(page: Page, button: str = "Run") -> None:
    page.get_by_role("button", name=button, exact=True).click()
    expect(page.locator(".scenario-result")).to_have_attribute("data-state", "done", timeout=CALL_TIMEOUT_MS)


def report(message: ConsoleMessage) -> None:
    if message.type == "error":
        print(f"  console error: {message.text}", file=sys.stderr)


def capture(console: str, key: str, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    saved: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="aimass-shots-") as scratch, sync_playwright() as driver:
        files = sample_files(Path(scratch))
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport=VIEWPORT, permissions=["microphone"])
            context.set_default_timeout(60_000)
            page = context.new_page()
            page.on("console", report)

            def shot(name: str, settle_s: float = 0.5) -> None:
                page.mouse.move(0, 0)  # no hover highlight in the picture
                time.sleep(settle_s)
                path = out / f"{name}.png"
                page.screenshot(path=path, full_page=True)
                saved.append(path)
                print(f"  {path}")

            page.goto(console)
            page.get_by_label("API key").fill(key)
            page.get_by_role("button", name="Sign in").click()
            page.locator("#nav a").first.wait_for()
            page.locator("ul.gallery a.tile").first.wait_for()
            shot("scenarios")

            def photo(name: str) -> Callable[[], None]:
                def act() -> None:
                    page.get_by_label("Photo (JPEG, PNG or WebP)").set_input_files(files[name])
                    run_scenario(page)

                return act

            def chat() -> None:
                page.get_by_label("Longest reply, in tokens").fill("64")
                run_scenario(page, "Send")

            steps: list[tuple[str, Callable[[], None]]] = [
                ("sentiment", lambda: run_scenario(page)),
                ("entities", lambda: run_scenario(page)),
                ("embeddings", lambda: run_scenario(page)),
                ("faces", photo("astronaut")),
                ("ocr", photo("text")),
                ("chat", chat),
            ]
            for scenario, act in steps:
                open_hash(page, console, f"scenarios/{scenario}")
                try:
                    act()
                except Exception as err:  # a screenshot of what is there beats none
                    print(f"  {scenario}: {err}", file=sys.stderr)
                shot(f"scenario-{scenario}")
            # Data and Train with something in them: a dataset uploaded through the Data page, a model trained on
            # it through the Train page (its live loss, evaluation and confusion matrix), deployed.
            try:
                open_hash(page, console, "data")
                page.get_by_label("File").set_input_files(files["tickets"])
                page.get_by_label("Dataset name").fill("support-tickets")
                page.get_by_role("button", name="Upload", exact=True).click()
                page.get_by_text("Done: version").wait_for(timeout=CALL_TIMEOUT_MS)
                shot("data-uploaded")
                open_hash(page, console, "train")
                page.get_by_label("Dataset", exact=True).select_option("admin/support-tickets")
                page.get_by_label("Model name").fill("ticket-router")
                page.get_by_role("button", name="Start training").click()
                page.get_by_text("Done: ticket-router version 1.").wait_for(timeout=CALL_TIMEOUT_MS)
                page.locator('[data-model="ticket-router"]').get_by_role("button", name="Deploy", exact=True).click()
                time.sleep(2)
                shot("train-evaluated")
            except Exception as err:  # a screenshot of what is there beats none
                print(f"  data/train: {err}", file=sys.stderr)
            for section in SECTIONS:
                open_hash(page, console, section)
                # The cluster's charts draw a point per snapshot (every 2 s): a few make a line.
                shot(section, settle_s=10.0 if section == "cluster" else 1.5)
        finally:
            browser.close()
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.console_screenshots", description=__doc__)
    parser.add_argument("--console", help="a running console's URL (default: start a local mesh)")
    parser.add_argument("--key-file", type=Path, help="a file holding the API key to sign in with (with --console)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where the PNGs go (default {OUT})")
    args = parser.parse_args(argv)
    if args.console:
        if not args.key_file:
            parser.error("--console needs --key-file (the key is never taken on the command line)")
        saved = capture(args.console, args.key_file.read_text().strip(), args.out)
    else:
        with tempfile.TemporaryDirectory(prefix="aimass-shots-mesh-") as folder:
            mesh = LocalMesh(Path(folder) / "mesh.log", replicas=REPLICAS, env={"AIMASS_LLM__MAX_MODEL_LEN": "1024"})
            print("starting a local mesh (a minute or two)…")
            mesh.start()
            try:
                mesh.wait_ready(600)
                saved = capture(mesh.console_url, mesh.api_key, args.out)
            finally:
                mesh.stop()
    print(f"{len(saved)} screenshots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
