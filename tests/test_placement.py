"""Placement decisions (scheduler/placement.py): packing, best fit, targets, memory accounting, LRU eviction."""

from __future__ import annotations

import pytest

from aimass.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from aimass.v1 import common_pb2, models_pb2, scheduler_pb2
from scheduler.placement import Device, FootprintBook, PlacementTable

GIB = 1 << 30
GPU = common_pb2.DEVICE_KIND_GPU
CPU = common_pb2.DEVICE_KIND_CPU
LOADED = scheduler_pb2.PLACEMENT_STATE_LOADED


def ref(name: str, version: str = "1") -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=name, version=version)


def gpu(node: str, index: int, total: float, used: float = 0, instances: tuple[str, ...] = ("r1",)) -> Device:
    return Device(
        device_id=f"{node}/gpu:{index}",
        node_id=node,
        kind=GPU,
        total_bytes=int(total * GIB),
        used_bytes=int(used * GIB),
        instance_ids=instances,
        index=index,
    )


def cpu(node: str, total: float, used: float = 0, instances: tuple[str, ...] = ("r1",)) -> Device:
    return Device(
        device_id=f"{node}/cpu",
        node_id=node,
        kind=CPU,
        total_bytes=int(total * GIB),
        used_bytes=int(used * GIB),
        instance_ids=instances,
    )


def idle(model: common_pb2.ModelRef, device_id: str) -> bool:
    return False


def place(
    table: PlacementTable,
    name: str,
    gib: float,
    devices: list[Device],
    *,
    now: int = 1,
    target: models_pb2.PlacementTarget | None = None,
    allow_eviction: bool = False,
    busy: frozenset[str] = frozenset(),
) -> scheduler_pb2.Placement:
    result = table.place(
        ref(name),
        int(gib * GIB),
        devices,
        target=target,
        allow_eviction=allow_eviction,
        is_busy=lambda m, d: m.name in busy,
        now_ms=now,
    )
    assert not result.already_placed
    return result.placement


def names_on(table: PlacementTable, device_id: str) -> list[str]:
    return [p.model.name for p in table.placements() if p.device_id == device_id]


# --------------------------------------------------------------------------------------------------- packing


def test_several_models_pack_onto_one_gpu_until_it_is_full() -> None:
    table = PlacementTable()
    devices = [gpu("a", 0, 16)]
    for name in ("m1", "m2", "m3", "m4"):
        placement = place(table, name, 4, devices)
        assert placement.device_id == "a/gpu:0"
        assert placement.instance_id == "r1"
        assert placement.bytes == 4 * GIB
        assert placement.state == scheduler_pb2.PLACEMENT_STATE_PENDING
    assert names_on(table, "a/gpu:0") == ["m1", "m2", "m3", "m4"]
    with pytest.raises(ResourceExhausted):
        place(table, "m5", 1, devices)


def test_best_fit_picks_the_device_left_tightest() -> None:
    table = PlacementTable()
    devices = [gpu("a", 0, 24), gpu("a", 1, 16, used=6), gpu("b", 0, 16, used=9), gpu("b", 1, 8, used=1)]
    # Free: 24, 10, 7, 7. An 8 GiB model fits a/gpu:0 and a/gpu:1; a/gpu:1 leaves the least.
    assert place(table, "big", 8, devices).device_id == "a/gpu:1"
    # Free now: 24, 2, 7, 7. A tie between b/gpu:0 and b/gpu:1 goes to the lowest device id.
    assert place(table, "mid", 5, devices).device_id == "b/gpu:0"
    assert place(table, "small", 2, devices).device_id == "a/gpu:1"


def test_heterogeneous_devices_cpu_and_gpu() -> None:
    table = PlacementTable()
    devices = [cpu("a", 64, used=8), gpu("a", 0, 16)]
    # The GPU leaves less free memory (8 GiB against 48), so best fit takes it.
    assert place(table, "m1", 8, devices).device_id == "a/gpu:0"
    # Too big for what the GPU has left: the CPU still takes it.
    assert place(table, "m2", 12, devices).device_id == "a/cpu"


