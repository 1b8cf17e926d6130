"""The shipped scenarios: ``gateway/scenarios/shipped/*.yaml`` (package data) and the YAML files of an operator's
``scenarios.directory``, the same for every tenant.

They are parsed once, when the gateway starts; a malformed one stops the start with its file and line (an operator
should not learn of a typo from a tenant's failed run). Each file's name is its scenario's name, so a listing of the
folder is a listing of the catalogue; an operator's file may not take a shipped name.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from gateway.scenarios.format import Scenario, ScenarioError, parse


def _load(origin: str, source: str, stem: str, *, max_steps: int, max_bytes: int) -> Scenario:
    try:
        scenario = parse(source, max_steps=max_steps, max_bytes=max_bytes)
    except ScenarioError as err:
        raise ValueError(f"scenario {origin}: {err.message}") from None
    if scenario.name != stem:
        raise ValueError(f"scenario {origin}: its name is {scenario.name!r}; the file must be {scenario.name}.yaml")
    return scenario


def load_shipped(directory: Path | None = None, *, max_steps: int = 32, max_bytes: int = 65536) -> dict[str, Scenario]:
    """The shipped scenarios by name, then ``directory``'s (raises ValueError naming a malformed file)."""
    found: dict[str, Scenario] = {}
    packaged = resources.files("gateway.scenarios") / "shipped"
    for entry in sorted(packaged.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            stem = entry.name.removesuffix(".yaml")
            found[stem] = _load(entry.name, entry.read_text(), stem, max_steps=max_steps, max_bytes=max_bytes)
    if directory is not None:
        for path in sorted(directory.glob("*.yaml")):
            if path.stem in found:
                raise ValueError(f"scenario {path}: {path.stem!r} is a shipped scenario's name")
            found[path.stem] = _load(str(path), path.read_text(), path.stem, max_steps=max_steps, max_bytes=max_bytes)
    return found
