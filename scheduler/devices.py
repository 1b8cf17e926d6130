"""Where a node's device readings come from: NVML on GPU hosts, the host's CPU and RAM without one, or a simulated
fleet that tests and the simulator drive. All three sit behind `DeviceReader`, so the node agent and the scheduler
never care which one they got.

Every reader reports every GPU plus one CPU device (host RAM as its memory), named "<node_id>/gpu:<index>" and
"<node_id>/cpu", so CPU-only nodes can be placed on too.
"""

from __future__ import annotations

import json
import logging
import platform
import threading
import tomllib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import psutil
import pynvml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aimass.v1 import common_pb2, scheduler_pb2

log = logging.getLogger(__name__)

GIB = 1 << 30
CPUINFO = Path("/proc/cpuinfo")

ReaderKind = Literal["auto", "nvml", "cpu", "simulated"]


class DeviceReader(Protocol):
    source: scheduler_pb2.ReadingSource.ValueType

    def read(self) -> list[scheduler_pb2.NodeDevice]:
        """Every GPU plus one CPU device, with current readings. May block (NVML): call it off the event loop."""
        ...

    def close(self) -> None: ...


def gpu_device_id(node_id: str, index: int) -> str:
    return f"{node_id}/gpu:{index}"


def cpu_device_id(node_id: str) -> str:
    return f"{node_id}/cpu"


