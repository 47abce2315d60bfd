# stream-knn worker image: `docker build -t stream-knn .`, then `docker run stream-knn worker`.
# The same image runs every subcommand (topics apply, produce, tail, ...): the entrypoint is
# the `stream-knn` CLI and the default command is the worker.

# --- build: compile wheels (annoy ships no wheels and needs a C++ compiler) ---------------
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Metadata first so the dependency layer is cached while only the code changes.
COPY pyproject.toml README.md ./
COPY stream_knn ./stream_knn
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime: no compiler, non-root ------------------------------------------------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STREAM_KNN_DATA_DIR=/data \
    STREAM_KNN_KAFKA__TOPICS_DIR=/app/topics \
    STREAM_KNN_WORKER__WEB_HOST=0.0.0.0 \
    STREAM_KNN_WEB_PORT=6066
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels stream-knn
RUN groupadd --system --gid 10001 stream-knn \
    && useradd --system --uid 10001 --gid stream-knn --home-dir /app --shell /usr/sbin/nologin stream-knn \
    && mkdir -p /app /data \
    && chown stream-knn:stream-knn /app /data
WORKDIR /app
COPY --chown=stream-knn:stream-knn topics ./topics
USER stream-knn
VOLUME ["/data"]
EXPOSE 6066
# slim images have no curl; the standard library is enough. Port follows STREAM_KNN_WEB_PORT.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('STREAM_KNN_WEB_PORT', '6066'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["stream-knn"]
CMD ["worker"]
