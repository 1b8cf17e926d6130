"""The REST front door's Prometheus metrics (gateway/rest/metrics.py) as an operator scraping its
``rest.metrics_port`` sees them, on the mesh `aimass up --metrics` started (tests/conftest.front_door_mesh): after real
calls with the `openai` SDK and httpx, the counters and histograms show exactly those calls, under route templates;
paths and methods callers invent stay a bounded set of series."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from aimass.local_mesh import LocalMesh
from tests.metrics import scrape, value
from tests.security import key_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

CHAT = "smollm2-135m-instruct"
EMBEDDER = "all-MiniLM-L6-v2"
MAX_BODY_BYTES = 8 << 20  # rest.max_body_bytes' default, which the mesh runs with
UNKNOWN_ROUTE = "(unknown route)"


@pytest.fixture(scope="module")
def address(front_door_mesh: LocalMesh) -> str:
    return front_door_mesh.metrics_address("rest")


@pytest.fixture(scope="module")
def client(front_door_mesh: LocalMesh) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=front_door_mesh.rest_url, api_key=front_door_mesh.api_key, max_retries=0) as sdk:
        yield sdk


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def moved(before: Samples, after: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every series of ``name`` that changed between the scrapes, by its sorted labels, with how much."""
    old = series(before, name)
    return {
        tuple(sorted(labels)): v - old.get(labels, 0.0)
        for labels, v in series(after, name).items()
        if v != old.get(labels, 0.0)
    }


def until(what: str, condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.05)


def test_each_call_is_counted_once_under_its_route_template(
    front_door_mesh: LocalMesh, client: openai.OpenAI, address: str
) -> None:
    before = scrape(address)
    # 1. a models list, 2. an embeddings call: 200s.
    assert any(model.id == EMBEDDER for model in client.models.list())
    assert len(client.embeddings.create(model=EMBEDDER, input="hello").data[0].embedding) == 384
    # 3. a streamed chat the client abandons after its first events.
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 400}
    headers = {"authorization": f"Bearer {front_door_mesh.api_key}"}
    with (
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST", f"{front_door_mesh.rest_url}/chat/completions", json={**body, "stream": True}, headers=headers
        ) as reply,
    ):
        assert reply.status_code == 200
        events = 0
        for line in reply.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break
    # 4. a bad key: 401 (the gateway's UNAUTHENTICATED).
    with (
        openai.OpenAI(base_url=front_door_mesh.rest_url, api_key="not-a-key", max_retries=0) as stranger,
        pytest.raises(openai.AuthenticationError),
    ):
        stranger.models.list()
    # 5. an unknown model: 404 (the gateway's NOT_FOUND).
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(f"no-such-model-{uuid.uuid4().hex}")
    # 6. a JSON body past rest.max_body_bytes: 413 on its Content-Length, before it is read.
    oversize = b'{"input": "' + b"x" * MAX_BODY_BYTES + b'"}'
    with httpx.Client(timeout=60) as http:
        refused = http.post(
            f"{front_door_mesh.rest_url}/embeddings",
            content=oversize,
            headers={**headers, "content-type": "application/json"},
        )
    assert refused.status_code == 413

    # The stream's end is counted when the server notices the client left.
    disconnects = value(before, "aimass_rest_stream_client_disconnects_total")
    until(
        "the abandoned stream counted",
        lambda: (
            value(scrape(address), "aimass_rest_stream_client_disconnects_total") > disconnects
            and value(scrape(address), "aimass_rest_inflight_requests") == 0
        ),
    )
    after = scrape(address)

    chat, embeddings, models, model = "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/v1/models/{model:path}"
    assert moved(before, after, "aimass_rest_requests_total") == {
        (("method", "GET"), ("route", models), ("status", "200")): 1,
        (("method", "GET"), ("route", models), ("status", "401")): 1,
        (("method", "GET"), ("route", model), ("status", "404")): 1,
        (("method", "POST"), ("route", embeddings), ("status", "200")): 1,
        (("method", "POST"), ("route", embeddings), ("status", "413")): 1,
        (("method", "POST"), ("route", chat), ("status", "200")): 1,
    }
    assert moved(before, after, "aimass_rest_request_duration_seconds_count") == {
        (("route", models),): 2,
        (("route", model),): 1,
        (("route", embeddings),): 2,
        (("route", chat),): 1,
    }
    # The abandoned stream lasted at least until its third event; a JSON answer has no first-byte time.
    assert moved(before, after, "aimass_rest_stream_time_to_first_byte_seconds_count") == {(("route", chat),): 1}
    assert moved(before, after, "aimass_rest_stream_client_disconnects_total") == {(("route", chat),): 1}
    assert moved(before, after, "aimass_rest_refused_body_bytes_total") == {(("route", embeddings),): len(oversize)}
    assert moved(before, after, "aimass_rest_upstream_errors_total") == {
        (("code", "UNAUTHENTICATED"),): 1,
        (("code", "NOT_FOUND"),): 1,
    }
    assert all(v == 0 for v in series(after, "aimass_rest_inflight_requests").values())