def cpu_model_name(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's marketing name from /proc/cpuinfo; platform.processor() where that has none (non-Linux, some ARM)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


class CpuProfileReader:
    """The host's CPU and RAM as one device: the whole reading on hosts without NVML, the CPU device on the others."""

    source: scheduler_pb2.ReadingSource.ValueType = scheduler_pb2.READING_SOURCE_CPU_PROFILE

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.name = cpu_model_name()
        # cpu_percent(interval=None) is system-wide usage since its previous call anywhere in this process; the very
        # first call has nothing to compare with and returns 0.0, so prime it here to make the first read() mean
        # something.
        psutil.cpu_percent(interval=None)

    def device(self) -> scheduler_pb2.NodeDevice:
        memory = psutil.virtual_memory()
        return scheduler_pb2.NodeDevice(
            device_id=cpu_device_id(self.node_id),
            info=common_pb2.DeviceInfo(
                kind=common_pb2.DEVICE_KIND_CPU,
                index=0,
                name=self.name,
                memory_total_bytes=memory.total,
                # "available" counts reclaimable page cache as free, which is what a model load can actually get.
                memory_used_bytes=memory.total - memory.available,
                utilization_percent=psutil.cpu_percent(interval=None),
            ),
        )

    def read(self) -> list[scheduler_pb2.NodeDevice]:
        return [self.device()]

    def close(self) -> None:
        """Nothing to release."""


class NvmlUnavailable(RuntimeError):
    """NVML could not be initialised: no NVIDIA driver or library on this host, or no permission to use it."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"NVML not available ({reason}): no NVIDIA driver is usable on this host; "
            "use the CPU profile (--reader cpu) or a simulated fleet (--reader simulated)"
        )
        self.reason = reason


def _nvml_reason(err: pynvml.NVMLError) -> str:
    # pynvml makes one subclass per return code (NVMLError_LibraryNotFound, ...); its name is the shortest reason.
    name = type(err).__name__.removeprefix("NVMLError_")
    return str(err) if name == "NVMLError" else name


def _unless_unsupported(read: Callable[[], Any]) -> float:
    """A reading some GPUs lack (temperature on passthrough vGPUs, power on older boards): 0 where unsupported."""
    try:
        return float(read())
    except pynvml.NVMLError_NotSupported:
        return 0.0


def _peak_tflops(handle: Any) -> float:
    """Peak FP32 TFLOPS: CUDA cores x max SM clock (MHz) x 2 (a fused multiply-add per core per cycle); 0 where the
    driver does not say (older drivers have no core count)."""
    try:
        cores = float(pynvml.nvmlDeviceGetNumGpuCores(handle))
        clock_mhz = float(pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM))
    except pynvml.NVMLError:  # not supported, or a driver without the call (FunctionNotFound)
        return 0.0
    return cores * clock_mhz * 2 / 1e6


def _process_name(pid: int) -> str:
    # NVML reports host pids; inside a container without the host's pid namespace they are not ours to read.
    try:
        return str(psutil.Process(pid).name())
    except psutil.Error:
        return ""


class NvmlReader:
    """Real GPUs through NVML, plus the CPU device."""

    source: scheduler_pb2.ReadingSource.ValueType = scheduler_pb2.READING_SOURCE_NVML

    def __init__(self, node_id: str) -> None:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            raise NvmlUnavailable(_nvml_reason(err)) from err
        self.node_id = node_id
        self._cpu = CpuProfileReader(node_id)
        self._open = True

    def read(self) -> list[scheduler_pb2.NodeDevice]:
        devices = [self._gpu(index) for index in range(pynvml.nvmlDeviceGetCount())]
        devices.append(self._cpu.device())
        return devices

    def _gpu(self, index: int) -> scheduler_pb2.NodeDevice:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except pynvml.NVMLError_NotSupported:
            processes = []
        return scheduler_pb2.NodeDevice(
            device_id=gpu_device_id(self.node_id, index),
            info=common_pb2.DeviceInfo(
                kind=common_pb2.DEVICE_KIND_GPU,
                index=index,
                name=str(pynvml.nvmlDeviceGetName(handle)),
                uuid=str(pynvml.nvmlDeviceGetUUID(handle)),
                memory_total_bytes=int(memory.total),
                memory_used_bytes=int(memory.used),
                utilization_percent=_unless_unsupported(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                temperature_celsius=_unless_unsupported(
                    lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
                ),
                # NVML answers milliwatts.
                power_watts=_unless_unsupported(lambda: pynvml.nvmlDeviceGetPowerUsage(handle)) / 1000,
                compute_tflops=_peak_tflops(handle),
            ),
            processes=[
                scheduler_pb2.ProcessMemory(
                    pid=process.pid,
                    # None where the driver will not say (no permission, some MIG and Windows setups).
                    used_bytes=int(process.usedGpuMemory or 0),
                    process_name=_process_name(process.pid),
                )
                for process in processes
            ],
        )

    def close(self) -> None:
        if self._open:
            self._open = False
            pynvml.nvmlShutdown()


@dataclass(frozen=True)
class SimulatedGpu:
    name: str
    memory_bytes: int
    # Relative throughput (1.0 = the reference GPU); the simulator scales service times by it.
    speed: float = 1.0

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0:
            raise ValueError(f"simulated GPU {self.name!r}: memory_bytes must be > 0, got {self.memory_bytes}")
        if self.speed <= 0:
            raise ValueError(f"simulated GPU {self.name!r}: speed must be > 0, got {self.speed}")


class _DeviceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1)
    memory_gib: float = Field(gt=0)
    speed: float = Field(default=1.0, gt=0)


class _FleetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    devices: list[_DeviceSpec] = Field(min_length=1)


_PARSERS: dict[str, Callable[[str], Any]] = {"TOML": tomllib.loads, "JSON": json.loads}


def _load_fleet_spec(path: Path) -> _FleetSpec:
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"simulated fleet file {path}: cannot read it ({err})") from err
    # The suffix says which format; anything else gets both tries.
    named = {".toml": "TOML", ".json": "JSON"}.get(path.suffix.lower())
    problems: list[str] = []
    for fmt in [named] if named else list(_PARSERS):
        try:
            document = _PARSERS[fmt](text)
            break
        except ValueError as err:  # TOMLDecodeError and JSONDecodeError are both ValueErrors
            problems.append(f"not valid {fmt} ({err})")
    else:
        raise ValueError(f"simulated fleet file {path}: " + "; ".join(problems))
    try:
        return _FleetSpec.model_validate(document)
    except ValidationError as err:
        details = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'file'}: {error['msg']}" for error in err.errors()
        )
        raise ValueError(f"simulated fleet file {path}: {details}") from err


@dataclass
class _Allocation:
    used_bytes: int
    instance_id: str


class SimulatedFleet:
    """GPUs that exist only in memory: a `DeviceReader` whose memory use and utilisation the caller sets.

    Deterministic: readings change only through allocate/release/set_utilization (the CPU device is the host's).
    Thread-safe, as the node agent reads from a worker thread while a simulation drives it from another.
    """

    source: scheduler_pb2.ReadingSource.ValueType = scheduler_pb2.READING_SOURCE_SIMULATED

    def __init__(self, node_id: str, devices: Sequence[SimulatedGpu]) -> None:
        self.node_id = node_id
        self.devices = tuple(devices)
        self._allocations: list[dict[int, _Allocation]] = [{} for _ in self.devices]
        self._utilization = [0.0 for _ in self.devices]
        self._lock = threading.Lock()
        self._cpu = CpuProfileReader(node_id)

    @classmethod
    def from_file(cls, path: Path, node_id: str) -> SimulatedFleet:
        """A fleet from TOML or JSON: {"devices": [{"name": "A100-40GB", "memory_gib": 40, "speed": 1.0}, ...]}."""
        spec = _load_fleet_spec(path)
        return cls(node_id, [SimulatedGpu(d.name, round(d.memory_gib * GIB), d.speed) for d in spec.devices])

    def _check_index(self, device_index: int) -> None:
        if not 0 <= device_index < len(self.devices):
            raise ValueError(
                f"node {self.node_id} has no simulated GPU {device_index}; it has {len(self.devices)} "
                f"(indexes 0..{len(self.devices) - 1})"
            )

    def _used_bytes(self, device_index: int) -> int:
        return sum(allocation.used_bytes for allocation in self._allocations[device_index].values())

    def free_bytes(self, device_index: int) -> int:
        self._check_index(device_index)
        with self._lock:
            return self.devices[device_index].memory_bytes - self._used_bytes(device_index)

    def allocate(self, device_index: int, bytes: int, *, pid: int, instance_id: str = "") -> None:
        """Process ``pid`` takes ``bytes`` more on the GPU (added to what it already holds there)."""
        self._check_index(device_index)
        if bytes <= 0:
            raise ValueError(f"allocation must be > 0 bytes, got {bytes}")
        with self._lock:
            free = self.devices[device_index].memory_bytes - self._used_bytes(device_index)
            if bytes > free:
                raise ValueError(
                    f"{gpu_device_id(self.node_id, device_index)} ({self.devices[device_index].name}): "
                    f"needs {bytes} bytes ({bytes / GIB:.2f} GiB) but only {free} bytes ({free / GIB:.2f} GiB) "
                    "are free"
                )
            held = self._allocations[device_index].get(pid)
            if held is None:
                self._allocations[device_index][pid] = _Allocation(bytes, instance_id)
            else:
                held.used_bytes += bytes
                held.instance_id = instance_id or held.instance_id

    def release(self, device_index: int, pid: int) -> int:
        """Frees everything ``pid`` holds on the GPU, as when the process exits; returns the bytes freed (0 if none)."""
        self._check_index(device_index)
        with self._lock:
            held = self._allocations[device_index].pop(pid, None)
        return 0 if held is None else held.used_bytes

    def set_utilization(self, device_index: int, percent: float) -> None:
        self._check_index(device_index)
        if not 0 <= percent <= 100:
            raise ValueError(f"utilisation must be within 0..100 percent, got {percent}")
        with self._lock:
            self._utilization[device_index] = float(percent)

    def _uuid(self, device_index: int) -> str:
        # Stable across runs, like a real GPU's, and unique across simulated nodes.
        return f"GPU-{uuid.uuid5(uuid.NAMESPACE_URL, 'aimass-simulated:' + gpu_device_id(self.node_id, device_index))}"

    def read(self) -> list[scheduler_pb2.NodeDevice]:
        with self._lock:
            devices = [
                scheduler_pb2.NodeDevice(
                    device_id=gpu_device_id(self.node_id, index),
                    info=common_pb2.DeviceInfo(
                        kind=common_pb2.DEVICE_KIND_GPU,
                        index=index,
                        name=gpu.name,
                        uuid=self._uuid(index),
                        memory_total_bytes=gpu.memory_bytes,
                        memory_used_bytes=self._used_bytes(index),
                        utilization_percent=self._utilization[index],
                        compute_tflops=gpu.speed,
                    ),
                    processes=[
                        scheduler_pb2.ProcessMemory(
                            pid=pid, used_bytes=allocation.used_bytes, instance_id=allocation.instance_id
                        )
                        for pid, allocation in sorted(self._allocations[index].items())
                    ],
                )
                for index, gpu in enumerate(self.devices)
            ]
        devices.append(self._cpu.device())
        return devices

    def close(self) -> None:
        """Nothing to release."""


def make_reader(kind: ReaderKind, node_id: str, simulated_file: Path | None = None) -> DeviceReader:
    """The reader ``kind`` names; "auto" is NVML where a driver is present and the CPU profile otherwise."""
    if kind == "auto":
        try:
            return NvmlReader(node_id)
        except NvmlUnavailable as err:
            log.info("NVML not available (%s): reporting the CPU profile", err.reason)
            return CpuProfileReader(node_id)
    if kind == "nvml":
        return NvmlReader(node_id)
    if kind == "cpu":
        return CpuProfileReader(node_id)
    if kind == "simulated":
        if simulated_file is None:
            raise ValueError("the simulated reader needs a fleet file (TOML or JSON; --simulated-file)")
        return SimulatedFleet.from_file(simulated_file, node_id)
    raise ValueError(f"unknown reader kind {kind!r}; expected auto, nvml, cpu or simulated")
