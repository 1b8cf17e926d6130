"""One typed config for every aimass process: defaults that run on a laptop, overridden by a TOML file and env.

Precedence (highest first): keyword arguments, environment (``AIMASS_`` prefix, ``__`` between levels, e.g.
``AIMASS_NLP__SERVER__PORT=50062``), the TOML file named by ``AIMASS_CONFIG``, then the defaults below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ByteSize, Field, PositiveFloat, PositiveInt, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_FILE_ENV = "AIMASS_CONFIG"


def default_state_dir() -> Path:
    """Where `aimass up` keeps the mesh's state: the store, the admin key, the CA and certificates."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "aimass"


class DeadlineConfig(BaseModel):
    """How long a call may run on a server: ``default_s`` when the caller set no deadline, and never longer than
    ``max_s`` (a longer deadline is cut to it). 0 turns either off."""

    default_s: float = Field(ge=0)
    max_s: float = Field(ge=0)

    @model_validator(mode="after")
    def _default_within_max(self) -> DeadlineConfig:
        if self.max_s and self.default_s > self.max_s:
            raise ValueError(f"default_s ({self.default_s}) is longer than max_s ({self.max_s})")
        return self


# The mesh's own long-lived streams (registry watches, the scheduler's view and report streams) run for as long as
# their processes do; they have no deadline of their own.
MESH_INTERNAL_DEADLINES: dict[str, DeadlineConfig] = {
    "/aimass.v1.RegistryService/": DeadlineConfig(default_s=0, max_s=0),
    "/aimass.v1.SchedulerService/": DeadlineConfig(default_s=0, max_s=0),
    # Loading a model (an LLM engine on a CPU) can take minutes.
    "/aimass.v1.ModelService/LoadModel": DeadlineConfig(default_s=900, max_s=3600),
}


class ServerConfig(BaseModel):
    """How one gRPC server listens, admits work and drains."""

    host: str = "127.0.0.1"
    # 0 picks a free port; the registry tells everyone which.
    port: int = Field(default=0, ge=0, le=65535)
    # The host others dial, registered with the registry. Empty: ``host``, or when ``host`` is a wildcard
    # (0.0.0.0, ::) this machine's address on the route to the registry.
    advertise_host: str = ""
    # Unary calls in flight (executing or queued) beyond which new ones get RESOURCE_EXHAUSTED.
    max_inflight: PositiveInt = 512
    # Streaming calls (any side streams: LLM generations, live transcription, uploads) open at once, counted apart
    # from unary calls so long-lived streams cannot starve short calls, nor the other way round.
    max_streams: PositiveInt = 256
    # The most of each of those two pools one tenant may hold at once (a tenant from a verified API key or the
    # gateway's metadata; a caller with neither counts per connection): one caller cannot take every slot.
    tenant_share: float = Field(default=0.5, gt=0, le=1)
    # Every call runs under a deadline: the caller's, cut to max_s; or default_s when it sent none. Past it the call
    # is stopped and answers DEADLINE_EXCEEDED. Unary calls and streams have their own; method_deadlines overrides
    # them per method ("/aimass.v1.LlmService/Chat") or per service ("/aimass.v1.LlmService/").
    unary_deadline: DeadlineConfig = DeadlineConfig(default_s=120, max_s=900)
    stream_deadline: DeadlineConfig = DeadlineConfig(default_s=3600, max_s=4 * 3600)
    method_deadlines: dict[str, DeadlineConfig] = Field(default_factory=dict)

    max_message_bytes: PositiveInt = 16 * 1024 * 1024
    # Each stream's HTTP/2 receive window to start with (grpc's lookahead; its default is 64 KiB). On loopback or a
    # LAN grpc's bandwidth-delay probe keeps the window near that default, so a message larger than it (a photo, a
    # clip of audio) waits a WINDOW_UPDATE round trip at every hop: a 72 KB JPEG spent ~2 ms more in the gateway
    # than with 1 MiB (benchmarks/vision_batching.py, c=1). Memory stays bounded by grpc's resource quota.
    stream_window_bytes: PositiveInt = 1024 * 1024
    # On SIGTERM: report NOT_SERVING, wait drain_delay_s so routers stop sending, then give in-flight and queued
    # work up to drain_grace_s to finish before stopping.
    drain_delay_s: float = Field(default=0.5, ge=0)
    drain_grace_s: PositiveFloat = 30.0
    # One log line per RPC (method, status, latency, peer, request id) at INFO on logger "aimass.access".
    access_log: bool = True
    # Prometheus text endpoint on this port (0 = off).
    metrics_port: int = Field(default=0, ge=0, le=65535)
    # A plaintext listener serving grpc.health.v1 alone (the main port's statuses), for probes that hold no mesh
    # certificate: the kubelet's own gRPC probes (deploy/kubernetes). 0 = none.
    health_port: int = Field(default=0, ge=0, le=65535)
    # HTTP/2 hygiene. Streams one connection may have open at once (more wait in the client's transport): inside
    # the mesh a gateway multiplexes all its calls to a replica over one connection, so this is generous there.
    max_concurrent_streams: PositiveInt = 1024
    # A peer pinging more often than this (with no calls under way) gets a strike; past max_ping_strikes the
    # connection is closed (GOAWAY, ENHANCE_YOUR_CALM). Gateways ping replicas every gateway.keepalive_s.
    min_ping_interval_s: PositiveFloat = 1.0
    # 0: no limit. Inside the mesh (mTLS peers only) a gateway's keepalive pings plus grpc's own flow-control (BDP)
    # pings could pass two strikes during one long call, and the replica's GOAWAY then cost that call (seen in the
    # soak: "Too many pings" on a Transcribe); the front door keeps a limit (gateway.server).
    max_ping_strikes: int = Field(default=0, ge=0)
    # Connections idle this long are closed, and any connection is asked to go after max_connection_age_s (its
    # calls get max_connection_age_grace_s to finish); clients reconnect by themselves. 0 = never.
    max_connection_idle_s: float = Field(default=0, ge=0)
    max_connection_age_s: float = Field(default=0, ge=0)
    max_connection_age_grace_s: float = Field(default=300, ge=0)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def deadline_rules(self) -> dict[str, DeadlineConfig]:
        """method_deadlines over the mesh's own (which a config may override, e.g. a longer LoadModel)."""
        return {**MESH_INTERNAL_DEADLINES, **self.method_deadlines}


