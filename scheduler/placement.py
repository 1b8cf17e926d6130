"""Placement decisions: which model goes on which device of which replica (pure logic, no gRPC).

SchedulerService.PlaceModel/EvictModel/GetPlacement wrap a ``PlacementTable``; the routing view's version builds on
``PlacementTable.version``. Not thread-safe: the scheduler calls it from its one event loop.

Memory accounting. A device's reading (NVML, or the CPU profile) counts everything on it: foreign processes and our
models that have finished loading. A placement still PENDING or LOADING is not in the reading yet, so its bytes are
reserved on top of it; otherwise two placements decided between two readings could both take the same free memory.
Our own placements also set a floor under the reading, for a reading taken before a LOADED model showed up:

    used = max(reading, bytes of our LOADED/EVICTING placements) + bytes of our PENDING/LOADING placements

A LOADING model partly in the reading is over-reserved until it is LOADED: conservative, never an out-of-memory.
Likewise an evicted model leaves the table at once but stays in the reading until its replica unloads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from aimass.runtime.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from aimass.v1 import common_pb2, models_pb2, scheduler_pb2

ModelRef = common_pb2.ModelRef
DeviceKindValue: TypeAlias = common_pb2.DeviceKind.ValueType
PlacementStateValue: TypeAlias = scheduler_pb2.PlacementState.ValueType
ModalityValue: TypeAlias = models_pb2.Modality.ValueType

# States whose memory the device reading may not show yet (see the module docstring).
_NOT_IN_READING = frozenset({scheduler_pb2.PLACEMENT_STATE_PENDING, scheduler_pb2.PLACEMENT_STATE_LOADING})


@dataclass
class Device:
    """One device as the scheduler last saw it."""

    # "<node>/gpu:<i>" or "<node>/cpu".
    device_id: str
    node_id: str
    kind: DeviceKindValue
    total_bytes: int
    # Latest reading: memory used by everything on the device, our placed models included.
    used_bytes: int
    # Replicas that can host models on this device; a device without one cannot take a placement.
    instance_ids: tuple[str, ...] = ()
    # NVML index; 0 for the CPU.
    index: int = 0


class FootprintBook:
    """Model footprints per device kind (CPU RAM and GPU memory differ); a measured value beats an estimate."""

    def __init__(self) -> None:
        self._bytes: dict[tuple[str, str, DeviceKindValue], tuple[int, bool]] = {}

    def record(self, model: ModelRef, device_kind: DeviceKindValue, bytes: int, *, measured: bool = True) -> None:
        """Remembers a footprint; an estimate (``measured=False``) never replaces a measured value."""
        if not model.name or not model.version:
            raise InvalidArgument("a footprint needs the model's name and version")
        if bytes <= 0:
            raise InvalidArgument(f"footprint of {_ref(model)} must be > 0 bytes, got {bytes}")
        key = (model.name, model.version, device_kind)
        known = self._bytes.get(key)
        if known is not None and known[1] and not measured:
            return
        self._bytes[key] = (bytes, measured)

    def get(self, model: ModelRef, device_kind: DeviceKindValue) -> int | None:
        known = self._bytes.get((model.name, model.version, device_kind))
        return None if known is None else known[0]

    def is_measured(self, model: ModelRef, device_kind: DeviceKindValue) -> bool:
        known = self._bytes.get((model.name, model.version, device_kind))
        return known is not None and known[1]


@dataclass
class _Placed:
    name: str
    version: str
    node_id: str
    device_id: str
    instance_id: str
    kind: DeviceKindValue
    index: int
    nbytes: int
    state: PlacementStateValue
    placed_ms: int
    last_used_ms: int
    # Budget pool: placements of the same modality share a per-device budget when the caller sets one.
    modality: ModalityValue = models_pb2.MODALITY_UNSPECIFIED

    @classmethod
    def on(
        cls,
        device: Device,
        model: ModelRef,
        instance_id: str,
        nbytes: int,
        state: PlacementStateValue,
        *,
        placed_ms: int,
        last_used_ms: int,
        modality: ModalityValue = models_pb2.MODALITY_UNSPECIFIED,
    ) -> _Placed:
        return cls(
            name=model.name,
            version=model.version,
            node_id=device.node_id,
            device_id=device.device_id,
            instance_id=instance_id,
            kind=device.kind,
            index=device.index,
            nbytes=nbytes,
            state=state,
            placed_ms=placed_ms,
            last_used_ms=last_used_ms,
            modality=modality,
        )

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.name, self.version, self.device_id, self.instance_id)

    @property
    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, version=self.version)

    def lru_key(self) -> tuple[int, int, str, str, str]:
        return (self.last_used_ms, self.placed_ms, self.name, self.version, self.instance_id)

    def to_proto(self) -> scheduler_pb2.Placement:
        return scheduler_pb2.Placement(
            model=self.ref,
            node_id=self.node_id,
            device_id=self.device_id,
            instance_id=self.instance_id,
            bytes=self.nbytes,
            state=self.state,
            placed_unix_ms=self.placed_ms,
            last_used_unix_ms=self.last_used_ms,
            modality=self.modality,
        )


@dataclass
class PlaceResult:
    placement: scheduler_pb2.Placement
    # It was already placed on a device matching the target; nothing changed but its last-used time.
    already_placed: bool
    # Placements removed to make room, least recently used first.
    evicted: list[scheduler_pb2.Placement] = field(default_factory=list)

    def to_proto(self) -> scheduler_pb2.PlaceModelResponse:
        return scheduler_pb2.PlaceModelResponse(
            placement=self.placement, already_placed=self.already_placed, evicted=self.evicted
        )


@dataclass
class _Fit:
    """How ``required`` bytes would fit on one device after evicting ``evict`` (empty when it fits as is)."""

    device: Device
    required: int
    # Bytes left free on the device after placing (negative: does not fit).
    free_after: int
    evict: list[_Placed]
    fits: bool

    @property
    def evicted_bytes(self) -> int:
        return sum(p.nbytes for p in self.evict)


class PlacementTable:
    """The current placements, with memory-aware best-fit placement and least-recently-used eviction."""

    def __init__(self, footprints: FootprintBook | None = None) -> None:
        self.footprints = footprints if footprints is not None else FootprintBook()
        self._placed: dict[tuple[str, str, str, str], _Placed] = {}
        # Increases on every change; GetPlacement reports it and the routing view builds on it.
        self.version = 0

    # ----------------------------------------------------------------------------------------------- placing

    def place(
        self,
        model: ModelRef,
        required_bytes: int,
        devices: Sequence[Device],
        *,
        target: models_pb2.PlacementTarget | None = None,
        allow_eviction: bool,
        is_busy: Callable[[ModelRef, str], bool],
        now_ms: int,
        budget_bytes: int | None = None,
        modality: ModalityValue = models_pb2.MODALITY_UNSPECIFIED,
    ) -> PlaceResult:
        """Chooses a device for ``model`` and records the placement (PENDING).

        ``required_bytes`` 0 takes the footprint known for each device's kind. ``budget_bytes`` caps what placements
        of this ``modality`` may take together on one device: LLM engines are given a configured fraction of GPU
        memory (weights plus KV cache) and must stay inside it, leaving the rest to the other models.
        ``is_busy(model, device_id)`` says whether a placed model is serving requests; busy models are never evicted.
        """
        if not model.name or not model.version:
            raise InvalidArgument(f"model name and version are required to place a model, got {_ref(model)!r}")
        if required_bytes < 0:
            raise InvalidArgument(f"required_bytes must be >= 0 (0: the known footprint), got {required_bytes}")
        if budget_bytes is not None and budget_bytes <= 0:
            raise InvalidArgument(f"budget_bytes must be > 0 when set, got {budget_bytes}")
        _check_target(target)

        existing = sorted(
            (p for p in self._placed.values() if (p.name, p.version) == (model.name, model.version)),
            key=lambda p: (p.node_id, p.device_id, p.instance_id),
        )
        for placed in existing:
            if _target_matches(target, placed.node_id, placed.instance_id, placed.kind, placed.index):
                if now_ms > placed.last_used_ms:
                    placed.last_used_ms = now_ms
                    self.version += 1
                return PlaceResult(placement=placed.to_proto(), already_placed=True)

        candidates = [
            d
            for d in devices
            if d.instance_ids and any(_target_matches(target, d.node_id, i, d.kind, d.index) for i in d.instance_ids)
        ]
        if not candidates:
            raise FailedPrecondition(
                f"no device matches {_describe_target(target)} with a replica that can host {_ref(model)}; "
                f"known devices: {', '.join(sorted(d.device_id for d in devices)) or 'none'}"
            )

        requirements: dict[str, int] = {}
        for d in candidates:
            need = required_bytes or self.footprints.get(model, d.kind)
            if need is not None:
                requirements[d.device_id] = need
        if not requirements:
            kinds = sorted({_kind_name(d.kind) for d in candidates})
            raise InvalidArgument(
                f"no footprint is known for {_ref(model)} on {' or '.join(kinds)}; pass required_bytes"
            )
        candidates = [d for d in candidates if d.device_id in requirements]

        fits = [self._fit(d, requirements[d.device_id], budget_bytes, modality, None) for d in candidates]
        chosen = _best([f for f in fits if f.fits], by_eviction=False)
        if chosen is None and allow_eviction:
            fits = [
                self._fit(d, requirements[d.device_id], budget_bytes, modality, (model, is_busy)) for d in candidates
            ]
            chosen = _best([f for f in fits if f.fits], by_eviction=True)
        if chosen is None:
            raise self._insufficient(model, candidates, requirements, budget_bytes, modality, allow_eviction, is_busy)

        for victim in chosen.evict:
            del self._placed[victim.key]
        device = chosen.device
        instance_id = target.instance_id if target is not None and target.instance_id else device.instance_ids[0]
        placed = _Placed.on(
            device,
            model,
            instance_id,
            chosen.required,
            scheduler_pb2.PLACEMENT_STATE_PENDING,
            placed_ms=now_ms,
            last_used_ms=now_ms,
            modality=modality,
        )
        self._placed[placed.key] = placed
        self.version += 1
        return PlaceResult(
            placement=placed.to_proto(), already_placed=False, evicted=[v.to_proto() for v in chosen.evict]
        )

    def _on_device(self, device_id: str) -> list[_Placed]:
        return [p for p in self._placed.values() if p.device_id == device_id]

    def _fit(
        self,
        device: Device,
        required: int,
        budget_bytes: int | None,
        modality: ModalityValue,
        eviction: tuple[ModelRef, Callable[[ModelRef, str], bool]] | None,
    ) -> _Fit:
        """Whether ``required`` fits on ``device``; with ``eviction``, evicting idle placements LRU first."""
        placed = self._on_device(device.device_id)
        evict: list[_Placed] = []
        free, pool = _free_bytes(device, placed), _pool_bytes(placed, modality)
        if eviction is not None:
            model, is_busy = eviction
            for victim in sorted(_evictable(placed, model, is_busy), key=_Placed.lru_key):
                memory_short = free < required
                budget_short = budget_bytes is not None and pool + required > budget_bytes
                if not memory_short and not budget_short:
                    break
                # Evicting another modality frees memory but not budget: only worth it when memory is short.
                if not memory_short and victim.modality != modality:
                    continue
                evict.append(victim)
                # Whether the reading showed it or it was only reserved, its bytes come back.
                free += victim.nbytes
                if victim.modality == modality:
                    pool -= victim.nbytes
        room = _budget_room(budget_bytes, pool)
        fits = free >= required and (room is None or room >= required)
        return _Fit(device=device, required=required, free_after=free - required, evict=evict, fits=fits)

    def _insufficient(
        self,
        model: ModelRef,
        candidates: Sequence[Device],
        requirements: dict[str, int],
        budget_bytes: int | None,
        modality: ModalityValue,
        allow_eviction: bool,
        is_busy: Callable[[ModelRef, str], bool],
    ) -> ResourceExhausted:
        # The most a device could offer: its free memory (after evicting every idle model when allowed), capped
        # by what the budget leaves.
        offers: list[tuple[int, str, bool]] = []
        for d in candidates:
            placed = self._on_device(d.device_id)
            evict = _evictable(placed, model, is_busy) if allow_eviction else []
            free = max(_free_bytes(d, placed) + sum(p.nbytes for p in evict), 0)
            room = _budget_room(budget_bytes, _pool_bytes(placed, modality) - _pool_bytes(evict, modality))
            capped = room is not None and room < free
            offers.append((max(min(free, room), 0) if room is not None else free, d.device_id, capped))
        largest, device_id, capped = min(offers, key=lambda o: (-o[0], o[1]))
        required = requirements[device_id]
        message = (
            f"model {_ref(model)} needs {_fmt_bytes(required)}; the most free on any allowed device is "
            f"{_fmt_bytes(largest)} ({device_id})"
        )
        if capped:
            message += f", within the per-device budget of {_fmt_bytes(budget_bytes or 0)}"
        message += ", after evicting idle models" if allow_eviction else "; eviction of idle models was not allowed"
        return ResourceExhausted(
            message,
            reason="INSUFFICIENT_MEMORY",
            metadata={"required_bytes": str(required), "largest_free_bytes": str(largest), "device_id": device_id},
        )

    # ------------------------------------------------------------------------------------------ bookkeeping

    def evict(self, model: ModelRef, target: models_pb2.PlacementTarget | None = None) -> list[scheduler_pb2.Placement]:
        """Removes the model's placements matching ``target`` (empty version: every version); idempotent."""
        if not model.name:
            raise InvalidArgument("model name is required to evict a model")
        _check_target(target)
        victims = [
            p
            for p in self._placed.values()
            if _model_matches(model, p) and _target_matches(target, p.node_id, p.instance_id, p.kind, p.index)
        ]
        return self._remove(victims)

    def drop_node(self, node_id: str) -> list[scheduler_pb2.Placement]:
        """Forgets every placement on a node that was lost."""
        return self._remove([p for p in self._placed.values() if p.node_id == node_id])

    def touch(self, model: ModelRef, device_id: str, now_ms: int, *, instance_id: str = "") -> bool:
        """Records a use of the model on the device (for LRU eviction); False when it is not placed there."""
        found = False
        for p in self._select(model, device_id, instance_id):
            found = True
            if now_ms > p.last_used_ms:
                p.last_used_ms = now_ms
                self.version += 1
        return found

    def mark(
        self,
        model: ModelRef,
        device_id: str,
        state: PlacementStateValue,
        bytes: int | None = None,
        *,
        instance_id: str = "",
    ) -> list[scheduler_pb2.Placement]:
        """Moves the placement on (PENDING → LOADING → LOADED); measured bytes at LOADED become its footprint."""
        if not model.name or not model.version:
            raise InvalidArgument(f"model name and version are required, got {_ref(model)!r}")
        if state == scheduler_pb2.PLACEMENT_STATE_UNSPECIFIED:
            raise InvalidArgument("placement state must be set")
        if bytes is not None and bytes <= 0:
            raise InvalidArgument(f"measured bytes must be > 0, got {bytes}")
        selected = self._select(model, device_id, instance_id)
        if not selected:
            raise NotFound(f"model {_ref(model)} is not placed on {device_id}")
        for p in selected:
            p.state = state
            if bytes is not None:
                p.nbytes = bytes
                if state == scheduler_pb2.PLACEMENT_STATE_LOADED:
                    self.footprints.record(model, p.kind, bytes, measured=True)
        self.version += 1
        return [p.to_proto() for p in selected]

    def observe_loaded(
        self,
        model: ModelRef,
        device: Device,
        instance_id: str,
        bytes: int,
        now_ms: int,
        last_used_ms: int = 0,
        modality: ModalityValue = models_pb2.MODALITY_UNSPECIFIED,
    ) -> None:
        """A replica reports ``model`` loaded on ``device`` taking ``bytes`` (measured): its placement becomes LOADED
        with that footprint, and a model loaded without a placement (at the replica's start) is adopted, in its
        ``modality``'s budget pool, so it can be evicted like any other."""
        if bytes <= 0 or not model.name or not model.version:
            return
        key = (model.name, model.version, device.device_id, instance_id)
        placed = self._placed.get(key)
        if placed is None:
            placed = _Placed.on(
                device,
                model,
                instance_id,
                bytes,
                scheduler_pb2.PLACEMENT_STATE_LOADED,
                placed_ms=now_ms,
                last_used_ms=max(last_used_ms, now_ms),
                modality=modality,
            )
            self._placed[key] = placed
            self.footprints.record(model, device.kind, bytes, measured=True)
            self.version += 1
            return
        if placed.state != scheduler_pb2.PLACEMENT_STATE_LOADED or placed.nbytes != bytes:
            placed.state = scheduler_pb2.PLACEMENT_STATE_LOADED
            placed.nbytes = bytes
            self.footprints.record(model, device.kind, bytes, measured=True)
            self.version += 1
        if last_used_ms > placed.last_used_ms:
            placed.last_used_ms = last_used_ms
            self.version += 1
        if modality and not placed.modality:
            placed.modality = modality
            self.version += 1

    def observe_unloaded(self, model: ModelRef, device_id: str, instance_id: str) -> list[scheduler_pb2.Placement]:
        """A replica reports ``model`` not loaded: a LOADED placement of it there is gone (the replica unloaded it or
        restarted). Placements still PENDING or LOADING stay: their load has not shown up yet."""
        return self._remove(
            p
            for p in self._select(model, device_id, instance_id)
            if p.state in (scheduler_pb2.PLACEMENT_STATE_LOADED, scheduler_pb2.PLACEMENT_STATE_EVICTING)
        )

    def drop_instance(self, instance_id: str) -> list[scheduler_pb2.Placement]:
        """Forgets every placement of a replica that went away."""
        return self._remove([p for p in self._placed.values() if p.instance_id == instance_id])

    def placements(self, node_id: str = "", model: ModelRef | None = None) -> list[scheduler_pb2.Placement]:
        """GetPlacement's answer: sorted by node_id, device_id, model name (then version, instance)."""
        chosen = [
            p
            for p in self._placed.values()
            if (not node_id or p.node_id == node_id) and (model is None or not model.name or _model_matches(model, p))
        ]
        chosen.sort(key=lambda p: (p.node_id, p.device_id, p.name, p.version, p.instance_id))
        return [p.to_proto() for p in chosen]

    def _select(self, model: ModelRef, device_id: str, instance_id: str) -> list[_Placed]:
        return [
            p
            for p in self._placed.values()
            if p.device_id == device_id
            and _model_matches(model, p)
            and (not instance_id or p.instance_id == instance_id)
        ]

    def _remove(self, victims: Iterable[_Placed]) -> list[scheduler_pb2.Placement]:
        removed = sorted(victims, key=lambda p: (p.node_id, p.device_id, p.name, p.version, p.instance_id))
        for p in removed:
            del self._placed[p.key]
        if removed:
            self.version += 1
        return [p.to_proto() for p in removed]


