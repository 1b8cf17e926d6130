"""deploy/kubernetes checked without a cluster.

1. Every overlay (cpu, gpu, production) is rendered by kubectl's own kustomize and every object validated offline
   against the Kubernetes OpenAPI schemas in strict mode (kubernetes-validate: an unknown field fails, as a typo
   should). The overlays use no custom resources (the HPAs read custom metrics through the Prometheus Adapter, the
   front doors are plain Ingresses), so every object gets the strict check; the two Helm values files shipped beside
   them (Prometheus Adapter, Consul) are read and their fields checked here.
2. House rules that a schema cannot see: non-root, read-only root, no capabilities, requests and limits, probes on
   every long-running container, a PDB and an HPA per Deployment that serves, GPUs only in the GPU overlays, every
   AIMASS_* env name a real config key.
3. The smoke test: the cpu overlay's scheduler, gateway, node agent, NLP replica and REST front door are started
   as local processes from their containers' command and environment exactly as rendered (ConfigMaps, Secrets made
   by make-secrets.sh, the downward API, $(VAR) expansion, volume mounts), with only ports and addresses rewritten
   onto 127.0.0.1; then their own startup/readiness/liveness probes must pass (the kubelet's gRPC probes on each
   server's plaintext health port, whose main port takes mesh mTLS only), a request must go end to end
   through the gateway, the series the HPAs scale on must be in what the processes export, and each process's
   resident memory must sit under its container's memory limit. A wrong flag, env name, probe port or Service
   address in a manifest fails here.
4. The image: built where a Docker engine answers (skipped with that reason otherwise).
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel

from aimass.client import keyed_channel
from aimass.runtime.config import Settings
from aimass.v1 import nlp_pb2, nlp_pb2_grpc
from tests.conftest import BIN, ROOT

# Untyped libraries (no stubs), used through Any as tests/test_compose.py does.
yaml: Any = importlib.import_module("yaml")
kubernetes_validate: Any = importlib.import_module("kubernetes_validate")

KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu", "production")
# The schemas of kubectl's own minor version (the client that renders the overlays here).
KUBERNETES_VERSION = "1.32.0"
PROBE_SCRIPT = ROOT / "compose" / "healthcheck.py"
IMAGE_PROBE = "/opt/aimass/healthcheck.py"
WORKLOAD_KINDS = ("Deployment", "DaemonSet")
REPLICA_KINDS = ("nlp", "vision", "speech", "llm")
# Env names the manifests set that are not aimass settings: the downward API's values, and others' variables.
NON_SETTING_ENV = {"POD_IP", "NODE_NAME", "HOST_IP", "OTEL_SERVICE_NAME", "NVIDIA_VISIBLE_DEVICES"}
NON_SETTING_ENV |= {"NVIDIA_DRIVER_CAPABILITIES"}
# What the smoke test runs: the whole path of a request (REST front door → gateway → NLP replica) and the control
# plane; vision, speech and the LLM would only add minutes of model loading on this machine.
SMOKE_WORKLOADS = ("aimass-scheduler", "aimass-gateway", "aimass-node-agent", "aimass-nlp", "aimass-rest")
SMOKE_NODE = "smoke-node"
SMOKE_TIMEOUT_S = 240.0


def kustomize(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: it renders the kustomize overlays (kubectl kustomize); install it")
    done = subprocess.run(
        [kubectl, "kustomize", str(KUBE / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: kustomize(overlay) for overlay in OVERLAYS}


def objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] in WORKLOAD_KINDS}


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    return list(workload["spec"]["template"]["spec"]["containers"])


def memory_bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity.removesuffix(suffix)) * factor)
    return int(quantity)


# -- 1. strict schema validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_of_the_overlay_validates_strictly(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = rendered[overlay]
    assert docs, f"overlays/{overlay} rendered nothing"
    problems = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: {err.message} at {list(err.path)}")
    assert not problems, "\n".join(problems)


def test_strict_validation_rejects_an_unknown_field(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The check above can fail: a misspelt field in a container (which a lax parser drops) is refused."""
    gateway = objects(rendered["cpu"], "Deployment")["aimass-gateway"]
    typo = yaml.safe_load(yaml.safe_dump(gateway))
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)