class ServesConfig(BaseModel):
    """A section with a ``server`` of its own defaults (the gateway's 4,096 in flight, speech's 32 MiB messages...).

    Settings given for part of the server (an environment variable, a TOML table) are laid over those defaults field
    by field; without this they replaced the whole server with the generic defaults (setting only the gateway's port
    used to drop its message limit to 16 MiB and its in-flight limit to 512)."""

    server: ServerConfig = ServerConfig()

    @model_validator(mode="before")
    @classmethod
    def _server_over_own_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("server"), dict):
            own = cls.model_fields["server"].default
            if isinstance(own, ServerConfig):
                data = {**data, "server": {**own.model_dump(exclude_unset=True), **data["server"]}}
        return data


class BatchingConfig(BaseModel):
    """Adaptive dynamic batching (aimass.runtime.batcher): an idle model runs a request at once; while a batch
    executes, arrivals queue and the next batch takes up to max_batch_size of them as soon as a slot frees."""

    max_batch_size: PositiveInt = 64
    # Only with max_concurrent_batches > 1: how long a free slot waits for a batch to fill while another batch
    # executes (never while the model is idle). 0 = never wait.
    max_queue_delay_ms: float = Field(default=0.0, ge=0)
    # True: the classic fixed-delay batcher instead, which waits max_queue_delay_ms for every batch to fill even
    # when the model is idle (fuller batches for a latency tax on every request).
    wait_when_idle: bool = False
    max_queue_size: PositiveInt = 2048
    max_concurrent_batches: PositiveInt = 1
    # Refuse on arrival (RESOURCE_EXHAUSTED, DEADLINE_UNMEETABLE, with a retry delay) a request whose deadline the
    # work queued ahead of it would outlast, rather than let it wait only to expire (aimass.runtime.backlog).
    refuse_unmeetable: bool = True


class ConsulConfig(BaseModel):
    """The Consul backend (registry.backend = "consul"): every process talks to its local Consul agent."""

    # The agent's HTTP API (host:port).
    address: str = "127.0.0.1:8500"
    scheme: Literal["http", "https"] = "http"
    # ACL token (X-Consul-Token); none when ACLs are off. CONSUL_HTTP_TOKEN in the environment overrides it.
    token: SecretStr | None = None
    # Empty: the agent's own datacenter.
    datacenter: str = ""
    # Each kind registers as the Consul service <prefix><kind>: aimass-nlp, aimass-gateway, ...
    service_prefix: str = Field(default="aimass-", pattern=r"^[a-z0-9][a-z0-9-]*$")
    # The agent's gRPC health check of every process (grpc.health.v1, overall status).
    check_interval_s: PositiveFloat = 5.0
    check_timeout_s: PositiveFloat = 2.0
    # Consul removes an instance whose gRPC check stayed critical this long (a crashed process); 0 = never.
    # Consul's own minimum is one minute.
    deregister_critical_after_s: float = Field(default=60.0, ge=0)
    # Blocking queries return after a change or after this long (Consul allows up to 10 minutes).
    wait_s: float = Field(default=30.0, gt=0, le=600)
    # Every non-blocking call to the agent.
    request_timeout_s: PositiveFloat = 5.0
    # Scheduler leadership: a session lock on this key. The session expires this long after its holder stops
    # renewing it (Consul allows 10 s to 24 h); the lock then stays free lock_delay_s more before a standby may take
    # it (releases on a clean shutdown hand over at once).
    leader_key: str = "aimass/scheduler/leader"
    session_ttl_s: int = Field(default=15, ge=10, le=86400)
    lock_delay_s: int = Field(default=5, ge=0, le=60)


class RegistryConfig(BaseModel):
    """Service discovery: the embedded registry (default), in the scheduler process (the control plane, behind mesh
    mTLS: never on the public port), so its address is the scheduler's; or Consul (see ``ConsulConfig``)."""

    backend: Literal["embedded", "consul"] = "embedded"
    address: str = "127.0.0.1:50041"
    # Every process renews its registration this often (a lease's keepalive, about a third of its TTL, as etcd's and
    # Consul's TTL checks are run). Only a crash waits for the TTL: a clean stop deregisters at once, and a gateway
    # notices a dead replica's connection break (or its keepalive pings go unanswered) long before.
    heartbeat_s: PositiveFloat = 3.0
    # An instance that misses heartbeats this long is dropped from the view (Consul: its TTL check goes critical).
    ttl_s: PositiveFloat = 10.0
    consul: ConsulConfig = ConsulConfig()