# ------------------------------------------------------------------------------------------------- helpers


def _free_bytes(device: Device, placed: Sequence[_Placed]) -> int:
    """Free memory on the device by the module docstring's rule (negative when over-committed)."""
    in_reading = sum(p.nbytes for p in placed if p.state not in _NOT_IN_READING)
    reserved = sum(p.nbytes for p in placed if p.state in _NOT_IN_READING)
    return device.total_bytes - (max(device.used_bytes, in_reading) + reserved)


def _pool_bytes(placed: Sequence[_Placed], modality: ModalityValue) -> int:
    return sum(p.nbytes for p in placed if p.modality == modality)


def _budget_room(budget_bytes: int | None, pool_bytes: int) -> int | None:
    return None if budget_bytes is None else budget_bytes - pool_bytes


def _evictable(placed: Sequence[_Placed], model: ModelRef, is_busy: Callable[[ModelRef, str], bool]) -> list[_Placed]:
    # Evicting another copy of the same model to make room for it would only churn; EVICTING ones are already going.
    return [
        p
        for p in placed
        if (p.name, p.version) != (model.name, model.version)
        and p.state != scheduler_pb2.PLACEMENT_STATE_EVICTING
        and not is_busy(p.ref, p.device_id)
    ]


def _best(fits: Sequence[_Fit], *, by_eviction: bool) -> _Fit | None:
    """Fewest evicted bytes (when evicting), then best fit (least memory left), then lowest device id."""
    if not fits:
        return None
    return min(fits, key=lambda f: (f.evicted_bytes if by_eviction else 0, f.free_after, f.device.device_id))