def test_footprints_differ_per_device_kind() -> None:
    book = FootprintBook()
    book.record(ref("whisper"), GPU, 3 * GIB)
    book.record(ref("whisper"), CPU, 2 * GIB)
    table = PlacementTable(book)
    devices = [gpu("a", 0, 16, used=12.5), cpu("a", 4)]
    # The GPU has 3.5 GiB free for its 3 GiB footprint (0.5 left); the CPU has 4 for 2 (2 left).
    result = table.place(ref("whisper"), 0, devices, allow_eviction=False, is_busy=idle, now_ms=1)
    assert result.placement.device_id == "a/gpu:0"
    assert result.placement.bytes == 3 * GIB


# ----------------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize(
    ("target", "expected_device", "expected_instance"),
    [
        (models_pb2.PlacementTarget(node_id="b"), "b/gpu:1", "rb"),
        (models_pb2.PlacementTarget(device_kind=CPU), "a/cpu", "ra"),
        (models_pb2.PlacementTarget(node_id="b", device_kind=GPU, device_index=0), "b/gpu:0", "rb"),
        (models_pb2.PlacementTarget(instance_id="rb2"), "b/gpu:1", "rb2"),
        (models_pb2.PlacementTarget(node_id="a", device_kind=GPU), "a/gpu:0", "ra"),
    ],
)
def test_target_restricts_the_choice(
    target: models_pb2.PlacementTarget, expected_device: str, expected_instance: str
) -> None:
    devices = [
        cpu("a", 64, instances=("ra",)),
        gpu("a", 0, 24, instances=("ra",)),
        gpu("b", 0, 40, instances=("rb",)),
        gpu("b", 1, 16, instances=("rb", "rb2")),
    ]
    placement = place(PlacementTable(), "m", 4, devices, target=target)
    assert (placement.device_id, placement.instance_id) == (expected_device, expected_instance)


def test_a_target_nothing_matches_is_a_failed_precondition_naming_it() -> None:
    devices = [gpu("a", 0, 24), cpu("b", 64, instances=())]
    with pytest.raises(FailedPrecondition, match=r"node b, kind GPU") as err:
        place(PlacementTable(), "m", 1, devices, target=models_pb2.PlacementTarget(node_id="b", device_kind=GPU))
    assert "a/gpu:0" in err.value.message
    # A device with no replica that can host the model is no candidate either.
    with pytest.raises(FailedPrecondition):
        place(PlacementTable(), "m", 1, devices, target=models_pb2.PlacementTarget(node_id="b"))


def test_device_index_needs_node_and_gpu_kind() -> None:
    with pytest.raises(InvalidArgument, match="device_index"):
        place(PlacementTable(), "m", 1, [gpu("a", 0, 24)], target=models_pb2.PlacementTarget(device_index=0))


def test_name_and_version_are_required() -> None:
    table = PlacementTable()
    for model in (ref("m", ""), ref("", "1")):
        with pytest.raises(InvalidArgument, match="name and version"):
            table.place(model, GIB, [gpu("a", 0, 24)], allow_eviction=False, is_busy=idle, now_ms=1)


# ------------------------------------------------------------------------------------------- idempotence


def test_placing_again_where_it_already_is_changes_nothing_but_last_used() -> None:
    table = PlacementTable()
    devices = [gpu("a", 0, 24), gpu("b", 0, 24)]
    first = place(table, "m", 4, devices, now=100)
    again = table.place(ref("m"), 4 * GIB, devices, allow_eviction=False, is_busy=idle, now_ms=200)
    assert again.already_placed
    assert again.evicted == []
    assert again.placement.device_id == first.device_id
    assert again.placement.placed_unix_ms == 100
    assert again.placement.last_used_unix_ms == 200
    assert len(table.placements()) == 1
    # A target elsewhere is one more device, not the same placement.
    other = "b" if first.node_id == "a" else "a"
    elsewhere = place(table, "m", 4, devices, target=models_pb2.PlacementTarget(node_id=other))
    assert elsewhere.node_id == other
    assert len(table.placements()) == 2


# ------------------------------------------------------------------------------------ memory accounting


def test_a_reading_that_already_shows_our_loaded_model_is_not_counted_twice() -> None:
    table = PlacementTable()
    place(table, "a", 8, [gpu("n", 0, 16)])
    table.mark(ref("a"), "n/gpu:0", LOADED)
    # The next reading shows model a's 8 GiB: 8 GiB are free, not 0.
    assert place(table, "b", 8, [gpu("n", 0, 16, used=8)]).device_id == "n/gpu:0"


