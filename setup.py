"""Build hook: generate the `aimass.v1` package from protos/ before packaging.

The generated code (messages, gRPC stubs and mypy stubs) lands in aimass/v1/, which git ignores:
it is produced by every build (wheel or editable install) and never edited by hand.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "protos"
GENERATED = ROOT / "aimass" / "v1"


def generate_protos() -> None:
    from grpc_tools import protoc  # build-time dependency (pyproject [build-system])
    import grpc_tools

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "aimass" / "v1").glob("*.proto"))
    GENERATED.mkdir(parents=True, exist_ok=True)
    well_known = str(Path(grpc_tools.__file__).parent / "_proto")
    args = [
        "grpc_tools.protoc",
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


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