class HedgingConfig(BaseModel):
    """Hedged requests at the gateway (gateway/hedging.py): a unary call to a method whose rpc is marked
    ``idempotency_level = NO_SIDE_EFFECTS`` (inference, read-only queries) that has no answer after the method's
    delay is sent once more to another replica; the first success wins, the other is cancelled."""

    enabled: bool = True
    # The delay: this quantile of the method's recent attempt latencies on this gateway (p97: about 3% of calls are
    # hedged in normal running, under the budget), clamped to [min_delay_ms, max_delay_ms] (0: no cap) ...
    quantile: float = Field(default=0.97, gt=0, lt=1)
    min_delay_ms: float = Field(default=20.0, ge=0)
    max_delay_ms: float = Field(default=500.0, ge=0)
    # ... or this fixed delay for every method (0: adaptive, as above).
    delay_ms: float = Field(default=0.0, ge=0)
    # Latencies kept per method, and how many are needed before the adaptive delay is trusted (no hedge before).
    window: PositiveInt = 1000
    min_samples: PositiveInt = 50
    # The budget, per method: hedges at most this fraction of calls over time (a token bucket), plus a burst of
    # this many held in reserve for the moment a replica freezes.
    max_extra_load: float = Field(default=0.05, ge=0, le=1)
    burst: PositiveInt = 20
    # A replica holding a call past its delay that answered nothing since the call was sent (frozen?) is asked a
    # health check; one that does not answer within stall_probe_s is left out of routing while others serve until it
    # answers one (asked every stall_probe_s), and this long at most (the registry drops a replica silent for
    # registry.ttl_s). 0: never left out.
    stall_eject_s: float = Field(default=10.0, ge=0)
    stall_probe_s: PositiveFloat = 0.25

    @model_validator(mode="after")
    def _delays_ordered(self) -> HedgingConfig:
        if self.max_delay_ms and self.min_delay_ms > self.max_delay_ms:
            raise ValueError(
                f"hedging.min_delay_ms ({self.min_delay_ms}) is above hedging.max_delay_ms ({self.max_delay_ms})"
            )
        return self


class GatewayConfig(ServesConfig):
    # The front door: fewer streams per client connection, slow pings only, idle connections closed after 5
    # minutes and every connection recycled after 30 (long LLM streams get 5 more to finish).
    server: ServerConfig = ServerConfig(
        port=50051,
        max_inflight=4096,
        max_streams=2048,
        # Requests to the largest services pass through (speech and vision take 32 MiB; their replicas check the
        # documented per-field limits and say which was passed).
        max_message_bytes=32 * 1024 * 1024,
        max_concurrent_streams=256,
        min_ping_interval_s=10.0,
        max_ping_strikes=2,
        max_connection_idle_s=300,
        max_connection_age_s=1800,
    )
    # TLS on the front door (PEM files; both or neither). Clients then dial with the certificate's CA (or a public
    # one). Without them the front door is plaintext, as on a laptop or behind a TLS-terminating load balancer.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # The adapter listener (same host as server): front-door adapters (the REST process, role "rest") call here over
    # mesh mTLS, and the gateway believes the client address they pass on (gateway/auth.py). 0 picks a free port;
    # `aimass up` sets one. With mesh TLS off there is none: adapters call the public port, as any client.
    adapter_port: int = Field(default=0, ge=0, le=65535)
    # How a replica is chosen per request (gateway/router.py): "ours" scores replicas on the scheduler's view and
    # falls back to "p2c" (power of two choices on queue length) while no fresh view is at hand.
    router: Literal["round_robin", "p2c", "ours"] = "ours"
    # Retry a unary call once on another replica when the first answers UNAVAILABLE (draining, gone, cut off, or
    # without the model). A replica that died mid-call may have run part of it; inference has no side effects, so
    # running it again is safe (a method with side effects would need to opt out).
    retry_unavailable: bool = True
    # Keepalive pings on idle replica channels: a replica whose host vanished (no RST, no FIN) is noticed within
    # keepalive_s + keepalive_timeout_s, its calls fail UNAVAILABLE and unary ones are retried elsewhere, instead of
    # hanging until their deadlines. 0 turns pings off.
    keepalive_s: float = Field(default=2.0, ge=0)
    keepalive_timeout_s: PositiveFloat = 2.0
    # Poison requests: a call whose replica dies under it (the connection breaks, no answer from the replica) counts
    # a crash against the request's fingerprint (method + a hash of its bytes). A first crash may be a bystander of
    # a kill, so the call is retried once elsewhere; once poison_max_crashes distinct replicas died serving the same
    # bytes, the caller gets INTERNAL (reason POISON_REQUEST) and identical requests are refused at the gateway
    # until poison_ttl_s after the last crash. 1 would fail every bystander of a SIGKILL; 2 costs at most two
    # replicas per poison request per poison_ttl_s.
    poison_max_crashes: PositiveInt = 2
    poison_ttl_s: PositiveFloat = 600.0
    # Fingerprints remembered at most (about 300 bytes each); past it the oldest crash is forgotten first.
    poison_max_entries: PositiveInt = 10_000
    # A replica whose connection broke under a call is left out of routing this long while others serve (the
    # registry drops a dead one after registry.ttl_s); calls sent to it meanwhile that fail count no crash. 0: off.
    crash_eject_s: float = Field(default=5.0, ge=0)
    # Hedged requests for idempotent unary methods (HedgingConfig; gateway/hedging.py).
    hedging: HedgingConfig = HedgingConfig()
    # Gateway processes sharing the public and adapter ports (SO_REUSEPORT; the kernel spreads client connections
    # over them): gateway/workers.py. 1: one process. 0: one per available core, at most 4. Each worker enforces
    # 1/N of a tenant's rate and concurrency limits, so a tenant whose calls all ride one connection gets 1/N.
    workers: int = Field(default=1, ge=0, le=64)

    @model_validator(mode="after")
    def _tls_pair(self) -> GatewayConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("gateway.tls_cert and gateway.tls_key go together: set both (front door TLS) or neither")
        return self


