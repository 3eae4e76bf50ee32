# paramserve: the gRPC server in an image. Builds on any Docker host:
#   docker build -t paramserve .
#   docker run -d -p 127.0.0.1:8000:8000 -p 127.0.0.1:8001:8001 -p 127.0.0.1:8002:8002 \
#       -v paramserve-data:/data paramserve
# Build arguments:
#   BASE_IMAGE       a base that has Python 3.11+ and pip (default python:3.11-slim). For GPU
#                    hosts a PyTorch CUDA runtime image, which already holds torch (nvidia/cuda
#                    runtime images have no Python):
#                      --build-arg BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
#                      --build-arg TORCH_INDEX_URL=
#   TORCH_VERSION    default 2.13.0, the version pyproject.toml pins
#   TORCH_INDEX_URL  where the torch wheel comes from: the CPU build by default; "" takes torch
#                    from pip's own configuration (or keeps the base's, when its version matches)
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# PARAMSERVE_GRACE_S stays below `docker stop`'s 10 s, so in-flight requests are cut by the
# server itself, which then closes the store, rather than by the SIGKILL that follows.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PARAMSERVE_DATA_DIR=/data \
    PARAMSERVE_LISTEN=0.0.0.0:8001 \
    PARAMSERVE_HTTP_LISTEN=0.0.0.0:8000 \
    PARAMSERVE_METRICS_LISTEN=0.0.0.0:8002 \
    PARAMSERVE_SERVER=127.0.0.1:8001 \
    PARAMSERVE_GRACE_S=8

# Layers from the one that changes least: torch (0.75 GB), then the other dependencies as
# pyproject.toml lists them, then the sources. A source change rebuilds only the last one.
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
 && useradd --system --uid 10001 --no-create-home --home-dir /data paramserve \
 && mkdir -p /data && chown paramserve:paramserve /data

COPY pyproject.toml /tmp/paramserve-deps/pyproject.toml
RUN python -c "import tomllib; \
print('\n'.join(tomllib.load(open('/tmp/paramserve-deps/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/paramserve-deps/requirements.txt \
 && pip install -r /tmp/paramserve-deps/requirements.txt \
 && rm -rf /tmp/paramserve-deps /root/.cache

COPY . /tmp/paramserve-src
RUN pip install /tmp/paramserve-src && rm -rf /tmp/paramserve-src /root/.cache

USER paramserve
WORKDIR /data
VOLUME ["/data"]
# 8000 KServe v2 HTTP/REST, 8001 gRPC (inference, registry, health), 8002 Prometheus metrics.
EXPOSE 8000 8001 8002

HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["paramserve", "health"]

# The server is PID 1, so `docker stop`'s SIGTERM reaches it and it stops gracefully.
ENTRYPOINT ["paramserve", "serve"]
