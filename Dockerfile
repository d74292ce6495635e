# syntax=docker/dockerfile:1.7
# The crl image: every role by subcommand (crl replay | learner | actor | evaluate), as the
# manifests in k8s/ run it. Two variants from one file:
#   docker build -t ghcr.io/crl-scale/crl:0.1.0-cpu .
#   docker build --build-arg JAX_VARIANT=cuda12 -t ghcr.io/crl-scale/crl:0.1.0-cuda12 .
# Python dependencies are exactly uv.lock (uv sync --frozen); the cuda12 variant syncs the lock's
# `cuda` extra too: the CUDA 12 build of the same JAX (the jax-cuda12 PJRT plugin and NVIDIA's
# CUDA 12.6 / cuDNN 9.5 wheels, every one pinned in uv.lock). GPU nodes need an NVIDIA driver
# >= 560 (CUDA 12.6).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG UV_VERSION=0.13.9
ARG JAX_VARIANT=cpu
# More of the lock's extras, by name (e.g. --build-arg EXTRAS=wandb for W&B logging in pods).
ARG EXTRAS=""
ENV UV_PROJECT_ENVIRONMENT=/opt/crl/venv \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy
RUN pip install --no-cache-dir "uv==${UV_VERSION}"
WORKDIR /src

# 1. The locked third-party set (this layer is rebuilt only when the lock changes); the variant
#    and EXTRAS pick the lock's extras.
COPY pyproject.toml uv.lock ./
RUN case "${JAX_VARIANT}" in \
      cpu) echo "" > /opt/uv-extras ;; \
      cuda12) echo "--extra cuda" > /opt/uv-extras ;; \
      *) echo "JAX_VARIANT must be cpu or cuda12, got '${JAX_VARIANT}'" >&2; exit 1 ;; \
    esac \
 && for extra in ${EXTRAS}; do printf ' --extra %s' "${extra}" >> /opt/uv-extras; done
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project $(cat /opt/uv-extras)

# 2. The project itself, installed (not editable): the runtime stage copies only the venv.
COPY README.md ./
COPY app ./app
COPY crl ./crl
COPY actors ./actors
COPY learner ./learner
COPY replay ./replay
COPY evaluator ./evaluator
COPY params ./params
COPY protos ./protos
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable $(cat /opt/uv-extras) \
 && /opt/crl/venv/bin/crl --help > /dev/null

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG JAX_VARIANT=cpu
LABEL org.opencontainers.image.title="crl" \
      org.opencontainers.image.description="Distributed deep residual Contrastive RL: replay, learner, actor and evaluator roles" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.crl.jax-variant="${JAX_VARIANT}"
# A fixed non-root user; k8s/ runs the pods with the same uid/gid (runAsUser: 10001).
RUN groupadd --system --gid 10001 crl \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/crl --create-home \
      --shell /usr/sbin/nologin crl
COPY --from=build /opt/crl/venv /opt/crl/venv
ENV PATH=/opt/crl/venv/bin:${PATH} \
    HOME=/home/crl \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2
WORKDIR /home/crl
USER 10001:10001
# Ports the roles open (service.* in the config): replay gRPC, params gRPC, /metrics.
EXPOSE 18000 18001 9100
ENTRYPOINT ["crl"]
CMD ["--help"]