class NlpConfig(ServesConfig):
    server: ServerConfig = ServerConfig(port=50061)
    # "auto" takes CUDA when torch sees a GPU, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_text_chars: PositiveInt = 10_000
    max_items: PositiveInt = 256
    max_labels: PositiveInt = 64
    # Characters per Classify label, and per hypothesis_template (its one "{}" is replaced by each label).
    max_label_chars: PositiveInt = 200
    max_template_chars: PositiveInt = 500
    # Characters of all texts of one request together: bounds the work (tokenising, NER) a single call can ask for.
    max_request_chars: PositiveInt = 500_000
    # The same for Entities, lower: spaCy's NER costs ~0.2 ms a token, and punctuation or emoji are a token each
    # (500,000 of them would hold the NER queue ~90 s on a busy 2-core host; 100,000 of ordinary text take ~3 s).
    max_entities_request_chars: PositiveInt = 100_000
    # Classify: texts x labels per request (each pair is a score computed and a LabelScore in the reply).
    max_classify_pairs: PositiveInt = 4096
    embed_batching: BatchingConfig = BatchingConfig()
    # Torch threads for the embedding model (0 = half the cores this process may use: model_threads).
    torch_threads: int = Field(default=0, ge=0)


def model_threads(requested: int) -> int:
    """Threads a replica's model runtime (torch, onnxruntime, CTranslate2) uses: ``requested``, or for 0 half the
    cores this process may run on (its CPU affinity), at least one.

    A mesh on one host runs a gateway, a scheduler and several replicas side by side; each library's own default
    (every core) in every process oversubscribes the cores as soon as two of them work at once, and leaves nothing
    for the gateway forwarding the busy one's traffic. Set the config key to the core count for a replica that has
    the host to itself.
    """
    if requested > 0:
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def default_vision_cache_dir() -> Path:
    return Path.home() / ".cache" / "aimass" / "vision"


class VisionConfig(ServesConfig):
    # 32 MiB messages: a request may carry several images of up to max_image_bytes each.
    server: ServerConfig = ServerConfig(port=50071, max_message_bytes=32 * 1024 * 1024)
    # "auto" takes CUDA when torch sees a GPU, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # How the classifier runs: onnxruntime (exported once, 4-6x faster than eager torch on CPU), torch (GPUs),
    # or auto (onnx on the CPU, torch on CUDA).
    backend: Literal["auto", "onnx", "torch"] = "auto"
    # Where the exported ONNX model is kept between runs.
    cache_dir: Path = Field(default_factory=default_vision_cache_dir)
    max_image_bytes: PositiveInt = 10 * 1024 * 1024
    # Decompression-bomb guard: decoded width x height.
    max_pixels: PositiveInt = 40_000_000
    min_side: PositiveInt = 8
    max_images: PositiveInt = 16
    # Sum of width x height over one request's images, read from their headers before any decoding.
    max_request_pixels: PositiveInt = 160_000_000
    # Decoded pixels in flight across all requests of the process (each image holds its pixels while it is decoded
    # and run; Pillow keeps up to 4 bytes per pixel). An image larger than this is refused outright.
    decode_pixel_budget: PositiveInt = 80_000_000
    # Images decoded and run at once (decode worker threads); a request waits for a slot and enough budget.
    decode_workers: PositiveInt = 2
    # Requests that may wait for decode slots or budget; one more is RESOURCE_EXHAUSTED.
    max_decode_queue: PositiveInt = 64
    # Longest side the face detector and OCR see: larger images are downscaled while decoding (results are given in
    # the original's pixels).
    face_max_side: PositiveInt = 1600
    ocr_max_side: PositiveInt = 2000  # RapidOCR scales to 2000 itself: more is never used
    # After an image of at least this many pixels, freed heap is handed back to the OS (glibc malloc_trim).
    trim_after_pixels: PositiveInt = 4_000_000
    classify_batching: BatchingConfig = BatchingConfig(max_batch_size=32, max_queue_size=512)
    # CPU threads for onnxruntime / torch (0 = half the cores this process may use: model_threads).
    threads: int = Field(default=0, ge=0)


