"""Scenarios: named, declarative pipelines that compose the mesh's methods (ScenarioService, see
protos/aimass/v1/scenarios.proto and docs/scenarios.md).

- ``format``: a scenario's YAML document parsed and validated into a ``Scenario`` (every fault named with its line).
- ``runner``: runs a ``Scenario`` as a DAG: each step starts as soon as what it reads is ready.
- ``catalogue``: the shipped scenarios (``shipped/*.yaml`` and an operator's ``scenarios.directory``).
- ``servicer``: the ScenarioService, whose steps are ordinary calls of the caller's (gateway/composition.py).
"""
