"""Shared fixtures: a real mesh started by `aimass up` on loopback ports the tests pick, and real NLP engines.

Before anything reads settings, the session gets its own state directory (CA, certificates for every role, a store
with an admin key: tests/security.py), as `aimass up` makes for a user: every server the suite builds in-process is
secured exactly as in production.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.security import prepare_session_state

SESSION_STATE = prepare_session_state()

from aimass.local_mesh import LocalMesh  # noqa: E402  (after the session's state directory is set)
from services.nlp.engine import NlpEngine  # noqa: E402

# The console's browser fixtures (one Playwright driver and one Chromium per module that uses them).
from tests.console_browser import browser, playwright, watched  # noqa: E402, F401

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MESH_START_TIMEOUT_S = 240.0


def start_mesh(
    log_dir: Path,
    replicas: Mapping[str, int] | None = None,
    extra_env: dict[str, str] | None = None,
    *,
    metrics: bool = False,
) -> LocalMesh:
    """`aimass up` (the command users run) on free loopback ports, ready to serve; NLP only unless told."""
    # The session's state directory: its admin key, tenants' keys and certificates work on this mesh too.
    mesh = LocalMesh(
        log_dir / "mesh.log",
        replicas=replicas or {"nlp": 1},
        env=extra_env or {},
        metrics=metrics,
        state_dir=SESSION_STATE,
    )
    mesh.start()
    try:
        mesh.wait_ready(MESH_START_TIMEOUT_S)
    except BaseException:
        mesh.stop()
        raise
    return mesh


@pytest.fixture(scope="session")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    # Every service whose models install here (the others answer UNAVAILABLE through the gateway), and a trainer.
    started = start_mesh(tmp_path_factory.mktemp("mesh"), {"nlp": 1, "vision": 1, "trainer": 1}, metrics=True)
    yield started
    started.stop()


@pytest.fixture(scope="session")
def front_door_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """Every modality behind one gateway and a trainer, for the front doors' tests (OpenAI REST, OIP v2, the typed
    client, the console)."""
    started = start_mesh(
        tmp_path_factory.mktemp("front-door"),
        {"nlp": 1, "vision": 1, "speech": 1, "llm": 1, "trainer": 1},
        {"AIMASS_LLM__MAX_MODEL_LEN": "1024"},
        metrics=True,
    )
    yield started
    started.stop()


@pytest.fixture(scope="session")
def nlp_engine() -> NlpEngine:
    """The real NLP models, loaded once for every in-process server a test builds."""
    engine = NlpEngine(device="cpu")
    engine.load()
    return engine