class SpeechConfig(ServesConfig):
    # 32 MiB messages: a Transcribe request may carry max_audio_bytes of audio plus its envelope.
    server: ServerConfig = ServerConfig(port=50081, max_message_bytes=32 * 1024 * 1024)
    # "auto" takes CUDA when CTranslate2 sees a GPU, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # CTranslate2 threads for Whisper, and onnxruntime's for Kokoro (0 = half the cores this process may use:
    # model_threads).
    asr_threads: int = Field(default=0, ge=0)
    # Beam width for Transcribe and final stream segments; partial hypotheses always use greedy decoding.
    asr_beam_size: PositiveInt = 5
    # Where Whisper base is assembled from its two packaged halves (the site-packages folders stay untouched).
    whisper_cache_dir: str = "~/.cache/aimass/whisper-base"
    max_audio_bytes: PositiveInt = 25 * 1024 * 1024
    max_audio_seconds: PositiveFloat = 30 * 60
    max_stream_chunk_bytes: PositiveInt = 1024 * 1024
    # A live stream must send its config within stream_first_message_s and then audio (a non-empty chunk) at least
    # every stream_idle_s, or it ends DEADLINE_EXCEEDED: idle streams cannot hold a replica's stream slots.
    stream_first_message_s: PositiveFloat = 10.0
    stream_idle_s: PositiveFloat = 30.0
    # Messages one stream may send (empty chunks count too).
    max_stream_chunks: PositiveInt = 200_000
    # Backpressure: while this much received audio waits for transcription, the stream is not read (HTTP/2 flow
    # control then slows the sender) instead of buffering without bound.
    max_pending_audio_s: PositiveFloat = 30.0
    max_stream_seconds: PositiveFloat = 60 * 60
    # Streams: a partial hypothesis at most this often (seconds of new audio), a final segment at a pause of
    # stream_min_silence_s once stream_min_segment_s of audio is pending, or forced at stream_max_segment_s.
    stream_partial_interval_s: PositiveFloat = 1.0
    stream_min_segment_s: PositiveFloat = 1.5
    stream_min_silence_s: PositiveFloat = 0.4
    stream_max_segment_s: PositiveFloat = 8.0
    max_text_chars: PositiveInt = 5000
    # Synthesize sends audio in chunks of at most this many milliseconds.
    tts_chunk_ms: PositiveInt = 500
    # One sentence's synthesiser process is killed past tts_timeout_base_s + tts_timeout_per_char_s per character,
    # never more than tts_timeout_s (DEADLINE_EXCEEDED): a hung flite or espeak-ng cannot hold a stream and a process
    # forever. flite says a 300-character sentence (the longest piece) in well under a second.
    tts_timeout_s: PositiveFloat = 30.0
    tts_timeout_base_s: PositiveFloat = 5.0
    tts_timeout_per_char_s: PositiveFloat = 0.05
    # Audio decoding (Transcribe) runs in this many threads, off the event loop.
    decode_threads: PositiveInt = 2
    # Recordings being decoded or waiting for a decode thread; one more is RESOURCE_EXHAUSTED at once.
    max_decode_queue: PositiveInt = 16


def default_llm_cache_dir() -> Path:
    return Path.home() / ".cache" / "aimass" / "llm"


class LlmConfig(ServesConfig):
    # Twice the engine's capacity (max_num_seqs + max_waiting) in streams, so one tenant's share (tenant_share, half)
    # can fill the engine's queue as vLLM's own server would let it; past that the servicer answers QUEUE_FULL.
    server: ServerConfig = ServerConfig(port=50091, max_streams=768)
    # A packaged model (see services/llm/weights.py) or, with model_path, any Hugging Face model folder.
    model: str = "smollm2-135m-instruct"
    model_path: Path | None = None
    # Where packaged GGUF weights are converted once into a folder vLLM loads.
    cache_dir: Path = Field(default_factory=default_llm_cache_dir)
    # "auto" uses the GPU when vLLM was installed for CUDA, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Longest prompt + completion served (the model's own limit caps it; 0 = the model's limit).
    max_model_len: int = Field(default=4096, ge=0)
    # Sequences decoded together in one engine step (continuous batching). vLLM's own server takes 128 on a CPU;
    # a lower cap queues requests the engine could have taken (benchmarks/trace_replay.py).
    max_num_seqs: PositiveInt = 128
    # Accepted requests beyond max_num_seqs wait in the engine; past this many waiting, RESOURCE_EXHAUSTED.
    max_waiting: int = Field(default=256, ge=0)
    # Tokens one engine step takes (prompt chunks plus one per decoding sequence: chunked prefill); a long prompt is
    # prefilled over several steps so decoding sequences keep their pace. 0 = vLLM's default (2,048).
    max_num_batched_tokens: int = Field(default=0, ge=0)
    # KV-cache memory: whole GiB of RAM on the CPU (VLLM_CPU_KVCACHE_SPACE), fraction of GPU memory on CUDA.
    cpu_kv_cache_gib: PositiveInt = 1
    gpu_memory_utilization: float = Field(default=0.5, gt=0, le=1)
    # CPU cores the engine's threads bind to, e.g. "0-3" (VLLM_CPU_OMP_THREADS_BIND); empty = every core this
    # process may use (vLLM's own default is core 0 only).
    cpu_threads_bind: str = ""
    # Tokens per streamed message after the first (which always goes at once): 1 streams token by token; more cuts
    # per-message work on every hop (engine output, replica, gateway, client) when many streams run. 4 won the trace
    # replay on a CPU (benchmarks/trace_replay.py: the serving path's per-token work competes with the engine for the
    # same cores): more tokens per second and a lower tail than token by token, time to first token unchanged.
    stream_interval: PositiveInt = 4
    # max_tokens when a request leaves it 0; always capped at what the context leaves.
    default_max_tokens: PositiveInt = 512
    max_messages: PositiveInt = 256
    max_stop_sequences: PositiveInt = 4
    max_stop_chars: PositiveInt = 64
    max_prompt_chars: PositiveInt = 200_000
    # Tokenising and chat templating (Chat, Generate, CountTokens) run in this many threads, off the event loop;
    # past max_tokenize_queue prompts waiting or being tokenised, RESOURCE_EXHAUSTED.
    tokenize_threads: PositiveInt = 2
    max_tokenize_queue: PositiveInt = 64


