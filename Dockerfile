# paramserve: the gRPC server in an image. Builds on any Docker host:
#   docker build -t paramserve .
#   docker run -d -p 127.0.0.1:8001:8001 -v paramserve-data:/data paramserve
# Build arguments:
#   BASE_IMAGE       the Python base (default python:3.11-slim); a CUDA runtime image with
#                    Python 3.10+ for GPU hosts, together with TORCH_INDEX_URL below
#   TORCH_VERSION    default 2.13.0
#   TORCH_INDEX_URL  where the torch wheel comes from: the CPU build by default; set it to a
#                    CUDA wheel index for GPU hosts, or to "" to take torch from pip's own config
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PARAMSERVE_DATA_DIR=/data \
    PARAMSERVE_LISTEN=0.0.0.0:8001 \
    PARAMSERVE_METRICS_LISTEN=0.0.0.0:8002 \
    PARAMSERVE_SERVER=127.0.0.1:8001

COPY . /tmp/paramserve-src

# One layer: torch, the project, its generated gRPC code, a non-root user; no sources, no caches.
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        "torch==${TORCH_VERSION}" /tmp/paramserve-src \
 && python -m paramserve.protos \
 && rm -rf /tmp/paramserve-src /root/.cache \
 && useradd --system --uid 10001 --no-create-home --home-dir /data paramserve \
 && mkdir -p /data && chown paramserve:paramserve /data

USER paramserve
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8001 8002

HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["paramserve", "health"]

# The server is PID 1, so `docker stop`'s SIGTERM reaches it and it stops gracefully.
ENTRYPOINT ["paramserve", "serve"]
