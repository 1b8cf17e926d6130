"""The console's JSON API (gateway/console) against `aimass up` (front_door_mesh): every call goes to the gateway
with the caller's own key, so the console can do exactly what that key can through gRPC and nothing more — bad keys,
missing scopes, another tenant's data and internal services are refused as the gateway refuses them; bad input is a
clear 4xx before any call; streams relay as server-sent events and a client that goes away cancels the call; the
pages come from this process with a policy that lets them reach nothing else."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from aimass.datasets.samples import tickets_csv
from aimass.local_mesh import LocalMesh, free_port
from aimass.tenancy import keys
from tests.metrics import scrape, value
from tests.security import key_for

pytestmark = pytest.mark.slow


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def http(front_door_mesh: LocalMesh) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=front_door_mesh.console_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def admin(front_door_mesh: LocalMesh) -> dict[str, str]:
    return bearer(front_door_mesh.api_key)


@pytest.fixture(scope="module")
def viewer() -> dict[str, str]:
    """An infer-only key of another tenant."""
    return bearer(key_for("console-viewer"))


def error_of(reply: httpx.Response) -> str:
    body = reply.json()
    assert set(body["error"]) >= {"message", "type", "code"}, body
    return str(body["error"]["message"])


def test_a_unary_call_answers_the_response_as_proto_json(http: httpx.Client, admin: dict[str, str]) -> None:
    reply = http.post("/api/rpc/NlpService/Sentiment", headers=admin, json={"texts": ["I love this", "awful"]})
    assert reply.status_code == 200, reply.text
    labels = [result["label"] for result in reply.json()["results"]]
    assert labels == ["positive", "negative"]
    # The full service name works too, and WhoAmI tells who the console is signed in as.
    me = http.post("/api/rpc/aimass.v1.AdminService/WhoAmI", headers=admin, json={}).json()
    assert me["tenant_id"] == "admin" and keys.SCOPE_TENANTS_ADMIN in me["scopes"]


def test_keys_and_scopes_are_the_gateways(http: httpx.Client, viewer: dict[str, str]) -> None:
    no_key = http.post("/api/rpc/NlpService/Sentiment", json={"texts": ["hi"]})
    assert no_key.status_code == 401 and "key" in error_of(no_key)
    wrong = http.post("/api/rpc/NlpService/Sentiment", headers=bearer("aimass_xxxxxxxxxxxx_" + "y" * 43), json={})
    assert wrong.status_code == 401
    # An infer-only key may call models, not make keys or load models.
    assert http.post("/api/rpc/NlpService/Sentiment", headers=viewer, json={"texts": ["fine"]}).status_code == 200
    for method, body in (
        ("AdminService/CreateKey", {"tenant_id": "console-viewer", "scopes": ["infer"]}),
        ("ModelService/LoadModel", {"model": {"name": "vader"}}),
        ("DatasetService/ListDatasets", {}),
    ):
        refused = http.post(f"/api/rpc/{method}", headers=viewer, json=body)
        assert refused.status_code == 403, (method, refused.text)
        assert "scope" in error_of(refused)


def test_another_tenants_dataset_is_not_found(
    http: httpx.Client, admin: dict[str, str], tmp_path: Path, front_door_mesh: LocalMesh
) -> None:
    data = tickets_csv(tmp_path / "tickets.csv", rows=60, seed=3).read_bytes()
    uploaded = http.post(
        "/api/datasets/upload",
        params={"name": "console-api-tickets", "task": "TRAINING_TASK_TEXT_CLASSIFICATION"},
        headers={**admin, "content-type": "application/octet-stream"},
        content=data,
    )
    assert uploaded.status_code == 200, uploaded.text
    answer = uploaded.json()
    assert answer["dataset"]["name"] == "console-api-tickets" and int(answer["report"]["rows_kept"]) > 0
    # The header said the size: the whole file arrived, in chunks, and was checked.
    assert int(answer["version"]["size_bytes"]) == len(data)
    other = bearer(key_for("console-other", [keys.SCOPE_MODELS_TRAIN, keys.SCOPE_INFER]))
    ref = {"dataset": {"name": "console-api-tickets", "owner": "admin"}}
    mine = http.post("/api/rpc/DatasetService/DescribeDataset", headers=admin, json=ref)
    assert mine.status_code == 200, mine.text
    theirs = http.post("/api/rpc/DatasetService/DescribeDataset", headers=other, json=ref)
    assert theirs.status_code == 404, theirs.text
    listed = http.post("/api/rpc/DatasetService/ListDatasets", headers=other, json={}).json()
    assert not [d for d in listed["datasets"] if d["name"] == "console-api-tickets"]


def test_bad_requests_are_refused_before_any_call(http: httpx.Client, admin: dict[str, str]) -> None:
    unknown = http.post("/api/rpc/NlpService/Summarize", headers=admin, json={})
    assert unknown.status_code == 404 and "/api/services" in error_of(unknown)
    # The control plane's services are not the console's to call, whoever asks.
    internal = http.post("/api/rpc/SchedulerService/GetPlacement", headers=admin, json={})
    assert internal.status_code == 404
    streaming = http.post("/api/rpc/LlmService/Chat", headers=admin, json={})
    assert streaming.status_code == 400 and "/api/stream" in error_of(streaming)
    not_json = http.post("/api/rpc/NlpService/Sentiment", headers=admin, content=b"{texts:")
    assert not_json.status_code == 400 and "not JSON" in error_of(not_json)
    not_object = http.post("/api/rpc/NlpService/Sentiment", headers=admin, json=["hi"])
    assert not_object.status_code == 400 and "JSON object" in error_of(not_object)
    wrong_field = http.post("/api/rpc/NlpService/Sentiment", headers=admin, json={"text": "hi"})
    assert wrong_field.status_code == 400 and "text" in error_of(wrong_field)
    wrong_type = http.post("/api/rpc/NlpService/Sentiment", headers=admin, json={"texts": "hi"})
    assert wrong_type.status_code == 400
    # The mesh's own validation, as the gateway answers it.
    empty = http.post("/api/rpc/NlpService/Sentiment", headers=admin, json={"texts": []})
    assert empty.status_code == 400, empty.text
    huge = http.post("/api/rpc/NlpService/Sentiment", headers=admin, content=b"x" * (9 << 20))
    assert huge.status_code == 413
    bad_task = http.post(
        "/api/datasets/upload",
        params={"name": "x", "task": "TRAINING_TASK_DANCING"},
        headers={**admin, "content-type": "application/octet-stream"},
        content=b"text,label\n",
    )
    assert bad_task.status_code == 400 and "task" in error_of(bad_task)
    corrupt = http.post(
        "/api/datasets/upload",
        params={"name": "console-corrupt", "task": "TRAINING_TASK_IMAGE_CLASSIFICATION"},
        headers={**admin, "content-type": "application/octet-stream"},
        content=b"PK\x03\x04 not a zip at all",
    )
    assert corrupt.status_code == 400, corrupt.text


def events(reply: httpx.Response) -> Iterator[dict[str, object] | str]:
    for block in reply.iter_text():
        for event in block.split("\n\n"):
            for line in event.splitlines():
                if line.startswith("data: "):
                    data = line.removeprefix("data: ")
                    yield data if data == "[DONE]" else json.loads(data)


def test_a_server_stream_relays_each_message_then_done(http: httpx.Client, admin: dict[str, str]) -> None:
    body = {
        "messages": [{"role": "CHAT_ROLE_USER", "content": "What is the capital of France?"}],
        "sampling": {"max_tokens": 12, "temperature": 0},
    }
    with http.stream("POST", "/api/stream/LlmService/Chat", headers=admin, json=body) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        seen = list(events(reply))
    assert seen[-1] == "[DONE]"
    messages = [m for m in seen if isinstance(m, dict)]
    assert len(messages) > 1 and "Paris" in "".join(str(m["delta"]) for m in messages)
    # Refusals come as an HTTP status, before any event.
    refused = http.post("/api/stream/LlmService/Chat", headers=bearer("nope"), json=body)
    assert refused.status_code == 401
    unary = http.post("/api/stream/NlpService/Sentiment", headers=admin, json={})
    assert unary.status_code == 400 and "/api/rpc" in error_of(unary)


def generated_tokens(mesh: LocalMesh) -> float:
    return value(scrape(mesh.metrics_address("llm-0")), "aimass_llm_generated_tokens_total")


def test_leaving_a_stream_cancels_the_generation(
    http: httpx.Client, admin: dict[str, str], front_door_mesh: LocalMesh
) -> None:
    body = {
        "messages": [{"role": "CHAT_ROLE_USER", "content": "Write a very long story about a dragon and a knight."}],
        "sampling": {"max_tokens": 600, "temperature": 0},
    }
    before = generated_tokens(front_door_mesh)
    with http.stream("POST", "/api/stream/LlmService/Chat", headers=admin, json=body) as reply:
        assert reply.status_code == 200
        seen = 0
        for event in events(reply):
            seen += isinstance(event, dict)
            if seen == 5:
                break  # the page's stop button: the connection closes mid-stream
    # The replica stops generating soon after: far fewer tokens than the 600 asked for.
    time.sleep(3)
    generated = generated_tokens(front_door_mesh) - before
    assert 4 <= generated < 200, generated


def test_an_export_downloads_as_a_zip_and_refuses_unknown_models(http: httpx.Client, admin: dict[str, str]) -> None:
    missing = http.post("/api/export", headers=admin, json={"model": {"name": "no-such-model"}})
    assert missing.status_code == 404, missing.text


def test_pages_are_served_here_with_a_policy_that_reaches_nothing_else(http: httpx.Client) -> None:
    page = http.get("/")
    assert page.status_code == 200 and "<title>aimass console</title>" in page.text
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert page.headers["x-frame-options"] == "DENY" and page.headers["referrer-policy"] == "no-referrer"
    for asset in ("/js/app.js", "/js/api.js", "/css/console.css", "/favicon.svg"):
        assert http.get(asset).status_code == 200, asset
    # Nothing in the pages names another origin.
    static = Path(__file__).resolve().parent.parent / "gateway" / "console" / "static"
    for path in static.rglob("*"):
        if path.suffix in (".html", ".js", ".css"):
            text = path.read_text()
            assert "http://" not in text.replace("http://127.0.0.1", "") or path.suffix == ".js", path
            assert "https://" not in text, path
    info = http.get("/api/info").json()
    assert info["gateway"].startswith("127.0.0.1:") and info["rest"].endswith("/v1")
    methods = {f"{m['service']}/{m['method']}" for m in http.get("/api/services").json()["methods"]}
    assert "aimass.v1.NlpService/Sentiment" in methods and "aimass.v1.DatasetService/UploadDataset" in methods
    assert not [m for m in methods if "Scheduler" in m or "Registry" in m or "Blob" in m or "Trainer" in m]


def test_the_gateway_sees_each_browser_not_the_console(http: httpx.Client, admin: dict[str, str]) -> None:
    """A bad key sent from 127.0.0.7 through the console is refused and audited with 127.0.0.7 as its peer (the
    console passes the browser's address on over its verified adapter hop; no header a caller writes is believed)."""
    since = int(time.time() * 1000)
    with httpx.Client(base_url=str(http.base_url), transport=httpx.HTTPTransport(local_address="127.0.0.7")) as browser:
        refused = browser.post(
            "/api/rpc/NlpService/Sentiment",
            headers={**bearer("aimass_consolepeer1_" + "z" * 43), "x-forwarded-for": "10.9.9.9"},
            json={"texts": ["hi"]},
        )
    assert refused.status_code == 401
    deadline = time.monotonic() + 15
    peers: set[str] = set()
    while time.monotonic() < deadline:
        events = http.post(
            "/api/rpc/AdminService/ListAuditEvents",
            headers=admin,
            json={"tenant_id": "*", "action_prefix": "auth.refused", "since_unix_ms": since},
        ).json()["events"]
        peers = {event["peer"] for event in events}
        if "127.0.0.7" in peers:
            break
        time.sleep(0.5)
    assert "127.0.0.7" in peers, peers
    assert not [peer for peer in peers if "10.9.9.9" in peer]


def test_sigterm_lets_streams_in_flight_finish(front_door_mesh: LocalMesh, admin: dict[str, str]) -> None:
    """A console process of its own (the mesh's "console" certificate, the same adapter hop): SIGTERMed while a chat
    streams, it lets the stream finish, then exits."""
    port = free_port()
    env = {
        **os.environ,
        "AIMASS_STATE_DIR": str(front_door_mesh.state_dir),
        "AIMASS_CONSOLE__PORT": str(port),
        "AIMASS_CONSOLE__GATEWAY": f"127.0.0.1:{front_door_mesh.gateway_adapter_port}",
        # Longer than the stream takes on a busy machine (past the grace, uvicorn cuts what is left).
        "AIMASS_CONSOLE__DRAIN_GRACE_S": "90",
    }
    process = subprocess.Popen([sys.executable, "-m", "gateway.console"], env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "the console did not start"
            time.sleep(0.2)
        body = {
            "messages": [{"role": "CHAT_ROLE_USER", "content": "Count from one to twenty in words."}],
            "sampling": {"max_tokens": 24, "temperature": 0},
        }
        with httpx.stream("POST", f"{base}/api/stream/LlmService/Chat", headers=admin, json=body, timeout=120) as reply:
            assert reply.status_code == 200
            seen: list[dict[str, object] | str] = []
            for event in events(reply):
                seen.append(event)
                if len(seen) == 2:
                    process.send_signal(signal.SIGTERM)
        assert seen[-1] == "[DONE]" and len(seen) > 3, seen
        # Drained, it exits: uvicorn re-raises the SIGTERM it caught once it has shut down (the default action).
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_no_key_lands_in_a_log(front_door_mesh: LocalMesh, viewer: dict[str, str]) -> None:
    """After every call above (good keys, bad keys, streams, uploads): no key's secret in any process's log."""
    log = front_door_mesh.log_text()
    for key in (front_door_mesh.api_key, viewer["authorization"].removeprefix("Bearer ")):
        secret = key.rsplit("_", 1)[1]
        assert secret not in log