class SchedulerConfig(ServesConfig):
    """The central scheduler: where it listens, and where everyone else finds it (empty address: no scheduler; replicas
    send no load reports and gateways route on their own counts)."""

    server: ServerConfig = ServerConfig(port=50041)
    address: str = ""
    # Node agents and replicas report this often (the scheduler's answers tell them); silent this many intervals,
    # a node or a replica's load leaves the view.
    report_interval_s: PositiveFloat = 1.0
    silent_intervals: PositiveInt = 3
    # This host's name in the mesh: replicas' load reports and the node agent's readings join on it. Empty: the
    # hostname (set it where containers on one host have different hostnames).
    node_id: str = ""
    # The node agent's Prometheus endpoint (device readings); 0 = off. Servers have theirs in server.metrics_port.
    node_agent_metrics_port: int = Field(default=0, ge=0, le=65535)
    # The most memory the models of one modality may take together on any one device, e.g. llm = "60GiB" (the LLM
    # engines' share of a GPU) or text = "2GiB" (AIMASS_SCHEDULER__MODEL_BUDGETS__TEXT=2GiB). Loading past it evicts
    # the least-recently-used idle models of that modality there. Unset: only the device's free memory limits it.
    model_budgets: dict[Literal["text", "vision", "speech", "llm"], Annotated[ByteSize, Field(gt=0)]] = Field(
        default_factory=dict
    )


class LifecycleConfig(BaseModel):
    """Tenants' own models (datasets, training jobs, versions, deployments), run by the control plane (the
    scheduler): limits that keep one tenant's data and jobs from crowding out the others."""

    # The content-addressed blob store (dataset files, trained heads). Empty: "blobs" in state_dir.
    blob_dir: Path | None = None
    # Bytes of dataset versions one tenant may keep (a second upload of the same bytes costs nothing).
    storage_quota_bytes: Annotated[ByteSize, Field(gt=0)] = ByteSize(1 << 30)
    # The largest single dataset upload.
    max_upload_bytes: Annotated[ByteSize, Field(gt=0)] = ByteSize(512 << 20)
    # Training jobs one tenant may have queued or running at once.
    max_jobs_per_tenant: PositiveInt = 8
    # A job whose trainer died is queued again this many times in all, then FAILED.
    max_attempts: PositiveInt = 2
    # Memory a job is assumed to need before one on the same base model has been measured.
    job_memory_estimate_bytes: Annotated[ByteSize, Field(gt=0)] = ByteSize(1 << 30)
    # Replicas are re-synced with the deployments this often (and at once after each change): a replica is sent its
    # part only when it changed, it failed or the replica is new; every resync_s, every replica gets it regardless.
    sync_interval_s: PositiveFloat = 2.0
    resync_s: PositiveFloat = 60.0


class TrainerConfig(ServesConfig):
    """A trainer process: runs the training jobs the scheduler places on it, one or more at a time."""

    server: ServerConfig = ServerConfig(port=50101)
    # Jobs this trainer runs at once.
    max_jobs: PositiveInt = 1
    # Where fetched dataset blobs are cached (keyed by SHA-256). Empty: "trainer-cache" in state_dir.
    cache_dir: Path | None = None
    # "auto" (GPU when NVML/torch sees one), "cpu" or "cuda".
    device: str = "auto"


class StoreConfig(BaseModel):
    """The store of tenants, API keys, the audit log and LLM token usage (aimass.store), shared by every gateway
    and the scheduler. SQLite embedded by default; PostgreSQL for several hosts."""

    # A SQLAlchemy URL, e.g. "postgresql+psycopg://aimass:PASSWORD@db:5432/aimass". Empty: the SQLite file
    # aimass.db in state_dir.
    url: SecretStr = SecretStr("")
    # Seconds a connection waits for another process's write (SQLite's busy timeout; PostgreSQL's lock wait).
    busy_timeout_s: PositiveFloat = 10.0


class AuthConfig(BaseModel):
    """API keys at the front door (the gateway): every public call carries one (``authorization: Bearer <key>``)."""

    # "off" accepts anonymous calls and trusts the x-aimass-tenant header a caller writes: throwaway development only
    # (every process logs it loudly at start).
    mode: Literal["on", "off"] = "on"
    # The admin key `aimass up` creates once (owner-only file). Empty: state_dir/admin.key.
    admin_key_file: Path | None = None
    # A key the gateway has verified is checked against the store again this often, with its tenant's limits: a
    # revocation, an expiry or a limit change takes effect on every gateway within about this long.
    refresh_s: PositiveFloat = 1.0
    # Verified keys (and unknown ones, remembered briefly so a flood of made-up keys does not reach the store)
    # kept in memory per gateway.
    max_cached_keys: PositiveInt = 100_000
    # Refused credentials are audited; the same refusal (peer, reason) is written once per this many seconds, with
    # a count, so a flood of bad keys cannot flood the store.
    audit_coalesce_s: PositiveFloat = 10.0
    # Audit events older than this are deleted (by the active scheduler, hourly).
    audit_retention_days: PositiveInt = 90


