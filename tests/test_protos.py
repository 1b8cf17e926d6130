"""The public contract: protos lint clean, generate importable code, and keep the request conventions."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FileDescriptor

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "protos" / "aimass" / "v1"
PROTO_NAMES = sorted(p.stem for p in PROTO_DIR.glob("*.proto"))
# Internal control-plane services (mesh processes only), the administration of tenants and keys, and datasets and
# training jobs (which name datasets and jobs, not a model to run): no model, no per-request metadata convention.
EXEMPT_FROM_META = {
    "RegistryService",
    "SchedulerService",
    "AdminService",
    "DatasetService",
    "TrainingService",
    "BlobService",
    "TrainerService",
    "ModelHostService",
}
# Composite calls (the gateway's assistant and scenarios) carry the caller's meta, but name their models per stage
# (ConverseConfig's llm, asr and tts models; a scenario's steps), not one per request.
MODELS_PER_STAGE = {"AssistantService", "ScenarioService"}


def _descriptor(name: str) -> FileDescriptor:
    descriptor: FileDescriptor = importlib.import_module(f"aimass.v1.{name}_pb2").DESCRIPTOR
    return descriptor


def test_protos_found() -> None:
    assert PROTO_NAMES, f"no .proto files under {PROTO_DIR}"


def test_buf_lint_clean() -> None:
    buf = Path(sys.executable).parent / "buf"
    result = subprocess.run([str(buf), "lint"], cwd=ROOT / "protos", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"buf lint failed ({result.returncode}):\n{result.stdout}{result.stderr}"


@pytest.mark.parametrize("name", PROTO_NAMES)
def test_generated_modules_and_stubs(name: str) -> None:
    descriptor = _descriptor(name)
    grpc_module = importlib.import_module(f"aimass.v1.{name}_pb2_grpc")
    for service in descriptor.services_by_name:
        assert hasattr(grpc_module, f"{service}Stub"), f"aimass.v1.{name}_pb2_grpc lacks {service}Stub"


@pytest.mark.parametrize("name", PROTO_NAMES)
def test_requests_carry_meta_and_model(name: str) -> None:
    for service in _descriptor(name).services_by_name.values():
        if service.name in EXEMPT_FROM_META:
            continue
        for method in service.methods:
            fields = method.input_type.fields
            got = {f.name: (f.number, f.message_type.full_name if f.message_type else "") for f in fields}
            where = f"{service.name}.{method.name} ({method.input_type.name})"
            assert got.get("meta") == (1, "aimass.v1.RequestMeta"), f"{where}: needs `RequestMeta meta = 1`"
            if service.name not in MODELS_PER_STAGE:
                assert got.get("model") == (2, "aimass.v1.ModelRef"), f"{where}: needs `ModelRef model = 2`"
