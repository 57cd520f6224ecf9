# syntax=docker/dockerfile:1
# batchline: an ONNX inference server speaking the Open Inference Protocol (KServe V2) over gRPC and REST.
#
#   docker build -t batchline .                                   # the serving image (last stage)
#   docker build -t batchline-demo-models --target demo-models .  # trains the demo registry
#   docker run -p 8000:8000 -p 8001:8001 -p 8002:8002 -v REGISTRY:/var/lib/batchline/registry:ro batchline
#
# Configuration: /etc/batchline/batchline.toml (deploy/batchline.toml; mount your own over it),
# then BATCHLINE_* environment variables. The final image holds the wheel and its serving
# dependencies only: no compiler, no scikit-learn, no test or dev tools.

# ---- build: the wheel, from the same files `pip install .` reads ----------------------------
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server/ server/
COPY registry_client/ registry_client/
COPY loadtest/ loadtest/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- base: the non-root user and the folders it owns, shared by the stages below ------------
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it and volumes can be chowned.
RUN groupadd --system --gid 10001 batchline \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/batchline \
        --no-create-home --shell /usr/sbin/nologin batchline \
    && install -d -o 10001 -g 10001 /var/lib/batchline /var/lib/batchline/registry
WORKDIR /var/lib/batchline

# ---- demo-models: trains churn / churn_mlp into a file registry (compose's `models` job) -----
# Not part of the serving image: it is the only stage with the `train` extra (scikit-learn).
FROM base AS demo-models
RUN --mount=type=bind,from=build,source=/wheels,target=/tmp/wheels \
    pip install --no-cache-dir "$(echo /tmp/wheels/batchline-*.whl)[train]"
USER 10001:10001
ENTRYPOINT ["batchline", "models", "build-demo", "--registry", "/var/lib/batchline/registry"]

# ---- runtime: the serving image (default target) ---------------------------------------------
FROM base AS runtime
RUN --mount=type=bind,from=build,source=/wheels,target=/tmp/wheels \
    pip install --no-cache-dir "$(echo /tmp/wheels/batchline-*.whl)[import]"
COPY deploy/batchline.toml /etc/batchline/batchline.toml
USER 10001:10001
# gRPC (inference + grpc.health.v1), Prometheus metrics.
EXPOSE 8000 8001 8002
# The same command serves as Kubernetes' exec probe where native gRPC probes are off.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["batchline", "health", "--address", "127.0.0.1:8001", "--timeout", "3"]
ENTRYPOINT ["batchline", "serve", "--config", "/etc/batchline/batchline.toml"]