def test_a_chunked_body_refused_mid_read_counts_the_bytes_read(front_door_mesh: LocalMesh, address: str) -> None:
    before = scrape(address)
    chunk = b"x" * (1 << 20)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit passes while the body is read
        yield b'{"input": "'
        for _ in range(MAX_BODY_BYTES // len(chunk) + 4):
            yield chunk
        yield b'"}'

    with httpx.Client(timeout=60) as http:
        reply = http.post(
            f"{front_door_mesh.rest_url}/embeddings",
            content=chunks(),
            headers={"authorization": f"Bearer {key_for('rest-metrics')}", "content-type": "application/json"},
        )
    assert reply.status_code == 413
    after = scrape(address)
    refused = moved(before, after, "aimass_rest_refused_body_bytes_total")
    assert list(refused) == [(("route", "/v1/embeddings"),)]
    # Counted up to the chunk that passed the limit, not the whole body the client meant to send.
    assert MAX_BODY_BYTES < refused[(("route", "/v1/embeddings"),)] <= MAX_BODY_BYTES + len(chunk) + 16
    assert moved(before, after, "aimass_rest_requests_total") == {
        (("method", "POST"), ("route", "/v1/embeddings"), ("status", "413")): 1
    }


def test_invented_paths_and_methods_stay_a_bounded_set_of_series(front_door_mesh: LocalMesh, address: str) -> None:
    before = scrape(address)
    key = key_for("rest-metrics")
    base = front_door_mesh.rest_url
    with httpx.Client(timeout=30, headers={"authorization": f"Bearer {key}"}) as http:
        for index in range(100):
            assert http.get(f"{base}/models/invented-{uuid.uuid4().hex}").status_code == 404
            assert http.get(f"{base}/nowhere-{index}/{uuid.uuid4().hex}").status_code == 404
        # A method no route has, on a path one has, and one unknown to the metrics.
        assert http.request("DELETE", f"{base}/embeddings").status_code == 405
        assert http.request("PURGE", f"{base}/models").status_code == 405
    after = scrape(address)
    assert moved(before, after, "aimass_rest_requests_total") == {
        (("method", "GET"), ("route", "/v1/models/{model:path}"), ("status", "404")): 100,
        (("method", "GET"), ("route", UNKNOWN_ROUTE), ("status", "404")): 100,
        (("method", "DELETE"), ("route", "/v1/embeddings"), ("status", "405")): 1,
        (("method", "(other)"), ("route", "/v1/models"), ("status", "405")): 1,
    }
    # Series of every REST metric: none named after a path or a model a caller made up.
    routes = {dict(labels).get("route") for (name, labels) in after if name.startswith("aimass_rest_")}
    assert not {r for r in routes if r and ("invented-" in r or "nowhere-" in r)}
    # Two hundred made-up paths added a handful of series (one per route, status and bucket), not one each.
    grown = {key for key in after if key[0].startswith("aimass_rest_")} - set(before)
    assert len(grown) < 100, len(grown)
    text = httpx.get(f"http://{address}/metrics", timeout=5).text
    assert "invented-" not in text and "nowhere-" not in text
