"""The OpenAI-compatible REST front door's core, against a mesh started by `aimass up` (front_door_mesh): the model
list, and every refusal as the `openai` SDK raises it (status, OpenAI's error shape, the parameter named), with the
gateway's keys, scopes and quotas; body limits; the README's curl example."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from openai.types.chat import ChatCompletionMessageParam

from aimass.datasets.samples import tickets_csv
from aimass.local_mesh import LocalMesh, free_port
from aimass.runtime.config import GatewayConfig, MeshTlsConfig, RestConfig
from aimass.tenancy import keys
from aimass.v1 import common_pb2, datasets_pb2, deployments_pb2, deployments_pb2_grpc
from gateway.app import build_runner as gateway_runner
from gateway.rest.app import create_app
from services.nlp.engine import NlpEngine
from tests import test_tracing
from tests.fake_otlp import FakeCollector, ReceivedSpan, trace_of
from tests.inprocess_mesh import in_process_mesh
from tests.security import admin_key, key_for, self_signed_certificate
from tests.test_lifecycle_e2e import TRAIN_SCOPES, train, upload

MODEL = "smollm2-135m-instruct"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]
README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def client(front_door_mesh: LocalMesh) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=front_door_mesh.rest_url, api_key=front_door_mesh.api_key, max_retries=0) as sdk:
        yield sdk


def sdk(mesh: LocalMesh, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.rest_url, api_key=key, max_retries=0, timeout=60)


def error_body(err: openai.APIStatusError) -> dict[str, object]:
    body = err.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error: dict[str, object] = body["error"]
    return error


def test_models_lists_every_model_the_caller_may_call(client: openai.OpenAI) -> None:
    listed = {model.id: model for model in client.models.list()}
    # Every modality of the mesh: the LLM, text, vision and speech models.
    assert MODEL in listed and len(listed) >= 4
    llm = listed[MODEL]
    assert llm.object == "model" and llm.owned_by == "aimass"
    assert llm.model_extra is not None and llm.model_extra["modality"] == "llm"
    assert llm.model_extra["context_length"] == 1024  # front_door_mesh's max_model_len
    modalities = {m.model_extra["modality"] for m in listed.values() if m.model_extra}
    assert {"llm", "text", "vision", "speech"} <= modalities
    assert client.models.retrieve(MODEL).id == MODEL


def test_an_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert error_body(missing.value)["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as chat:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert "no-such-model" in chat.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HELLO, stream=True)


def test_a_bad_or_missing_key_is_an_authentication_error(front_door_mesh: LocalMesh) -> None:
    with pytest.raises(openai.AuthenticationError) as bad:
        sdk(front_door_mesh, "aimass-not-a-real-key").chat.completions.create(model=MODEL, messages=HELLO)
    assert error_body(bad.value)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        sdk(front_door_mesh, "aimass-not-a-real-key").models.list()
    # No key at all (the SDK always sends one; a plain HTTP client need not).
    reply = httpx.get(f"{front_door_mesh.rest_url}/models", timeout=30)
    assert reply.status_code == 401
    assert "authorization: Bearer" in reply.json()["error"]["message"]


def test_a_key_without_the_infer_scope_is_refused(front_door_mesh: LocalMesh) -> None:
    trainer_only = key_for("rest-trainer-only", scopes=(keys.SCOPE_MODELS_TRAIN,))
    with pytest.raises(openai.PermissionDeniedError) as denied:
        sdk(front_door_mesh, trainer_only).chat.completions.create(model=MODEL, messages=HELLO)
    assert error_body(denied.value)["type"] == "permission_error"
    assert "infer" in denied.value.message


def test_a_tenant_over_its_rate_gets_429_with_retry_after(front_door_mesh: LocalMesh) -> None:
    limited = sdk(front_door_mesh, key_for("rest-rate-limited", requests_per_second=1))
    other = sdk(front_door_mesh, key_for("rest-rate-free"))
    refused = None
    # The gateway reads the tenant's limit from the store within auth.refresh_s (1 s).
    deadline = time.monotonic() + 10
    while refused is None and time.monotonic() < deadline:
        try:
            limited.models.list()
        except openai.RateLimitError as err:
            refused = err
    assert refused is not None, "never refused"
    body = error_body(refused)
    assert body["code"] == "quota_exceeded" and body["type"] == "rate_limit_error"
    assert "rest-rate-limited" in refused.message
    headers = refused.response.headers
    assert 1 <= int(headers["retry-after"]) <= 2 and 0 < int(headers["retry-after-ms"]) <= 1000
    # Another tenant is served meanwhile.
    assert any(m.id == MODEL for m in other.models.list())


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_bad_parameters_are_refused_naming_them(client: openai.OpenAI, extra: dict[str, object], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=HELLO, **extra)  # type: ignore[call-overload]
    assert refused.value.param == param, error_body(refused.value)
    assert error_body(refused.value)["type"] == "invalid_request_error"


def test_missing_and_unknown_fields_are_refused(client: openai.OpenAI, front_door_mesh: LocalMesh) -> None:
    with pytest.raises(openai.BadRequestError) as no_content:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user"}])  # type: ignore[typeddict-item]
    assert no_content.value.param == "messages[0].content"
    with pytest.raises(openai.BadRequestError) as tool_role:
        client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
    assert tool_role.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model=MODEL, messages=HELLO, extra_body={"bogus_option": 1})
    assert unknown.value.param == "bogus_option" and "Unrecognized request argument" in unknown.value.message
    headers = {"authorization": f"Bearer {front_door_mesh.api_key}"}
    reply = httpx.post(
        f"{front_door_mesh.rest_url}/chat/completions", json={"model": MODEL}, headers=headers, timeout=30
    )
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "messages" and "required" in reply.json()["error"]["message"]
    broken = httpx.post(
        f"{front_door_mesh.rest_url}/chat/completions", content=b"{not json", headers=headers, timeout=30
    )
    assert broken.status_code == 400 and "JSON object" in broken.json()["error"]["message"]
    json_headers = {**headers, "content-type": "application/json"}
    broken = httpx.post(
        f"{front_door_mesh.rest_url}/chat/completions", content=b"{not json", headers=json_headers, timeout=30
    )
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]


def test_a_replica_refusal_keeps_its_message(client: openai.OpenAI) -> None:
    # Checked by the replica: more stop sequences than it takes.
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=HELLO, stop=["a", "b", "c", "d", "e"])
    assert "stop" in refused.value.message and "4" in refused.value.message


def test_an_oversize_body_is_413(client: openai.OpenAI, front_door_mesh: LocalMesh) -> None:
    huge = "word " * (2 * 1024 * 1024)  # 10 MiB of JSON, past rest.max_body_bytes (8 MiB)
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": huge}])
    assert refused.value.status_code == 413 and error_body(refused.value)["code"] == "request_too_large"
    # Sent in chunks, without a Content-Length: counted as it arrives.
    headers = {"authorization": f"Bearer {front_door_mesh.api_key}", "content-type": "application/json"}

    def chunks() -> Iterator[bytes]:
        yield json.dumps({"model": MODEL, "messages": [{"role": "user", "content": huge}]}).encode()

    reply = httpx.post(f"{front_door_mesh.rest_url}/chat/completions", content=chunks(), headers=headers, timeout=60)
    assert reply.status_code == 413


def test_unknown_paths_and_methods_answer_in_openai_shape(front_door_mesh: LocalMesh) -> None:
    missing = httpx.get(f"{front_door_mesh.rest_url}/no/such/endpoint", timeout=30)
    assert missing.status_code == 404 and "no such endpoint" in missing.json()["error"]["message"]
    wrong = httpx.delete(f"{front_door_mesh.rest_url}/chat/completions", timeout=30)
    assert wrong.status_code == 405 and set(wrong.json()["error"]) == {"message", "type", "param", "code"}
    # The schema is served; the docs pages (CDN assets) are not.
    base = front_door_mesh.rest_url.removesuffix("/v1")
    assert "/v1/chat/completions" in httpx.get(f"{base}/openapi.json", timeout=30).json()["paths"]
    assert httpx.get(f"{base}/docs", timeout=30).status_code == 404


def test_request_ids_are_echoed(client: openai.OpenAI) -> None:
    raw = client.models.with_raw_response.list(extra_headers={"x-request-id": "rest-test-1234"})
    assert raw.headers["x-request-id"] == "rest-test-1234"


def test_the_readme_curl_example(front_door_mesh: LocalMesh) -> None:
    """The README's curl command, run as written (with this mesh's port and key)."""
    text = README.read_text()
    found = re.search(r"```sh\n(curl [^`]*?/v1/chat/completions[^`]*?)```", text)
    assert found, "README has no curl example for /v1/chat/completions"
    command = found.group(1).replace("127.0.0.1:8000", front_door_mesh.rest_url.split("//")[1].removesuffix("/v1"))
    env = {"PATH": "/usr/bin:/bin", "AIMASS_API_KEY": front_door_mesh.api_key}
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=120, check=True)
    reply = json.loads(done.stdout)
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["content"]


# `aimass up` (one NLP replica, the REST front door with it) tracing every request to a fake collector: the same
# mesh tests/test_tracing.py follows a gRPC call through.
traced_mesh = test_tracing.traced_mesh


@pytest.mark.slow
def test_a_rest_request_is_a_span_parent_of_the_gateways(
    traced_mesh: tuple[LocalMesh, FakeCollector],
) -> None:
    mesh, collector = traced_mesh
    trace_id, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    reply = httpx.get(
        f"{mesh.rest_url}/models",
        headers={"authorization": f"Bearer {mesh.api_key}", "traceparent": f"00-{trace_id}-{caller_span}-01"},
        timeout=30,
    )
    assert reply.status_code == 200

    def complete(got: list[ReceivedSpan]) -> bool:
        return {s.service for s in trace_of(got, trace_id)} >= {"aimass-rest", "aimass-gateway"}

    spans = trace_of(collector.wait_for(complete, 15), trace_id)
    (rest,) = [s for s in spans if s.service == "aimass-rest"]
    assert rest.name == "GET /v1/models" and rest.kind == 2 and rest.parent_span_id == caller_span
    assert rest.attributes["http.response.status_code"] == 200
    gateway = [s for s in spans if s.service == "aimass-gateway" and s.name == "/aimass.v1.ModelService/ListModels"]
    assert len(gateway) == 1 and gateway[0].parent_span_id == rest.span_id


@pytest.mark.slow
def test_a_tenants_own_model_is_listed_for_it_and_not_found_for_others(mesh: LocalMesh, tmp_path: Path) -> None:
    """On the session mesh with a trainer: a model one tenant trained and deployed is in its /v1/models, and
    another tenant gets 404 for it, exactly as for a name that does not exist."""
    owner_key = key_for("rest-owner", TRAIN_SCOPES)
    other_key = key_for("rest-other", TRAIN_SCOPES)
    data = tickets_csv(tmp_path / "tickets.csv", rows=300, seed=3)
    with mesh.channel(owner_key) as channel:
        upload(channel, data, "rest-tickets", datasets_pb2.TRAINING_TASK_TEXT_CLASSIFICATION)
        train(channel, "rest-tickets", "rest-router")
        deployments_pb2_grpc.DeploymentServiceStub(channel).DeployModel(
            deployments_pb2.DeployModelRequest(model=common_pb2.ModelRef(name="rest-router", version="1")), timeout=60
        )
    owner = sdk(mesh, owner_key)
    listed = {model.id: model for model in owner.models.list()}
    assert "rest-router" in listed and listed["rest-router"].owned_by == "rest-owner"
    assert listed["rest-router"].model_extra is not None and listed["rest-router"].model_extra["custom"] is True
    assert owner.models.retrieve("rest-router").owned_by == "rest-owner"
    other = sdk(mesh, other_key)
    assert "rest-router" not in {model.id for model in other.models.list()}
    with pytest.raises(openai.NotFoundError) as hidden:
        other.models.retrieve("rest-router")
    with pytest.raises(openai.NotFoundError) as unknown:
        other.models.retrieve("rest-nonexistent")
    assert (
        hidden.value.message.replace("rest-router", "X").split(";")[0]
        == unknown.value.message.replace("rest-nonexistent", "X").split(";")[0]
    )


async def test_the_front_door_reaches_a_gateway_with_tls(nlp_engine: NlpEngine, tmp_path: Path) -> None:
    """A gateway whose front door has TLS (gateway.tls_cert): a REST front door with mesh TLS off (no adapter
    certificate) dials its public port with rest.gateway_ca. Both in this process, over a mesh of real servers
    (tests/inprocess_mesh.py)."""
    cert, key = self_signed_certificate(tmp_path)
    async for mesh in in_process_mesh(nlp_engine):
        port, rest_port = free_port(), free_port()
        server_config = mesh.settings.gateway.server.model_copy(update={"port": port})
        tls = mesh.settings.model_copy(
            update={"gateway": GatewayConfig(server=server_config, tls_cert=cert, tls_key=key)}
        )
        gateway = gateway_runner(tls)
        await gateway.start()
        rest = tls.model_copy(
            update={
                "rest": RestConfig(port=rest_port, gateway=f"127.0.0.1:{port}", gateway_ca=cert),
                "mesh": MeshTlsConfig(tls="off"),
            }
        )
        server = uvicorn.Server(
            uvicorn.Config(create_app(rest), host="127.0.0.1", port=rest_port, log_config=None, lifespan="on")
        )
        serving = asyncio.create_task(server.serve())
        try:
            async with openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{rest_port}/v1", api_key=admin_key(), max_retries=0
            ) as client:
                deadline = time.monotonic() + 20
                names: set[str] = set()
                while "vader" not in names:
                    assert time.monotonic() < deadline, f"the models never showed through TLS: {names}"
                    with contextlib.suppress(openai.APIConnectionError, openai.APIStatusError):
                        names = {model.id async for model in client.models.list()}
                    await asyncio.sleep(0.1)
        finally:
            server.should_exit = True
            await serving
            await gateway.drain()
