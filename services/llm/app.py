"""The LLM service process: starts vLLM, serves aimass.v1.LlmService, registers, reports load to the scheduler."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health

from aimass.runtime.catalogue import model_info
from aimass.runtime.config import LlmConfig, Settings
from aimass.runtime.load_report import local_device_id
from aimass.runtime.replica import replica_runner
from aimass.runtime.server import ServerRunner, serve_process
from aimass.v1 import common_pb2, llm_pb2_grpc, models_pb2, scheduler_pb2
from services.llm.engine import LlmEngine
from services.llm.protocol import GenerationEngine
from services.llm.servicer import LlmServicer
from services.llm.weights import PACKAGED_MODELS

SERVICE = "aimass.v1.LlmService"


class LlmApp:
    kind = "llm"
    service_names: tuple[str, ...] = (SERVICE,)

    def __init__(self, config: LlmConfig, engine: GenerationEngine | None = None) -> None:
        self.config = config
        self.engine: GenerationEngine = engine or LlmEngine(config)
        self.servicer = LlmServicer(self.engine, config)
        self._reported_tokens = 0
        self._reported_completed = 0

    def add_to_server(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer) -> None:
        llm_pb2_grpc.add_LlmServiceServicer_to_server(self.servicer, server)

    async def load(self) -> None:
        # vLLM starts for tens of seconds; a thread keeps health checks answering meanwhile.
        await asyncio.to_thread(self.engine.load)

    def model_names(self) -> tuple[str, ...]:
        return (self.engine.model_name,)

    @property
    def device(self) -> str:
        return self.engine.device

    def _footprint_bytes(self) -> int:
        # Estimated until the scheduler measures it: weights plus the KV cache reserved for them.
        kv_bytes = int(self.config.cpu_kv_cache_gib * 2**30) if self.engine.device == "cpu" else 0
        return self.engine.weights_bytes + kv_bytes

    def model_infos(self) -> Sequence[models_pb2.ModelInfo]:
        packaged = PACKAGED_MODELS.get(self.engine.model_name)
        return (
            model_info(
                self.engine.model_name,
                description=packaged.description if packaged else f"LLM from {self.config.model_path}",
                modality=models_pb2.MODALITY_LLM,
                service=SERVICE,
                methods=("Chat", "Generate", "CountTokens"),
                version=self.engine.version,
                context_length=self.engine.context_length,
                footprint_bytes=self._footprint_bytes(),
            ),
        )

    def model_loads(self, window_s: float) -> Sequence[scheduler_pb2.ModelLoad]:
        engine_load = self.engine.load_state
        counters = self.servicer.counters
        tokens = engine_load.generated_tokens - self._reported_tokens
        completed = counters.completed - self._reported_completed
        self._reported_tokens, self._reported_completed = engine_load.generated_tokens, counters.completed
        return (
            scheduler_pb2.ModelLoad(
                model=common_pb2.ModelRef(name=self.engine.model_name, version=self.engine.version),
                device_id=local_device_id(self.engine.device),
                loaded=self.engine.loaded,
                queue_depth=engine_load.waiting,
                queue_capacity=self.config.max_waiting,
                in_flight=counters.in_flight,
                max_batch_size=self.config.max_num_seqs,
                batch_occupancy=min(engine_load.running / self.config.max_num_seqs, 1.0),
                kv_cache_usage=engine_load.kv_cache_usage,
                waiting_requests=engine_load.waiting,
                running_requests=engine_load.running,
                tokens_per_second=tokens / window_s,
                requests_per_second=completed / window_s,
                memory_bytes=self._footprint_bytes(),
                last_used_unix_ms=counters.last_used_unix_ms,
                modality=models_pb2.MODALITY_LLM,
            ),
        )

    def tenant_tokens(self) -> Sequence[scheduler_pb2.TenantTokens]:
        work = self.servicer.counters.take_tenant_work()
        return tuple(
            scheduler_pb2.TenantTokens(
                tenant_id=tenant,
                requests=w.requests,
                prompt_tokens=w.prompt_tokens,
                completion_tokens=w.completion_tokens,
            )
            for tenant, w in sorted(work.items())
        )

    async def close(self) -> None:
        # The server has stopped and in-flight streams have finished; the engine's processes go now. Called on
        # the loop's thread on purpose: vLLM's output task must not run between the engine stopping and its own
        # cancellation (it would log the stopped engine as dead).
        self.engine.shutdown()


def build_runner(settings: Settings, *, register: bool = True, engine: GenerationEngine | None = None) -> ServerRunner:
    """The LLM replica's server; ``engine`` replaces vLLM (any services.llm.protocol.GenerationEngine)."""
    return replica_runner(LlmApp(settings.llm, engine), settings, settings.llm.server, register=register)


def main() -> None:
    serve_process("llm", build_runner)