def test_a_fresh_placement_is_reserved_on_top_of_the_reading() -> None:
    table = PlacementTable()
    place(table, "a", 8, [gpu("n", 0, 16, used=2)])
    # a is PENDING: the 2 GiB in the reading are someone else's, so only 16 - 2 - 8 = 6 GiB are free.
    devices = [gpu("n", 0, 16, used=2)]
    with pytest.raises(ResourceExhausted) as err:
        place(table, "b", 7, devices)
    assert err.value.metadata["largest_free_bytes"] == str(6 * GIB)
    assert place(table, "b", 6, devices).device_id == "n/gpu:0"


def test_our_loaded_models_are_a_floor_under_a_stale_reading() -> None:
    table = PlacementTable()
    place(table, "a", 10, [gpu("n", 0, 16)])
    table.mark(ref("a"), "n/gpu:0", LOADED)
    # The reading was taken before a showed up; a's 10 GiB still count.
    with pytest.raises(ResourceExhausted):
        place(table, "b", 7, [gpu("n", 0, 16, used=1)])


# ------------------------------------------------------------------------------------------------ eviction


def _three_idle_models(table: PlacementTable) -> list[Device]:
    devices = [gpu("n", 0, 16)]
    for now, name in enumerate(("a", "b", "c"), start=1):
        place(table, name, 5, devices, now=now)
    # a was used last, so b is now the least recently used, then c.
    assert table.touch(ref("a"), "n/gpu:0", 10)
    return devices


def test_eviction_takes_the_least_recently_used_idle_model_first() -> None:
    table = PlacementTable()
    devices = _three_idle_models(table)
    result = table.place(ref("d"), 6 * GIB, devices, allow_eviction=True, is_busy=idle, now_ms=20)
    assert [p.model.name for p in result.evicted] == ["b"]
    assert result.placement.device_id == "n/gpu:0"
    assert names_on(table, "n/gpu:0") == ["a", "c", "d"]


def test_eviction_goes_on_in_lru_order_until_it_fits() -> None:
    table = PlacementTable()
    devices = _three_idle_models(table)
    result = table.place(ref("d"), 11 * GIB, devices, allow_eviction=True, is_busy=idle, now_ms=20)
    assert [p.model.name for p in result.evicted] == ["b", "c"]
    assert names_on(table, "n/gpu:0") == ["a", "d"]


def test_busy_models_are_never_evicted() -> None:
    table = PlacementTable()
    devices = _three_idle_models(table)
    placement = place(table, "d", 6, devices, now=20, allow_eviction=True, busy=frozenset({"b"}))
    assert placement.device_id == "n/gpu:0"
    assert names_on(table, "n/gpu:0") == ["a", "b", "d"]
    with pytest.raises(ResourceExhausted, match="after evicting idle models"):
        place(table, "e", 6, devices, now=30, allow_eviction=True, busy=frozenset({"a", "b", "d"}))
    assert names_on(table, "n/gpu:0") == ["a", "b", "d"]


def test_no_eviction_unless_allowed() -> None:
    table = PlacementTable()
    devices = _three_idle_models(table)
    with pytest.raises(ResourceExhausted, match="eviction of idle models was not allowed"):
        place(table, "d", 6, devices, now=20)
    assert names_on(table, "n/gpu:0") == ["a", "b", "c"]


def test_eviction_chooses_the_device_needing_the_least_eviction() -> None:
    table = PlacementTable()
    devices = [gpu("n", 0, 11), gpu("n", 1, 40)]
    gpu0 = models_pb2.PlacementTarget(node_id="n", device_kind=GPU, device_index=0)
    gpu1 = models_pb2.PlacementTarget(node_id="n", device_kind=GPU, device_index=1)
    # gpu:0 holds one old 8 GiB model (3 free); gpu:1 a newer 4 GiB and a 28 GiB model (8 free).
    place(table, "old-big", 8, devices, now=1, target=gpu0)
    place(table, "small", 4, devices, now=2, target=gpu1)
    place(table, "medium", 28, devices, now=3, target=gpu1)
    result = table.place(ref("new"), 9 * GIB, devices, allow_eviction=True, is_busy=idle, now_ms=10)
    # Evicting 4 GiB on gpu:1 beats evicting 8 GiB on gpu:0, though old-big is the oldest model in the mesh and
    # gpu:0 would be the tighter fit afterwards (2 GiB left against 3).
    assert result.placement.device_id == "n/gpu:1"
    assert [p.model.name for p in result.evicted] == ["small"]
    assert names_on(table, "n/gpu:0") == ["old-big"]