class MeshTlsConfig(BaseModel):
    """mTLS between mesh processes: every internal listener (replicas, scheduler and registry, node agents) asks for
    a certificate from the mesh's private CA and checks the caller's role; every internal call presents one."""

    # "off": plaintext inside the mesh, anyone who reaches a port may call it; throwaway development only.
    tls: Literal["on", "off"] = "on"
    # This process's certificate: <pki_dir>/<identity>.crt and .key (`aimass up` issues them; `aimass certs issue`
    # for processes started by hand). Empty identity: the process's kind.
    identity: str = ""
    # Empty: state_dir/pki.
    pki_dir: Path | None = None


class TenantsConfig(BaseModel):
    """Tenants: fair-share weights and the limits of tenants that have none of their own in the store."""

    # Fair share: tenant → weight (default 1); a tenant of weight 2 is due twice the service. A weight set with
    # `aimass tenants set NAME --weight W` (the store) takes precedence.
    weights: dict[str, PositiveFloat] = Field(default_factory=dict)
    # The highest priority a tenant's requests get unless the store says otherwise (higher asks are lowered to it).
    default_max_priority: Literal["LOW", "NORMAL", "HIGH", "CRITICAL"] = "HIGH"
    # Per-tenant state in every process (quota buckets, fair-share counters, the scheduler's usage) is bounded:
    # past this many tenants the least recently seen are let go, and tenants idle this long are forgotten.
    max_tracked: PositiveInt = 10_000
    idle_expiry_s: PositiveFloat = 600.0


class TelemetryConfig(BaseModel):
    """Traces: OpenTelemetry spans from every process that serves requests, exported over OTLP/gRPC.

    Off (no interceptor, no exporter, nothing per request) while ``otlp_endpoint`` is empty.
    """

    # The collector's OTLP gRPC receiver: "http://host:4317" or "host:4317" (plaintext), "https://host:4317" (TLS).
    otlp_endpoint: str = ""
    # Traces that start here (no sampled traceparent from the caller) are kept with this probability; a caller's
    # decision (the traceparent's sampled flag) is followed either way, so one trace is never cut in half.
    sample_ratio: float = Field(default=1.0, ge=0, le=1)
    # Finished spans are sent in batches this often (or sooner when a batch fills).
    export_interval_ms: PositiveInt = 1000
    # Bound on one export, retries included, and on the flush when the process stops: a collector that is down or
    # unreachable costs at most this, in a background thread, never a request.
    export_timeout_s: PositiveFloat = 2.0
    # Spans waiting for export beyond this are dropped (a collector that is down cannot grow memory).
    max_queued_spans: PositiveInt = 4096

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint_form(cls, value: str) -> str:
        value = value.strip()
        if not value:
            return value
        scheme, separator, rest = value.rpartition("://")
        if separator and scheme not in ("http", "https"):
            raise ValueError(f"otlp_endpoint {value!r}: use http://host:port, https://host:port or host:port")
        host, colon, port = rest.rstrip("/").rpartition(":")
        if not colon or not host or not port.isdigit():
            raise ValueError(f"otlp_endpoint {value!r} needs a host and a port, e.g. http://otel-collector:4317")
        return value


class RestConfig(BaseModel):
    """The OpenAI-compatible REST front door (gateway/rest): its own process, a gRPC client of the gateway that
    passes each caller's API key along, so auth, quotas, priorities, routing and tracing are the gateway's."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Its Prometheus metrics (gateway/rest/metrics.py), on a port of their own on rest.host; 0 = off.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    # The gateway it calls (host:port; a remote one too). With mesh TLS on: the gateway's adapter listener, dialled
    # over mTLS with this process's "rest" certificate; empty: 127.0.0.1:gateway.adapter_port. With mesh TLS off: its
    # public port (empty: 127.0.0.1:gateway.server.port), and every REST caller looks to the gateway like this process.
    gateway: str = ""
    # With mesh TLS off, the CA (PEM) to verify the gateway's TLS certificate with, when the front door has TLS
    # (gateway.tls_cert); unset there: the system's roots.
    gateway_ca: Path | None = None
    # Largest JSON body (a 200,000-character prompt fits several times over), and largest multipart upload
    # (audio files: OpenAI's own limit). Past either: 413 before the body is read on.
    max_body_bytes: Annotated[ByteSize, Field(gt=0)] = ByteSize(8 << 20)
    max_upload_bytes: Annotated[ByteSize, Field(gt=0)] = ByteSize(25 << 20)
    # Deadline of each call to the gateway (streams included); 0: the gateway's own defaults.
    request_timeout_s: float = Field(default=600.0, ge=0)
    # On SIGTERM, requests in flight (streams too) get this long to finish.
    drain_grace_s: PositiveFloat = 30.0


class AssistantConfig(BaseModel):
    """AssistantService (gateway/assistant): the voice assistant the gateway serves, and its sessions."""

    # A session expires this long after its last turn.
    session_ttl_s: PositiveFloat = 24 * 3600.0
    # A session's messages are kept within this many characters (oldest turns dropped first).
    max_session_chars: PositiveInt = 20_000
    max_sessions_per_tenant: PositiveInt = 1000
    # The system prompt of a session that sets none.
    default_system_prompt: str = (
        "You are a helpful voice assistant. Answer in one or two short sentences, in plain words that read well aloud."
    )
    # Limits on what a caller sends: a text turn or system prompt, one chunk of microphone audio.
    max_text_chars: PositiveInt = 4000
    max_audio_chunk_bytes: PositiveInt = 1024 * 1024
    # The first message (the config) must come within this long.
    config_timeout_s: PositiveFloat = 10.0


class ScenariosConfig(BaseModel):
    """ScenarioService (gateway/scenarios): composed pipelines the gateway runs."""

    # A scenario's YAML source, at most.
    max_source_bytes: PositiveInt = 64 * 1024
    # Scenarios a tenant may store.
    max_per_tenant: PositiveInt = 100
    # Steps in one scenario.
    max_steps: PositiveInt = 32
    # More shipped scenarios (every tenant sees them): a folder of *.yaml files an operator adds.
    directory: Path | None = None


class ConsoleConfig(BaseModel):
    """The web console (gateway/console): its own process serving the pages and a JSON API that calls the gateway
    with each user's own key, exactly as the REST front door does (the same adapter hop, a "console" certificate)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # The gateway it calls; empty: as rest.gateway (the adapter listener with mesh TLS on, else the public port).
    gateway: str = ""
    # Where users reach the gateway and the REST front door, for the pages' code samples (grpcurl, Python, curl);
    # empty: 127.0.0.1 with gateway.server.port and rest.port.
    public_gateway: str = ""
    public_rest: str = ""
    # Largest dataset upload through the console (streamed to DatasetService in chunks, never held whole).
    max_dataset_bytes: Annotated[ByteSize, Field(gt=0)] = ByteSize(256 << 20)
    # On SIGTERM, requests in flight (chat streams too) get this long to finish; live views (WatchCluster,
    # WatchTraining) are cut then, and the pages reconnect.
    drain_grace_s: PositiveFloat = 30.0