# -- 2. what a platform team checks ---------------------------------------------------------------------------------


def image_uid() -> int:
    found = re.search(r"useradd\b[^\n]*--uid (\d+)[^\n]*\baimass$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert found is not None, "the Dockerfile makes no aimass user with a fixed uid"
    return int(found[1])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down_and_sized(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    uid = image_uid()
    for name, workload in workloads(rendered[overlay]).items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        # The image's user, who owns what the image ships for it (the LLM weights) and the Secrets' files (fsGroup).
        assert pod["securityContext"]["runAsUser"] == uid == pod["securityContext"]["fsGroup"], name
        assert pod["automountServiceAccountToken"] is False, f"{name}: no process talks to the Kubernetes API"
        for container in containers(workload):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), f"{name}: requests for cpu and memory"
            assert memory_bytes(resources["limits"]["memory"]) >= memory_bytes(resources["requests"]["memory"])
            assert "livenessProbe" in container and "startupProbe" in container, f"{name}: probes"
            if workload["kind"] == "Deployment":
                assert "readinessProbe" in container, f"{name}: readiness decides the Service's endpoints"
            if workload["metadata"]["labels"]["app.kubernetes.io/component"] in ("gateway", "scheduler", "replica"):
                # The kubelet's own gRPC probes on grpc.health.v1, for every gRPC server of the mesh.
                for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert set(container[kind]) & {"grpc", "exec", "httpGet", "tcpSocket"} == {"grpc"}, (name, kind)
            # Secrets come from Secrets: no literal value that looks like one.
            for env in container.get("env", []):
                if re.search(r"TOKEN|PASSWORD|STORE__URL|KEY$", env["name"]):
                    assert "valueFrom" in env and "secretKeyRef" in env["valueFrom"], f"{name}: {env['name']}"
            # Writable paths are volumes (the root is read-only).
            mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
            assert "/tmp" in mounts and "/etc/aimass/pki" in mounts, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serving_deployments_have_a_pdb_and_an_hpa(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = rendered[overlay]
    deployments = objects(docs, "Deployment")
    pdb_selectors = [pdb["spec"]["selector"]["matchLabels"] for pdb in objects(docs, "PodDisruptionBudget").values()]
    hpas = {hpa["spec"]["scaleTargetRef"]["name"]: hpa for hpa in objects(docs, "HorizontalPodAutoscaler").values()}
    for name in ["aimass-gateway", *(f"aimass-{kind}" for kind in REPLICA_KINDS)]:
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert any(selector.items() <= labels.items() for selector in pdb_selectors), f"{name}: no PDB"
        # The HPA owns the count: a replicas field would be reset by every `kubectl apply`.
        assert "replicas" not in deployments[name]["spec"], f"{name}: replicas set beside its HPA"
        metrics = hpas[name]["spec"]["metrics"]
        assert all(metric["type"] == "Pods" for metric in metrics), f"{name}: scales on its own signal, not CPU"
        spread = deployments[name]["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {constraint["topologyKey"] for constraint in spread} >= {"kubernetes.io/hostname"}, name


def test_gpus_only_in_the_gpu_overlays(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay in OVERLAYS:
        found = workloads(rendered[overlay])
        for kind in REPLICA_KINDS:
            container = containers(found[f"aimass-{kind}"])[0]
            gpus = container["resources"]["limits"].get("nvidia.com/gpu")
            device = next(env["value"] for env in container["env"] if env["name"] == f"AIMASS_{kind.upper()}__DEVICE")
            assert (gpus, device) == ((1, "cuda") if overlay != "cpu" else (None, "cpu")), f"{overlay} {kind}"
        agent = found["aimass-node-agent"]["spec"]["template"]["spec"]
        assert agent.get("runtimeClassName") == ("nvidia" if overlay != "cpu" else None), overlay
        # The agent reads NVML; it must not take a GPU from the device plugin.
        assert "nvidia.com/gpu" not in containers(found["aimass-node-agent"])[0]["resources"]["limits"]


def test_production_runs_a_standby_scheduler_on_the_consul_lock(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["production"]
    scheduler = objects(docs, "Deployment")["aimass-scheduler"]
    assert scheduler["spec"]["replicas"] == 2
    mesh = objects(docs, "ConfigMap")["aimass-mesh"]["data"]
    assert mesh["AIMASS_REGISTRY__BACKEND"] == "consul"
    for name, workload in workloads(docs).items():
        names = {env["name"] for env in containers(workload)[0]["env"]}
        # The REST front door is a client of the gateway only: no registry, no token.
        assert ("AIMASS_REGISTRY__CONSUL__TOKEN" in names) == (name != "aimass-rest"), name
    consul = yaml.safe_load((KUBE / "overlays" / "production" / "consul-values.yaml").read_text())
    assert consul["global"]["acls"]["manageSystemACLs"] is True
    assert consul["server"]["replicas"] >= 3
    assert consul["server"]["extraVolumes"][0]["name"] == "aimass-pki-consul"
    assert '"enable_agent_tls_for_checks": true' in consul["server"]["extraConfig"]
    ingresses = objects(docs, "Ingress")
    assert {i["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] for i in ingresses.values()} == {
        "aimass-gateway",
        "aimass-rest",
    }


def setting_exists(env_key: str) -> bool:
    model: Any = Settings
    for part in env_key.removeprefix("AIMASS_").lower().split("__"):
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return False
        found = model.model_fields.get(part)
        if found is None:
            return False
        model = found.annotation
    return True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_env_name_is_one_the_code_reads(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """pydantic-settings ignores an env name it does not know, so running a process cannot catch a misspelt one."""
    docs = rendered[overlay]
    names = [(cm["metadata"]["name"], key) for cm in objects(docs, "ConfigMap").values() for key in cm["data"]]
    for name, workload in workloads(docs).items():
        names += [(name, env["name"]) for container in containers(workload) for env in container.get("env", [])]
    for where, key in names:
        assert key in NON_SETTING_ENV or (key.startswith("AIMASS_") and setting_exists(key)), (
            f"{overlay}: {where} sets {key}, which no aimass setting reads"
        )


# -- 3. the smoke test: the manifests' containers as local processes ------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalPod:
    """One workload's container run as a local process: its argv and env after rewriting, and its ports."""

    name: str
    container: dict[str, Any]
    argv: list[str]
    env: dict[str, str]
    # containerPort → the local port standing in for it
    ports: dict[int, int]
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)

    def port(self, ref: int | str) -> int:
        """The local port of a containerPort given by number or by name."""
        if isinstance(ref, str):
            ref = next(p["containerPort"] for p in self.container["ports"] if p["name"] == ref)
        return self.ports[int(ref)]


class Translation:
    """Cluster names → this machine: Service DNS names and container ports onto 127.0.0.1 and free ports, mount
    paths onto folders under the test's directory, the downward API onto this host."""

    def __init__(self, docs: list[dict[str, Any]], secrets: Mapping[str, Mapping[str, bytes]], root: Path) -> None:
        self.docs = docs
        self.secrets = secrets
        self.root = root
        self.config_maps = {name: cm["data"] for name, cm in objects(docs, "ConfigMap").items()}
        self.ports: dict[str, dict[int, int]] = {
            name: {port["containerPort"]: free_port() for c in containers(w) for port in c.get("ports", [])}
            for name, w in workloads(docs).items()
        }
        self.addresses: dict[str, str] = {}
        for service_name, service in objects(docs, "Service").items():
            selector = service["spec"]["selector"]
            target = next(
                name
                for name, w in workloads(docs).items()
                if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
            )
            namespace = service["metadata"]["namespace"]
            for port in service["spec"]["ports"]:
                local = self.container_port(target, port["targetPort"])
                for host in (service_name, f"{service_name}.{namespace}", f"{service_name}.{namespace}.svc"):
                    self.addresses[f"{host}:{port['port']}"] = f"127.0.0.1:{local}"

    def container_port(self, workload: str, ref: int | str) -> int:
        for container in containers(workloads(self.docs)[workload]):
            for port in container.get("ports", []):
                if ref in (port["containerPort"], port.get("name")):
                    return self.ports[workload][port["containerPort"]]
        raise AssertionError(f"{workload} has no container port {ref!r}")

    def rewrite(self, workload: str, value: str, mounts: Mapping[str, Path]) -> str:
        for address, local in self.addresses.items():
            value = re.sub(rf"(?<![\w.-]){re.escape(address)}(?!\d)", local, value)
        for container_port, local_port in self.ports[workload].items():
            if value == str(container_port):
                return str(local_port)
            value = re.sub(rf"^(--[\w-]+=|127\.0\.0\.1:){container_port}$", rf"\g<1>{local_port}", value)
        # The deepest mount holding the path, once (the local folders may themselves be under /tmp).
        for mount_path, local_dir in sorted(mounts.items(), key=lambda item: -len(item[0])):
            if value == mount_path or value.startswith(mount_path + "/"):
                return str(local_dir) + value.removeprefix(mount_path)
        return value

    def pod(self, workload: str) -> LocalPod:
        spec = workloads(self.docs)[workload]["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        pod_dir = self.root / workload
        mounts = self.volumes(spec, container, pod_dir)
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            env.update(self.config_maps[source["configMapRef"]["name"]])
        for item in container.get("env", []):
            value = str(item["value"]) if "value" in item else self.value_from(item["valueFrom"])
            # $(VAR) names a variable defined before it, as the kubelet expands it.
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), value)
        env = {key: self.rewrite(workload, value, mounts) for key, value in env.items()}
        argv = [
            self.rewrite(workload, re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), arg), mounts)
            for arg in [*container["command"], *container.get("args", [])]
        ]
        assert argv[0] == "python", f"{workload}: the image's python runs every process, not {argv[0]}"
        return LocalPod(workload, container, [sys.executable, *argv[1:]], env, self.ports[workload])

    def value_from(self, source: Mapping[str, Any]) -> str:
        if "fieldRef" in source:
            return {"status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1", "spec.nodeName": SMOKE_NODE}[
                source["fieldRef"]["fieldPath"]
            ]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            return self.secrets[ref["name"]][ref["key"]].decode()
        ref = source["configMapKeyRef"]
        return str(self.config_maps[ref["name"]][ref["key"]])

    def volumes(self, spec: Mapping[str, Any], container: Mapping[str, Any], pod_dir: Path) -> dict[str, Path]:
        """Each mount as a local folder: a Secret's keys written as files (mode as defaultMode), emptyDirs empty."""
        volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            local = pod_dir / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            if "secret" in volume:
                for key, data in self.secrets[volume["secret"]["secretName"]].items():
                    (local / key).write_bytes(data)
                    # Group-readable for the pod's fsGroup in a cluster; here the test's user owns the files.
                    (local / key).chmod(volume["secret"].get("defaultMode", 0o644) & 0o700)
            else:
                assert "emptyDir" in volume, f"{mount['name']}: only Secrets and emptyDirs are mounted"
            mounts[mount["mountPath"]] = local
        return mounts


def make_secrets(tmp: Path, store_url: str) -> dict[str, dict[str, bytes]]:
    """The Secrets as deploy/kubernetes/make-secrets.sh writes them (it runs here, kubectl --dry-run=client)."""
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "AIMASS_STORE_URL": store_url,
        "AIMASS_CONSUL_NAMESPACE": "consul",
    }
    env.pop("AIMASS_STATE_DIR", None)
    done = subprocess.run(
        ["sh", str(KUBE / "make-secrets.sh"), str(tmp / "operator-pki")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    secrets = {}
    for doc in yaml.safe_load_all(done.stdout):
        if doc:
            assert doc["kind"] == "Secret"
            namespace = "consul" if doc["metadata"]["name"] == "aimass-pki-consul" else "aimass"
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]
            secrets[doc["metadata"]["name"]] = {k: base64.b64decode(v) for k, v in doc["data"].items()}
    return secrets


def referenced_secrets(docs: list[dict[str, Any]]) -> set[str]:
    found = set()
    for workload in workloads(docs).values():
        spec = workload["spec"]["template"]["spec"]
        found |= {volume["secret"]["secretName"] for volume in spec.get("volumes", []) if "secret" in volume}
        for container in spec["containers"]:
            for env in container.get("env", []):
                if "secretKeyRef" in env.get("valueFrom", {}):
                    found.add(env["valueFrom"]["secretKeyRef"]["name"])
    return found


def test_make_secrets_makes_every_secret_the_overlays_use(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    made = make_secrets(tmp_path, "sqlite:///unused.db")
    for overlay in ("cpu", "gpu"):
        assert referenced_secrets(rendered[overlay]) <= set(made), overlay
    # Production adds two the operator makes (docs/deployment.md): the Consul token and the Ingresses' certificate.
    assert referenced_secrets(rendered["production"]) - set(made) == {"aimass-consul"}
    assert {
        tls["secretName"] for i in objects(rendered["production"], "Ingress").values() for tls in i["spec"]["tls"]
    } == {"aimass-tls"}
    # Each role's Secret holds its own key and no other's.
    assert set(made["aimass-pki-nlp"]) == {"ca.crt", "nlp.crt", "nlp.key"}
    assert b"PRIVATE KEY" not in made["aimass-pki-nlp"]["ca.crt"]


def process_env(pod: LocalPod) -> dict[str, str]:
    # This machine's PATH and HOME (model caches), nothing of the test's own aimass settings.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("AIMASS_", "OTEL_"))}
    return {**inherited, **pod.env}


def probe_passes(pod: LocalPod, probe: Mapping[str, Any], translation: Translation) -> str | None:
    """Runs one of the container's probes as the kubelet would, against the local process: None when it passes."""
    timeout = float(probe.get("timeoutSeconds", 1))
    if "exec" in probe:
        command = [
            str(PROBE_SCRIPT) if arg == IMAGE_PROBE else translation.rewrite(pod.name, arg, {})
            for arg in probe["exec"]["command"]
        ]
        assert command[0] == "python"
        done = subprocess.run(
            [sys.executable, *command[1:]], env=process_env(pod), capture_output=True, text=True, timeout=timeout + 10
        )
        return None if done.returncode == 0 else done.stderr.strip() or f"exit {done.returncode}"
    if "grpc" in probe:
        with grpc.insecure_channel(f"127.0.0.1:{pod.port(probe['grpc']['port'])}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")), timeout=timeout + 1
                )
            except grpc.RpcError as err:
                return f"{err.code().name} {err.details()}"
        return None if reply.status == health_pb2.HealthCheckResponse.SERVING else str(reply.status)
    if "httpGet" in probe:
        url = f"http://127.0.0.1:{pod.port(probe['httpGet']['port'])}{probe['httpGet']['path']}"
        try:
            with urllib.request.urlopen(url, timeout=timeout + 1) as reply:
                return None if 200 <= reply.status < 400 else f"HTTP {reply.status}"
        except OSError as err:
            return f"{url}: {err}"
    if "tcpSocket" in probe:
        try:
            socket.create_connection(("127.0.0.1", pod.port(probe["tcpSocket"]["port"])), timeout=timeout).close()
        except OSError as err:
            return str(err)
        return None
    raise AssertionError(f"{pod.name}: a probe of a kind the smoke test does not know: {probe}")


def resident_bytes(pid: int) -> int:
    """The process's resident memory and its children's (vLLM-style engines would count; here mostly one)."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) * 1024
    return total


@dataclass
class SmokeMesh:
    translation: Translation
    pods: dict[str, LocalPod]
    api_key: str

    def gateway(self) -> str:
        return self.translation.addresses["aimass-gateway:50051"]

    def metrics(self, workload: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.pods[workload].port('metrics')}/metrics") as reply:
            return str(reply.read().decode())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SmokeMesh]:
    tmp = tmp_path_factory.mktemp("k8s-smoke")
    store_url = f"sqlite:///{tmp / 'store.db'}"
    secrets = make_secrets(tmp, store_url)
    docs = kustomize("cpu")
    translation = Translation(docs, secrets, tmp / "pods")
    # The operator's one step against the store before the first start (docs/deployment.md): schema and admin key.
    init_env = {k: v for k, v in os.environ.items() if not k.startswith("AIMASS_")}
    init_env |= {"AIMASS_STORE__URL": store_url, "AIMASS_STATE_DIR": str(tmp / "operator")}
    done = subprocess.run([str(BIN / "aimass"), "init"], env=init_env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    api_key = (tmp / "operator" / "admin.key").read_text().strip()
    pods = {name: translation.pod(name) for name in SMOKE_WORKLOADS}
    try:
        for pod in pods.values():
            pod.log = tmp / f"{pod.name}.log"
            with pod.log.open("wb") as sink:
                pod.process = subprocess.Popen(
                    pod.argv, env=process_env(pod), cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT
                )
        yield SmokeMesh(translation, pods, api_key)
    finally:
        for pod in pods.values():
            if pod.process is not None and pod.process.poll() is None:
                pod.process.send_signal(signal.SIGTERM)
        for pod in pods.values():
            if pod.process is not None:
                grace = workloads(docs)[pod.name]["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
                try:
                    pod.process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pod.process.kill()
                    pod.process.wait()


def logs_tail(smoke: SmokeMesh) -> str:
    return "\n".join(
        f"--- {pod.name} (exit {pod.process.poll() if pod.process else None}):\n"
        + pod.log.read_text(errors="replace")[-1500:]
        for pod in smoke.pods.values()
    )


def wait_for_probes(smoke: SmokeMesh, kinds: tuple[str, ...]) -> None:
    deadline = time.monotonic() + SMOKE_TIMEOUT_S
    failing: dict[str, str] = {}
    while time.monotonic() < deadline:
        failing = {}
        for pod in smoke.pods.values():
            assert pod.process is not None and pod.process.poll() is None, f"{pod.name} exited\n{logs_tail(smoke)}"
            for kind in kinds:
                if kind in pod.container:
                    problem = probe_passes(pod, pod.container[kind], smoke.translation)
                    if problem is not None:
                        failing[f"{pod.name} {kind}"] = problem
        if not failing:
            return
        time.sleep(1.0)
    pytest.fail(f"probes still failing after {SMOKE_TIMEOUT_S:.0f}s: {failing}\n{logs_tail(smoke)}")


@pytest.mark.slow
def test_manifests_run_as_local_processes_and_serve_end_to_end(smoke: SmokeMesh) -> None:
    # Startup first (it covers model loading), then readiness and liveness, as the kubelet orders them.
    wait_for_probes(smoke, ("startupProbe",))
    wait_for_probes(smoke, ("readinessProbe", "livenessProbe"))
    with keyed_channel(smoke.gateway(), smoke.api_key) as channel:
        reply = nlp_pb2_grpc.NlpServiceStub(channel).Embed(nlp_pb2.EmbedRequest(texts=["hello kubernetes"]), timeout=60)
    assert len(reply.embeddings) == 1 and len(reply.embeddings[0].values) > 0
    # The replicas' and the scheduler's own ports take mesh mTLS only: their probes' plaintext port has the health
    # service and nothing more.
    for name in ("aimass-nlp", "aimass-scheduler"):
        pod = smoke.pods[name]
        with grpc.insecure_channel(f"127.0.0.1:{pod.port('grpc')}") as channel, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        with grpc.insecure_channel(f"127.0.0.1:{pod.port('health')}") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                nlp_pb2_grpc.NlpServiceStub(channel).Embed(nlp_pb2.EmbedRequest(texts=["no"]), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, name
    # The REST front door, through the gateway's adapter listener (mesh mTLS with the Secrets' certificates).
    rest = smoke.pods["aimass-rest"].port("http")
    request = urllib.request.Request(
        f"http://127.0.0.1:{rest}/v1/models", headers={"Authorization": f"Bearer {smoke.api_key}"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200


@pytest.mark.slow
def test_hpa_metric_names_are_exported_by_the_processes(smoke: SmokeMesh) -> None:
    wait_for_probes(smoke, ("readinessProbe",))
    with keyed_channel(smoke.gateway(), smoke.api_key) as channel:
        nlp_pb2_grpc.NlpServiceStub(channel).Embed(nlp_pb2.EmbedRequest(texts=["a signal"]), timeout=60)
    adapter = yaml.safe_load((KUBE / "autoscaling" / "prometheus-adapter-values.yaml").read_text())
    served: dict[str, str] = {}
    for rule in adapter["rules"]["custom"]:
        series = rule["seriesQuery"].split("{")[0]
        assert re.fullmatch(rule["name"]["matches"], series), rule
        served[re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)] = series
    hpas = objects(kustomize("cpu"), "HorizontalPodAutoscaler")
    exported = {name: smoke.metrics(name) for name in ("aimass-gateway", "aimass-nlp")}
    for hpa in hpas.values():
        target = hpa["spec"]["scaleTargetRef"]["name"]
        for metric in hpa["spec"]["metrics"]:
            name = metric["pods"]["metric"]["name"]
            assert name in served, f"{target}: HPA metric {name} is served by no Prometheus Adapter rule"
            if target in exported:
                assert re.search(rf"^{served[name]}[{{ ]", exported[target], re.M), (
                    f"{target} exports no {served[name]} (the series behind {name})"
                )
    # The queue-depth rule's series, from a replica with a batcher.
    assert re.search(r"^aimass_batcher_queue_depth\{", exported["aimass-nlp"], re.M)


@pytest.mark.slow
def test_resident_memory_fits_the_containers_limits(smoke: SmokeMesh) -> None:
    wait_for_probes(smoke, ("readinessProbe",))
    lines = []
    for pod in smoke.pods.values():
        assert pod.process is not None
        rss = resident_bytes(pod.process.pid)
        resources = pod.container["resources"]
        limit = memory_bytes(resources["limits"]["memory"])
        lines.append(f"{pod.name}: {rss / 2**20:.0f} MiB resident, request {resources['requests']['memory']}")
        assert rss < limit, f"{pod.name}: {rss / 2**20:.0f} MiB resident over its limit {resources['limits']['memory']}"
    print("\n".join(lines))


# -- 4. the image ---------------------------------------------------------------------------------------------------


def docker_engine() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    with contextlib.suppress(subprocess.TimeoutExpired):
        return subprocess.run([docker, "info"], capture_output=True, timeout=20).returncode == 0
    return False


@pytest.mark.slow
@pytest.mark.skipif(not docker_engine(), reason="no Docker engine answers `docker info` here")
def test_the_image_builds_and_runs_as_the_manifests_user() -> None:
    build = subprocess.run(
        ["docker", "build", "-t", "aimass:cpu", str(ROOT)], capture_output=True, text=True, timeout=3600
    )
    assert build.returncode == 0, build.stderr[-4000:]
    user = subprocess.run(
        ["docker", "run", "--rm", "--read-only", "aimass:cpu", "id", "-u"], capture_output=True, text=True, timeout=60
    )
    assert user.stdout.strip() == "10001", user.stderr