# ------------------------------------------------------------------------------------------------- refusal


def test_refusal_explains_and_carries_the_exact_metadata() -> None:
    table = PlacementTable()
    devices = [gpu("node-a", 0, 16, used=12), gpu("node-a", 1, 24, used=14.5), cpu("node-a", 64, instances=())]
    with pytest.raises(ResourceExhausted) as err:
        table.place(ref("llama-7b"), 14 * GIB, devices, allow_eviction=False, is_busy=idle, now_ms=1)
    assert err.value.reason == "INSUFFICIENT_MEMORY"
    assert err.value.message == (
        "model llama-7b@1 needs 14.0 GiB; the most free on any allowed device is 9.5 GiB (node-a/gpu:1); "
        "eviction of idle models was not allowed"
    )
    assert {k: err.value.metadata[k] for k in ("required_bytes", "largest_free_bytes", "device_id")} == {
        "required_bytes": str(14 * GIB),
        "largest_free_bytes": str(int(9.5 * GIB)),
        "device_id": "node-a/gpu:1",
    }


def test_refusal_with_eviction_counts_only_idle_memory() -> None:
    table = PlacementTable()
    devices = [gpu("node-a", 0, 16), gpu("node-a", 1, 16)]
    gpu0 = models_pb2.PlacementTarget(node_id="node-a", device_kind=GPU, device_index=0)
    gpu1 = models_pb2.PlacementTarget(node_id="node-a", device_kind=GPU, device_index=1)
    place(table, "idle-model", 8, devices, target=gpu0)
    place(table, "busy-model", 6, devices, target=gpu0)
    place(table, "busy-big", 10, devices, target=gpu1)
    # gpu:0 offers 2 free + 8 idle = 10 GiB; gpu:1 only its 6 free.
    with pytest.raises(ResourceExhausted) as err:
        place(table, "llama-7b", 14, devices, allow_eviction=True, busy=frozenset({"busy-model", "busy-big"}))
    assert err.value.message == (
        "model llama-7b@1 needs 14.0 GiB; the most free on any allowed device is 10.0 GiB (node-a/gpu:0), "
        "after evicting idle models"
    )
    assert err.value.metadata["largest_free_bytes"] == str(10 * GIB)
    assert err.value.metadata["device_id"] == "node-a/gpu:0"
    # Nothing was evicted by the refused attempt.
    assert len(table.placements()) == 3


# ---------------------------------------------------------------------------------------------- footprints


def test_required_bytes_zero_uses_the_footprint_and_a_measurement_wins() -> None:
    table = PlacementTable()
    devices = [gpu("a", 0, 24), gpu("b", 0, 24)]
    with pytest.raises(InvalidArgument, match="no footprint is known for m@1 on GPU"):
        table.place(ref("m"), 0, devices, allow_eviction=False, is_busy=idle, now_ms=1)

    table.footprints.record(ref("m"), GPU, 4 * GIB, measured=False)
    result = table.place(ref("m"), 0, devices, allow_eviction=False, is_busy=idle, now_ms=1)
    assert result.placement.bytes == 4 * GIB

    marked = table.mark(ref("m"), result.placement.device_id, LOADED, 3 * GIB)
    assert [p.bytes for p in marked] == [3 * GIB]
    assert table.footprints.get(ref("m"), GPU) == 3 * GIB
    assert table.footprints.is_measured(ref("m"), GPU)
    # A later estimate does not replace the measurement.
    table.footprints.record(ref("m"), GPU, 5 * GIB, measured=False)
    assert table.footprints.get(ref("m"), GPU) == 3 * GIB
    assert table.footprints.get(ref("m"), CPU) is None

    other = "b" if result.placement.node_id == "a" else "a"
    second = table.place(
        ref("m"),
        0,
        devices,
        target=models_pb2.PlacementTarget(node_id=other),
        allow_eviction=False,
        is_busy=idle,
        now_ms=2,
    )
    assert second.placement.bytes == 3 * GIB


def test_devices_of_a_kind_without_a_footprint_are_skipped() -> None:
    table = PlacementTable()
    table.footprints.record(ref("m"), CPU, 2 * GIB)
    result = table.place(ref("m"), 0, [gpu("a", 0, 24), cpu("a", 64)], allow_eviction=False, is_busy=idle, now_ms=1)
    assert result.placement.device_id == "a/cpu"


