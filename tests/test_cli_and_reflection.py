"""What a user sees from the command line: grpcurl through the gateway by reflection, `aimass status`, health."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aimass.cli import PROCESS_MODULES, busy_ports
from aimass.local_mesh import LocalMesh, free_port
from aimass.pki import ca_files, cert_files
from aimass.supervisor import ProcessSpec
from tests.conftest import BIN

# The public contract; SchedulerService and RegistryService (the scheduler's) are internal to the mesh, so the
# gateway neither forwards nor lists them.
SERVICES = [
    "aimass.v1.AdminService",
    "aimass.v1.AssistantService",
    "aimass.v1.ClusterService",
    "aimass.v1.DatasetService",
    "aimass.v1.DeploymentService",
    "aimass.v1.LlmService",
    "aimass.v1.ModelService",
    "aimass.v1.NlpService",
    "aimass.v1.ScenarioService",
    "aimass.v1.SpeechService",
    "aimass.v1.TrainingService",
    "aimass.v1.VisionService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    # The Open Inference Protocol v2 (gateway/oip), under its wire name.
    "inference.GRPCInferenceService",
]


def grpcurl(*args: str, tls: Sequence[str] = ("-plaintext",)) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "grpcurl"), *tls, *args], capture_output=True, text=True, timeout=60)


def with_key(mesh: LocalMesh) -> tuple[str, str]:
    """grpcurl's flag for the header every call to the gateway carries (the session's admin key)."""
    return ("-H", f"authorization: Bearer {mesh.api_key}")


def as_gateway(mesh: LocalMesh) -> tuple[str, ...]:
    """grpcurl's flags to call inside the mesh as a gateway does: the mesh's CA and a gateway certificate (local
    processes' certificates name 127.0.0.1 too, so the address is the name grpcurl checks)."""
    pki_dir = mesh.settings().pki_dir
    gateway = cert_files(pki_dir, "gateway")
    return ("-cacert", str(ca_files(pki_dir).cert), "-cert", str(gateway.cert), "-key", str(gateway.key))


def test_grpcurl_lists_every_service_through_the_gateway(mesh: LocalMesh) -> None:
    listed = grpcurl(mesh.gateway, "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == SERVICES


def test_grpcurl_describes_and_calls_without_proto_files(mesh: LocalMesh) -> None:
    described = grpcurl(mesh.gateway, "describe", "aimass.v1.NlpService")
    assert described.returncode == 0, described.stderr
    assert "rpc Embed ( .aimass.v1.EmbedRequest ) returns ( .aimass.v1.EmbedResponse )" in described.stdout
    # Inference is marked side-effect free in the protos (the gateway may hedge it), and reflection shows it.
    assert "option idempotency_level = NO_SIDE_EFFECTS;" in described.stdout
    called = grpcurl(
        *with_key(mesh), "-d", '{"texts": ["I love this"]}', mesh.gateway, "aimass.v1.NlpService/Sentiment"
    )
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["results"][0]["label"] == "positive"


def test_grpcurl_describes_and_calls_the_open_inference_protocol(mesh: LocalMesh) -> None:
    described = grpcurl(mesh.gateway, "describe", "inference.GRPCInferenceService")
    assert described.returncode == 0, described.stderr
    assert "rpc ModelInfer ( .inference.ModelInferRequest ) returns ( .inference.ModelInferResponse );" in (
        described.stdout
    )
    # Typed contents in JSON (bytes as base64).
    text = {"name": "TEXT", "datatype": "BYTES", "shape": [1], "contents": {"bytes_contents": ["SSBsb3ZlIHRoaXM="]}}
    request = {"model_name": "vader", "inputs": [text]}  # "I love this"
    called = grpcurl(
        *with_key(mesh), "-d", json.dumps(request), mesh.gateway, "inference.GRPCInferenceService/ModelInfer"
    )
    assert called.returncode == 0, called.stderr
    answer = json.loads(called.stdout)
    assert answer["outputs"][0]["name"] == "LABEL"
    raw = answer.get("raw_output_contents") or answer["rawOutputContents"]  # grpcurl's JSON names vary by version
    assert base64.b64decode(raw[0])[4:] == b"positive"  # a 4-byte length, then the label


def test_grpcurl_reaches_a_replica_directly_too(mesh: LocalMesh) -> None:
    # Inside the mesh only with a certificate from its CA: plaintext does not get through the handshake.
    refused = grpcurl(mesh.nlp_addresses[0], "list")
    assert refused.returncode != 0
    listed = grpcurl(mesh.nlp_addresses[0], "list", tls=as_gateway(mesh))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == [
        "aimass.v1.ModelService",  # its own models (the gateway's answers for the whole mesh)
        "aimass.v1.NlpService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ]


def test_gateway_health_per_service(mesh: LocalMesh) -> None:
    with grpc.insecure_channel(mesh.gateway) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        overall = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        nlp = health.Check(health_pb2.HealthCheckRequest(service="aimass.v1.NlpService"), timeout=5)
        vision = health.Check(health_pb2.HealthCheckRequest(service="aimass.v1.VisionService"), timeout=5)
        models = health.Check(health_pb2.HealthCheckRequest(service="aimass.v1.ModelService"), timeout=5)
    assert overall.status == health_pb2.HealthCheckResponse.SERVING
    assert nlp.status == health_pb2.HealthCheckResponse.SERVING
    assert vision.status == health_pb2.HealthCheckResponse.SERVING
    assert models.status == health_pb2.HealthCheckResponse.SERVING  # the gateway serves the mesh's catalogue


def test_aimass_status_lists_replicas_models_and_health(mesh: LocalMesh) -> None:
    # The registry is the scheduler's; `aimass status` reads it with the operator certificate of the state directory.
    shown = subprocess.run(
        [str(BIN / "aimass"), "status", "--registry", mesh.scheduler, "--gateway", mesh.gateway],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["KIND", "ADDRESS", "STATE", "PID", "SERVICES", "MODELS"]
    nlp_row = next(line for line in lines if line.startswith("nlp "))
    assert mesh.nlp_addresses[0] in nlp_row and "SERVING" in nlp_row
    assert "all-MiniLM-L6-v2,vader,en_core_web_sm" in nlp_row
    assert "aimass.v1.NlpService  SERVING" in shown.stdout
    vision_row = next(line for line in lines if line.startswith("vision "))
    assert "SERVING" in vision_row and "VisionService" in vision_row
    assert "aimass.v1.VisionService  SERVING" in shown.stdout


def test_aimass_status_explains_an_unreachable_registry() -> None:
    registry = f"127.0.0.1:{free_port()}"
    shown = subprocess.run(
        [str(BIN / "aimass"), "status", "--registry", registry, "--gateway", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 1
    assert f"cannot reach the registry at {registry}: UNAVAILABLE" in shown.stderr


def test_up_printed_where_everything_listens(mesh: LocalMesh) -> None:
    log = mesh.log_text()
    assert f"aimass is up. Gateway (the one front door): {mesh.gateway}" in log
    assert f"OpenAI-compatible REST (same API keys): {mesh.rest_url}" in log
    assert f"Web console (sign in with an API key): {mesh.console_url}" in log
    assert f"readable only by you): {mesh.settings().admin_key_file}" in log  # where the admin key is
    assert "loading model 1/3: all-MiniLM-L6-v2" in log  # progress while models load
    # Requests are access-logged; the reports every process sends the scheduler each second are only metered (an
    # idle mesh would otherwise print several lines a second).
    assert "aimass.access: /aimass.v1." in log
    assert "SchedulerService/ReportLoad" not in log and "SchedulerService/ReportNode" not in log


def test_up_refuses_ports_already_in_use() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        # Free ports for everything else (whatever else runs on this machine may hold the defaults).
        others = [f"--{kind}-port={free_port()}" for kind in PROCESS_MODULES]
        others += [f"--scheduler-port={free_port()}", f"--rest-port={free_port()}", "--metrics-port=0"]
        started = subprocess.run(
            [str(BIN / "aimass"), "up", f"--gateway-port={port}", *others],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert started.returncode == 1
    assert f"cannot start: gateway port {port} already in use" in started.stderr


def test_a_port_a_stopped_mesh_left_in_time_wait_is_free_again() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC servers listen
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
    accepted.close()  # the server's end closes first, so it waits in TIME_WAIT on the port, as after `aimass up`
    client.close()
    gateway = ProcessSpec("gateway", "gateway", {"AIMASS_GATEWAY__SERVER__PORT": str(port)})
    assert busy_ports([gateway]) == []
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert busy_ports([gateway]) == [f"gateway port {port}"]


def test_the_schedulers_contract_is_not_served_through_the_gateway(mesh: LocalMesh) -> None:
    # Not even to the admin key: the scheduler and its registry serve mesh certificates only.
    for method in ("aimass.v1.SchedulerService/GetPlacement", "aimass.v1.RegistryService/ListInstances"):
        called = grpcurl(*with_key(mesh), "-d", "{}", mesh.gateway, method)
        assert called.returncode != 0
        assert "internal to the mesh" in called.stderr or "does not expose" in called.stderr, called.stderr