class AutoscaleServiceConfig(BaseModel):
    """One service's bounds under `aimass up --autoscale`; 0 takes the general setting."""

    # Floor; 0: the replicas `aimass up` starts (--<kind>-replicas). A service never goes to zero.
    min_replicas: int = Field(default=0, ge=0)
    # Ceiling; 0: autoscale.max_replicas.
    max_replicas: int = Field(default=0, ge=0)
    # 0: autoscale.target_in_flight.
    target_in_flight: float = Field(default=0.0, ge=0)


class AutoscaleConfig(BaseModel):
    """`aimass up --autoscale` (aimass.autoscale): replica processes per service follow the calls in flight per
    replica (the scheduler's view), up after ``scale_up_after_s`` above the target, down after
    ``scale_down_after_s`` with everything fitting in one replica fewer under ``scale_down_below`` of the target."""

    enabled: bool = False
    max_replicas: PositiveInt = 4
    # Calls in flight (admitted, queued included) per serving replica above which one more is started.
    target_in_flight: PositiveFloat = 8.0
    scale_up_after_s: float = Field(default=3.0, ge=0)
    scale_down_after_s: float = Field(default=60.0, ge=0)
    # The hysteresis band: between this fraction of the target and the target, nothing changes.
    scale_down_below: float = Field(default=0.5, gt=0, lt=1)
    # How often it decides.
    interval_s: PositiveFloat = 0.5
    # Per service kind (nlp, vision, speech, llm), e.g. AIMASS_AUTOSCALE__SERVICES='{"nlp": {"max_replicas": 3}}'.
    services: dict[str, AutoscaleServiceConfig] = Field(default_factory=dict)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AIMASS_", env_nested_delimiter="__", extra="ignore")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # The mesh's state on this host (store, admin key, CA and certificates); AIMASS_STATE_DIR.
    state_dir: Path = Field(default_factory=default_state_dir)
    store: StoreConfig = StoreConfig()
    auth: AuthConfig = AuthConfig()
    mesh: MeshTlsConfig = MeshTlsConfig()
    tenants: TenantsConfig = TenantsConfig()
    registry: RegistryConfig = RegistryConfig()
    gateway: GatewayConfig = GatewayConfig()
    nlp: NlpConfig = NlpConfig()
    vision: VisionConfig = VisionConfig()
    speech: SpeechConfig = SpeechConfig()
    llm: LlmConfig = LlmConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    lifecycle: LifecycleConfig = LifecycleConfig()
    trainer: TrainerConfig = TrainerConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    rest: RestConfig = RestConfig()
    console: ConsoleConfig = ConsoleConfig()
    autoscale: AutoscaleConfig = AutoscaleConfig()
    assistant: AssistantConfig = AssistantConfig()
    scenarios: ScenariosConfig = ScenariosConfig()

    @property
    def store_url(self) -> str:
        return self.store.url.get_secret_value() or f"sqlite:///{self.state_dir / 'aimass.db'}"

    @property
    def blob_dir(self) -> Path:
        return self.lifecycle.blob_dir or self.state_dir / "blobs"

    @property
    def trainer_cache_dir(self) -> Path:
        return self.trainer.cache_dir or self.state_dir / "trainer-cache"

    @property
    def rest_gateway(self) -> str:
        """The gateway the REST front door calls."""
        if self.rest.gateway:
            return self.rest.gateway
        port = self.gateway.adapter_port if self.mesh.tls == "on" else self.gateway.server.port
        return f"127.0.0.1:{port}"

    @property
    def console_gateway(self) -> str:
        """The gateway the console calls: its own setting, else the REST front door's."""
        return self.console.gateway or self.rest_gateway

    @property
    def admin_key_file(self) -> Path:
        return self.auth.admin_key_file or self.state_dir / "admin.key"

    @property
    def pki_dir(self) -> Path:
        return self.mesh.pki_dir or self.state_dir / "pki"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


def load_settings() -> Settings:
    return Settings()
