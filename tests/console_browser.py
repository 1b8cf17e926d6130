"""The console's browser tests' shared parts: Debian's Chromium driven by Playwright (never `playwright install`: it
downloads browsers), one browser per module, a fresh context per test that records every request leaving 127.0.0.1
and every error the page logs, and signing in as a user would."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright, Request, sync_playwright

from aimass.local_mesh import LocalMesh

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium's fake microphone and camera, so "record from the microphone" works headless.
CHROMIUM_ARGS = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost"})


@dataclass
class Watched:
    """What a page did that a test must see: requests that left 127.0.0.1, errors in the browser's console."""

    page: Page
    external: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    # Errors a test provoked on purpose (a refused call logs "Failed to load resource: ... 401") are allowed here.
    expected_statuses: set[int] = field(default_factory=set)

    def on_request(self, request: Request) -> None:
        host = urlsplit(request.url).hostname or ""
        if request.url.startswith(("http:", "https:", "ws:", "wss:")) and host not in LOCAL_HOSTS:
            self.external.append(request.url)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        text = message.text
        if any(f"status of {status}" in text for status in self.expected_statuses):
            return
        self.errors.append(text)

    def check(self) -> None:
        assert not self.external, f"requests left 127.0.0.1: {self.external}"
        assert not self.errors, f"errors in the browser's console: {self.errors}"


# Per module, not per session: while Playwright's sync driver runs, its event loop is the main thread's running
# loop, and every async test after it (pytest-asyncio) would fail to start its own.
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    if not shutil.which(CHROMIUM) and not CHROMIUM.startswith("/"):
        pytest.fail("chromium is not installed (make install puts Debian's chromium package in)")
    launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    yield launched
    launched.close()


@pytest.fixture
def watched(browser: Browser) -> Iterator[Watched]:
    """A fresh page (its own context: no key left from another test); fails the test if it reached beyond
    127.0.0.1 or logged an error."""
    context = browser.new_context(viewport={"width": 1280, "height": 860}, permissions=["microphone"])
    context.set_default_timeout(30_000)
    page = context.new_page()
    seen = Watched(page)
    page.on("request", seen.on_request)
    page.on("console", seen.on_console)
    page.on("pageerror", lambda error: seen.errors.append(f"uncaught: {error}"))
    yield seen
    context.close()
    seen.check()


def sign_in(page: Page, mesh: LocalMesh, key: str | None = None) -> None:
    """Opens the console and signs in with ``key`` (default: the mesh's admin key) as a person would."""
    page.goto(mesh.console_url)
    page.get_by_label("API key").fill(key or mesh.api_key)
    page.get_by_role("button", name="Sign in").click()
    page.locator("#nav a").first.wait_for()