def _check_target(target: models_pb2.PlacementTarget | None) -> None:
    if target is None or not target.HasField("device_index"):
        return
    if not target.node_id or target.device_kind != common_pb2.DEVICE_KIND_GPU:
        raise InvalidArgument("target.device_index requires target.node_id and target.device_kind GPU")
    if target.device_index < 0:
        raise InvalidArgument(f"target.device_index must be >= 0, got {target.device_index}")


def _target_matches(
    target: models_pb2.PlacementTarget | None, node_id: str, instance_id: str, kind: DeviceKindValue, index: int
) -> bool:
    if target is None:
        return True
    return (
        (not target.node_id or target.node_id == node_id)
        and (not target.instance_id or target.instance_id == instance_id)
        and (target.device_kind == common_pb2.DEVICE_KIND_UNSPECIFIED or target.device_kind == kind)
        and (not target.HasField("device_index") or target.device_index == index)
    )


def _model_matches(model: ModelRef, placed: _Placed) -> bool:
    return model.name == placed.name and (not model.version or model.version == placed.version)


def _describe_target(target: models_pb2.PlacementTarget | None) -> str:
    parts = []
    if target is not None:
        if target.node_id:
            parts.append(f"node {target.node_id}")
        if target.instance_id:
            parts.append(f"instance {target.instance_id}")
        if target.device_kind != common_pb2.DEVICE_KIND_UNSPECIFIED:
            parts.append(f"kind {_kind_name(target.device_kind)}")
        if target.HasField("device_index"):
            parts.append(f"index {target.device_index}")
    return f"target ({', '.join(parts)})" if parts else "the empty target"


def _kind_name(kind: DeviceKindValue) -> str:
    return common_pb2.DeviceKind.Name(kind).removeprefix("DEVICE_KIND_")


def _ref(model: ModelRef) -> str:
    return f"{model.name}@{model.version}" if model.version else model.name


def _fmt_bytes(n: int) -> str:
    if abs(n) >= 1 << 30:
        return f"{n / (1 << 30):.1f} GiB"
    return f"{n / (1 << 20):.1f} MiB"