def test_mark_moves_the_state_on_and_an_unknown_placement_is_not_found() -> None:
    table = PlacementTable()
    place(table, "m", 1, [gpu("a", 0, 24)])
    for state in (scheduler_pb2.PLACEMENT_STATE_LOADING, LOADED):
        table.mark(ref("m"), "a/gpu:0", state)
        assert [p.state for p in table.placements()] == [state]
    with pytest.raises(NotFound):
        table.mark(ref("m"), "a/gpu:1", LOADED)
    with pytest.raises(NotFound):
        table.mark(ref("m", "2"), "a/gpu:0", LOADED)


# ------------------------------------------------------------------------------------------- budget (LLM)


def test_llm_engines_stay_inside_their_memory_budget() -> None:
    table = PlacementTable()
    devices = [gpu("a", 0, 80)]
    llm = models_pb2.MODALITY_LLM

    def place_llm(name: str, gib: int, *, allow_eviction: bool = False) -> list[str]:
        result = table.place(
            ref(name),
            gib * GIB,
            devices,
            allow_eviction=allow_eviction,
            is_busy=idle,
            now_ms=5,
            budget_bytes=40 * GIB,
            modality=llm,
        )
        return [p.model.name for p in result.evicted]

    assert place_llm("llm-a", 30) == []
    # Other models are outside the LLM budget: 20 GiB of the remaining 50 is fine.
    place(table, "embedder", 20, devices, now=1)
    # 30 + 20 > 40: memory is free, the budget is not.
    with pytest.raises(ResourceExhausted, match=r"within the per-device budget of 40\.0 GiB") as err:
        place_llm("llm-b", 20)
    assert err.value.metadata["largest_free_bytes"] == str(10 * GIB)
    # Eviction frees budget by evicting the idle LLM, not the older embedder.
    assert place_llm("llm-b", 20, allow_eviction=True) == ["llm-a"]
    assert names_on(table, "a/gpu:0") == ["embedder", "llm-b"]


def test_models_adopted_from_load_reports_count_in_their_modality_budget() -> None:
    table = PlacementTable()
    device = cpu("a", 64)
    text = models_pb2.MODALITY_TEXT
    # Loaded at the replica's start, reported with their modality; the older use is the least recent.
    table.observe_loaded(ref("embedder"), device, "r1", 3 * GIB, now_ms=10, last_used_ms=20, modality=text)
    table.observe_loaded(ref("tagger"), device, "r1", 2 * GIB, now_ms=10, last_used_ms=5, modality=text)
    assert {p.model.name: p.modality for p in table.placements()} == {"embedder": text, "tagger": text}
    result = table.place(
        ref("sentiment"),
        2 * GIB,
        [device],
        allow_eviction=True,
        is_busy=idle,
        now_ms=30,
        budget_bytes=6 * GIB,
        modality=text,
    )
    # 3 + 2 + 2 > 6 though memory is plenty: the least recently used text model makes room.
    assert [p.model.name for p in result.evicted] == ["tagger"]
    assert result.placement.modality == text


# ------------------------------------------------------------------------------------ evict, nodes, version


def test_evict_by_version_target_and_everywhere_is_idempotent() -> None:
    table = PlacementTable()
    devices = [gpu("a", 0, 24), gpu("b", 0, 24)]
    on_a, on_b = models_pb2.PlacementTarget(node_id="a"), models_pb2.PlacementTarget(node_id="b")
    for version in ("1", "2"):
        for target in (on_a, on_b):
            table.place(ref("m", version), GIB, devices, target=target, allow_eviction=False, is_busy=idle, now_ms=1)
    place(table, "other", 1, devices, target=on_a)

    assert [(p.model.version, p.node_id) for p in table.evict(ref("m", "2"), on_b)] == [("2", "b")]
    evicted = table.evict(ref("m", ""))
    assert sorted((p.model.version, p.node_id) for p in evicted) == [("1", "a"), ("1", "b"), ("2", "a")]
    assert table.evict(ref("m", "")) == []
    assert [p.model.name for p in table.placements()] == ["other"]
    with pytest.raises(InvalidArgument):
        table.evict(ref("", ""))


