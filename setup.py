"""Build hook: generate the `aimass.v1` package from protos/ before packaging.

The generated code (messages, gRPC stubs and mypy stubs) lands in aimass/v1/, which git ignores:
it is produced by every build (wheel or editable install) and never edited by hand.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"
GENERATED = ROOT / "aimass" / "v1"
OIP_GENERATED = ROOT / "aimass" / "oip" / "v2"


def generate_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc  # build-time dependency (pyproject [build-system])

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "aimass" / "v1").glob("*.proto"))
    # The Open Inference Protocol v2, under a package of ours (protos/aimass/oip/v2 says why), beside aimass.v1.
    protos += sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "aimass" / "oip" / "v2").glob("*.proto"))
    GENERATED.mkdir(parents=True, exist_ok=True)
    OIP_GENERATED.mkdir(parents=True, exist_ok=True)
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    # The mypy plugins are console scripts of mypy-protobuf: next to this interpreter, or on PATH in a build env.
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    plugins = {}
    for name in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):
        found = shutil.which(name, path=search)
        if found is None:
            raise RuntimeError(f"{name} not found: install mypy-protobuf (a build requirement)")
        plugins[name] = found
    args = [
        "grpc_tools.protoc",
        *(f"--plugin={name}={path}" for name, path in plugins.items()),
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        f"--mypy_out={ROOT}",
        f"--mypy_grpc_out={ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + " ".join(protos))
    (GENERATED / "__init__.py").write_text('"""Generated from protos/aimass/v1 by setup.py. Do not edit."""\n')
    (GENERATED / "py.typed").write_text("")
    (OIP_GENERATED.parent / "__init__.py").write_text('"""Generated from protos/aimass/oip. Do not edit."""\n')
    (OIP_GENERATED / "__init__.py").write_text('"""Generated from protos/aimass/oip/v2 by setup.py. Do not edit."""\n')
    (OIP_GENERATED / "py.typed").write_text("")
    generate_client()  # the typed client's methods follow the protos they call


def generate_client() -> None:
    """aimass/client/generated.py: the typed client's method per public RPC (aimass/client/codegen.py says how),
    loaded by path because the aimass package is not importable in an isolated build environment."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("aimass_client_codegen", ROOT / "aimass" / "client" / "codegen.py")
    assert spec is not None and spec.loader is not None
    codegen = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = codegen  # dataclasses look their module up while the class is made
    spec.loader.exec_module(codegen)
    codegen.write(ROOT)


# Every build step (metadata, wheel, editable install) regenerates first: setuptools checks that the
# aimass.v1 package directory exists already while it prepares metadata.
generate_protos()
setup()
