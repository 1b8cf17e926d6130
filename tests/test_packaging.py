"""The wheel builds (generating aimass.v1 from protos/ on the way) and every module imports from it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ["aimass", "gateway", "services", "scheduler", "simulator"]
UNSHIPPED = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")


def test_wheel_builds_and_every_module_imports_from_it(tmp_path: Path) -> None:
    # Build from a copy: setuptools reuses ./build between builds, where stale modules could slip into the wheel.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*UNSHIPPED))
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("aimass-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "aimass/v1/nlp_pb2.py" in names and "aimass/v1/nlp_pb2.pyi" in names, "generated code missing"
    modules = sorted(
        name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for name in names
        if name.endswith(".py") and name.split("/")[0] in PACKAGES and not name.endswith("__main__.py")
    )
    assert "services.nlp.servicer" in modules and "aimass.v1.registry_pb2_grpc" in modules

    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    # Import everything in a fresh interpreter that sees the installed wheel first, never the source tree.
    script = (
        "import importlib, sys\n"
        f"sys.path.insert(0, {str(target)!r})\n"
        f"for name in {modules!r}:\n"
        "    module = importlib.import_module(name)\n"
        f"    assert module.__file__.startswith({str(target)!r}), (name, module.__file__)\n"
        "print(len(" + repr(modules) + "))\n"
    )
    imported = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert imported.stdout.strip() == str(len(modules))
    assert (target / "bin" / "aimass").exists(), "console script missing"
