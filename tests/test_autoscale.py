"""`aimass up --autoscale` (aimass.autoscale): the policy on its own clock, then a real mesh under a load step.

The policy tests drive ``ScalePolicy.decide`` with explicit times and loads: up only after the load stayed above
the target for the window, never while a replica is still starting, down only after the load fitted in one replica
fewer (under the hysteresis band) for the idle window, within min and max.

The mesh test starts `aimass up` with autoscaling on for NLP (1..2 replicas, a low target so a modest burst is
above it), sends a burst of concurrent calls through the gateway until a second replica answers one, then a trickle
of calls (under the band) until the autoscaler has removed that replica again, and checks that every call of both
phases succeeded, that the second replica was a cold start the status shows, and that `aimass status` prints it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from aimass.autoscale import ScaleLimits, ScalePolicy, ServiceStatus, format_status, limits_for, pid_of, read_status
from aimass.local_mesh import LocalMesh
from aimass.runtime.config import AutoscaleConfig, AutoscaleServiceConfig
from benchmarks.autoscale import ENV, SCALE_DOWN_AFTER_S, load_step
from tests.conftest import BIN

# -- the policy ------------------------------------------------------------------------------------------------------


def policy(min_replicas: int = 1, max_replicas: int = 3, target: float = 4.0) -> ScalePolicy:
    return ScalePolicy(
        ScaleLimits(min_replicas, max_replicas, target),
        scale_up_after_s=2.0,
        scale_down_after_s=10.0,
        scale_down_below=0.5,
    )


def test_scales_up_only_after_the_load_stays_above_the_target() -> None:
    scale = policy()
    assert scale.decide(0.0, [9.0], starting=0) == 0
    assert scale.decide(1.0, [9.0], starting=0) == 0
    # A dip at or under the target restarts the window.
    assert scale.decide(1.5, [4.0], starting=0) == 0
    assert scale.decide(2.5, [9.0], starting=0) == 0
    assert scale.decide(4.4, [9.0], starting=0) == 0
    assert scale.decide(4.5, [9.0], starting=0) == 1


def test_waits_for_a_starting_replica_before_adding_another() -> None:
    scale = policy()
    assert scale.decide(0.0, [20.0], starting=0) == 0
    assert scale.decide(2.0, [20.0], starting=0) == 1
    # The new one loads its models: however loaded the others are, nothing more until it serves.
    assert scale.decide(3.0, [30.0], starting=1) == 0
    assert scale.decide(9.0, [30.0], starting=1) == 0
    # Serving now, and the mean over both is still above: the window starts again from here.
    assert scale.decide(10.0, [15.0, 15.0], starting=0) == 0
    assert scale.decide(12.0, [15.0, 15.0], starting=0) == 1


def test_never_beyond_max_nor_under_min() -> None:
    scale = policy(min_replicas=2, max_replicas=2)
    assert [scale.decide(t, [50.0, 50.0], starting=0) for t in (0.0, 5.0, 50.0)] == [0, 0, 0]
    assert [scale.decide(t, [0.0, 0.0], starting=0) for t in (60.0, 100.0)] == [0, 0]
    # Under the floor (a replica gone): back up at once.
    assert scale.decide(101.0, [0.0], starting=0) == 1


def test_scales_down_after_the_idle_window_below_the_band() -> None:
    scale = policy(target=4.0)
    # Three replicas with 5 in flight: fits in two at 4 each, but not under the band (0.5 x 4 x 2 = 4): no change.
    assert [scale.decide(t, [2.0, 2.0, 1.0], starting=0) for t in (0.0, 20.0, 40.0)] == [0, 0, 0]
    # 3 in flight fits under the band: after the idle window, one fewer.
    assert scale.decide(50.0, [1.0, 1.0, 1.0], starting=0) == 0
    assert scale.decide(59.0, [1.0, 1.0, 1.0], starting=0) == 0
    assert scale.decide(60.0, [1.0, 1.0, 1.0], starting=0) == -1
    # A burst inside the window restarts it.
    assert scale.decide(61.0, [0.0, 0.0], starting=0) == 0
    assert scale.decide(65.0, [3.0, 3.0], starting=0) == 0
    assert scale.decide(66.0, [0.0, 0.0], starting=0) == 0
    assert scale.decide(75.0, [0.0, 0.0], starting=0) == 0
    assert scale.decide(76.0, [0.0, 0.0], starting=0) == -1
    assert scale.decide(200.0, [0.0], starting=0) == 0


def test_limits_default_to_the_started_replicas_and_the_global_ceiling() -> None:
    config = AutoscaleConfig(
        max_replicas=4,
        target_in_flight=8,
        services={"vision": AutoscaleServiceConfig(max_replicas=2, target_in_flight=3)},
    )
    assert limits_for(config, "nlp", 2) == ScaleLimits(2, 4, 8.0)
    assert limits_for(config, "vision", 1) == ScaleLimits(1, 2, 3.0)
    # A floor above the ceiling lifts the ceiling: never fewer than asked for.
    assert limits_for(config, "speech", 6) == ScaleLimits(6, 6, 8.0)
    with pytest.raises(ValueError, match="min_replicas"):
        ScalePolicy(ScaleLimits(3, 2, 1.0), scale_up_after_s=0, scale_down_after_s=0, scale_down_below=0.5)


def test_instance_ids_name_their_process() -> None:
    assert pid_of("nlp-127.0.0.1:50061-4242") == 4242
    assert pid_of("nlp-[::1]:50061-17") == 17
    assert pid_of("no-pid-here") is None


def test_status_file_of_a_dead_process_says_nothing(tmp_path: Path) -> None:
    alive = {"pid": os.getpid(), "services": [vars(ServiceStatus("nlp", 1, 3, 4.0, replicas=2, cold_starts=1))]}
    (tmp_path / "autoscale.json").write_text(json.dumps(alive))
    found = read_status(tmp_path)
    assert found is not None and found[0].replicas == 2
    rows = format_status(found)
    assert rows[1][:4] == ("nlp", "2", "0", "1..3")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "autoscale.json").write_text(json.dumps({**alive, "pid": dead.pid}))
    assert read_status(tmp_path) is None


# -- a real mesh under a load step (the driver benchmarks/autoscale.py measures with) ------------------------------


@pytest.fixture(scope="module")
def elastic_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    log_dir = tmp_path_factory.mktemp("autoscale")
    mesh = LocalMesh(log_path=log_dir / "mesh.log", replicas={"nlp": 1}, env=ENV)
    mesh.start()
    try:
        mesh.wait_ready()
        yield mesh
    finally:
        mesh.stop()


@pytest.mark.slow
def test_a_burst_adds_a_replica_and_idle_removes_it_losing_no_request(elastic_mesh: LocalMesh) -> None:
    step = asyncio.run(load_step(elastic_mesh, clients=8))
    calls = len(step.burst) + len(step.trickle)
    assert step.to_second_s == step.to_second_s, "no second replica answered within the step's timeout"
    assert not step.lost, f"{len(step.lost)} of {calls} calls failed: {step.lost[:5]}"
    assert len({call.replica for call in step.burst}) == 2
    assert step.removed_after_s == step.removed_after_s, "the second replica was not removed when the load ended"
    assert step.removed_after_s >= SCALE_DOWN_AFTER_S, "removed before the idle window ran out"
    # The calls after the removal went to the one replica left, which also served the burst.
    assert step.trickle[-1].replica in {call.replica for call in step.burst}
    status = read_status(elastic_mesh.settings().state_dir)
    assert status is not None
    (nlp,) = status
    assert (nlp.replicas, nlp.cold_starts, nlp.min_replicas, nlp.max_replicas) == (1, 1, 1, 2)
    assert nlp.last_cold_start_s is not None and 0 < nlp.last_cold_start_s < step.to_second_s
    assert nlp.last_event.startswith("removed nlp-1")
    shown = subprocess.run(
        [str(BIN / "aimass"), "status", f"--registry={elastic_mesh.scheduler}", f"--gateway={elastic_mesh.gateway}"],
        env={**os.environ, "AIMASS_STATE_DIR": str(elastic_mesh.settings().state_dir)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "AUTOSCALE" in shown.stdout and "1..2" in shown.stdout, shown.stdout
    print(
        f"\nautoscale: second replica serving {step.to_second_s:.1f}s after the load step (cold start "
        f"{nlp.last_cold_start_s:.1f}s), removed {step.removed_after_s:.1f}s after the load ended; "
        f"{calls} calls, 0 lost"
    )
