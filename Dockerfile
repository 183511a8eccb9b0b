# syntax=docker/dockerfile:1
# EfficientAI's OpenAI-compatible server (`efficientai serve`) on Linux CPU: MLX bound to Debian's OpenBLAS, the
# locked environment (uv.lock), and the zoo's model fetched at build time, so the container starts offline.
#   docker compose up --build -d && curl -s localhost:8000/health
# Checked without Docker by tests/test_container.py: hadolint + our checks, and these same steps run in a folder
# (efficientai.deploy.container.build_outside_docker). Apple-GPU serving runs natively, not here: a container on
# macOS runs in a Linux VM that has no Metal.

# The same Debian as the machines the toolkit is tested on; uv pinned to the version that wrote uv.lock.
ARG DEBIAN_TAG=12.11-slim
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# ---- build: the locked environment and the model, made with network access ----
FROM debian:${DEBIAN_TAG} AS build
# Debian stable only ships security fixes within a release, and its archive keeps only the newest build of each
# package, so exact apt versions would break the build at the next point release; the base tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates libopenblas0-pthread \
 && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON=/usr/bin/python3 UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv EFFICIENTAI_CACHE=/app/cache
# Bytecode compiled now, since the server's user can't write it at run time (0: a faster build, a slower start);
# files copied from uv's cache mount, another file system (hardlink: faster where the cache is on the same one).
ARG UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy
WORKDIR /app
# Dependencies first (their layer survives code changes), then the toolkit itself, installed (not editable).
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv uv sync --frozen --no-dev --no-install-project
COPY efficientai ./efficientai
RUN --mount=type=cache,target=/root/.cache/uv uv sync --frozen --no-dev --no-editable
# The zoo entries the server loads, built into the cache now: the default model and the /v1/embeddings model.
# The zoo keeps its folders private to whoever built them (0700): open them to the server's user, read-only.
ARG ZOO="smollm2-135m-instruct all-minilm-l6-v2"
RUN .venv/bin/efficientai zoo fetch ${ZOO} && chmod -R a+rX /app/cache

# ---- runtime: Python, OpenBLAS, the environment and the cache; no uv, no network needed ----
FROM debian:${DEBIAN_TAG}
# gcc: quantized models run on the quantization chapter's CPU kernels, compiled on first use for the CPU the container
# runs on (-march=native) into /app/cache/kernels, the one folder of the cache the server's user may write.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libopenblas0-pthread gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --no-log-init --uid 10001 --user-group --create-home efficientai \
 && mkdir -p /data /app/cache/kernels && chown 10001:10001 /data /app/cache/kernels
# Same paths as in the build stage: the environment's scripts name /app/.venv/bin/python.
COPY --from=build /app/.venv /app/.venv
COPY --from=build /app/cache /app/cache
COPY settings.ini /app/settings.ini
ENV PATH=/app/.venv/bin:$PATH EFFICIENTAI_CACHE=/app/cache EFFICIENTAI_CONFIG=/app/settings.ini \
    HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MODEL=smollm2-135m-instruct HOST=0.0.0.0 PORT=8000 SERVE_ARGS=""
# The toolkit loads OpenBLAS itself before MLX (efficientai.backend): fail the build if it would not find it.
RUN python -c "import sys, efficientai.backend as b; s = b.blas_status; print('BLAS', s.how, s.path); sys.exit(not s.fast)"
# /data: the server's folder, the user's own; compose mounts ./runs at /data/runs (read-only) for adapters and models.
WORKDIR /data
USER 10001:10001
EXPOSE 8000
# /health needs no API key; python is in the image, curl is not.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 CMD ["python", "-c", \
"import os, sys, urllib.request as u; \
r = u.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/health', timeout=4); sys.exit(r.status != 200)"]
# sh -c so that $MODEL, $HOST, $PORT and $SERVE_ARGS (more flags) come from the environment (the server reads
# EFFICIENTAI_API_KEY itself); exec so that the server replaces the shell and gets `docker stop`'s SIGTERM (graceful).
CMD ["sh", "-c", "exec efficientai serve \"$MODEL\" --host \"$HOST\" --port \"$PORT\" $SERVE_ARGS"]