def test_placements_are_filtered_and_sorted() -> None:
    table = PlacementTable()
    devices = [gpu("b", 0, 24), gpu("a", 1, 24), gpu("a", 0, 24)]
    for name, node, index in (("z", "b", 0), ("y", "a", 1), ("x", "a", 1), ("w", "a", 0)):
        target = models_pb2.PlacementTarget(node_id=node, device_kind=GPU, device_index=index)
        place(table, name, 1, devices, target=target)
    assert [(p.device_id, p.model.name) for p in table.placements()] == [
        ("a/gpu:0", "w"),
        ("a/gpu:1", "x"),
        ("a/gpu:1", "y"),
        ("b/gpu:0", "z"),
    ]
    assert [p.model.name for p in table.placements(node_id="b")] == ["z"]
    assert [p.model.name for p in table.placements(model=ref("y", ""))] == ["y"]
    assert [p.model.name for p in table.placements(model=common_pb2.ModelRef())] == ["w", "x", "y", "z"]


def test_drop_node_forgets_its_placements_and_frees_its_memory() -> None:
    table = PlacementTable()
    devices = [gpu("a", 0, 16), gpu("b", 0, 16)]
    place(table, "m1", 10, devices, target=models_pb2.PlacementTarget(node_id="a"))
    place(table, "m2", 10, devices, target=models_pb2.PlacementTarget(node_id="b"))
    assert [p.model.name for p in table.drop_node("a")] == ["m1"]
    assert table.drop_node("a") == []
    assert [p.node_id for p in table.placements()] == ["b"]
    assert place(table, "m3", 10, devices).device_id == "a/gpu:0"


def test_version_increases_on_every_change_only() -> None:
    table = PlacementTable()
    devices = [gpu("a", 0, 24)]
    seen = [table.version]

    def changed() -> None:
        assert table.version > seen[-1]
        seen.append(table.version)

    place(table, "m", 1, devices, now=1)
    changed()
    assert table.touch(ref("m"), "a/gpu:0", 5)
    changed()
    table.mark(ref("m"), "a/gpu:0", LOADED, GIB)
    changed()
    place(table, "n", 1, devices, now=6)
    changed()
    assert table.evict(ref("n", "")) != []
    changed()
    assert table.drop_node("a") != []
    changed()
    # No-ops leave it alone.
    assert table.evict(ref("m", "")) == []
    assert table.drop_node("a") == []
    assert not table.touch(ref("m"), "a/gpu:0", 9)
    assert table.version == seen[-1]


# -- following what replicas report ---------------------------------------------------------------------------


def test_a_model_loaded_at_start_is_adopted_and_can_be_evicted() -> None:
    table = PlacementTable()
    device = gpu("a", 0, 10, used=6)
    table.observe_loaded(ref("warm"), device, "r1", 6 * GIB, now_ms=5, last_used_ms=3)
    (adopted,) = table.placements()
    assert adopted.state == LOADED and adopted.bytes == 6 * GIB and adopted.instance_id == "r1"
    assert table.footprints.get(ref("warm"), GPU) == 6 * GIB and table.footprints.is_measured(ref("warm"), GPU)
    # Only 4 GiB free: the adopted model is the LRU victim for an 8 GiB one.
    result = table.place(ref("big"), 8 * GIB, [device], allow_eviction=True, is_busy=idle, now_ms=10, target=None)
    assert [p.model.name for p in result.evicted] == ["warm"]


def test_a_placement_becomes_loaded_with_the_measured_footprint() -> None:
    table = PlacementTable()
    device = gpu("a", 0, 10)
    place(table, "m", 3, [device])
    version = table.version
    table.observe_loaded(ref("m"), device, "r1", 2 * GIB, now_ms=5)
    (placed,) = table.placements()
    assert placed.state == LOADED and placed.bytes == 2 * GIB and table.version > version
    # The same report again changes nothing (no new view for the gateways).
    version = table.version
    table.observe_loaded(ref("m"), device, "r1", 2 * GIB, now_ms=6)
    assert table.version == version


def test_an_unloaded_model_leaves_the_table_but_a_pending_one_stays() -> None:
    table = PlacementTable()
    device = gpu("a", 0, 10)
    table.observe_loaded(ref("old"), device, "r1", GIB, now_ms=1)
    place(table, "new", 1, [device])
    table.observe_unloaded(ref("old"), device.device_id, "r1")
    table.observe_unloaded(ref("new"), device.device_id, "r1")
    assert [(p.model.name, p.state) for p in table.placements()] == [("new", scheduler_pb2.PLACEMENT_STATE_PENDING)]
    assert [p.model.name for p in table.drop_instance("r1")] == ["new"] and not table.placements()
