# clipservice: the HTTP API with its in-process job runner (or `worker` in the
# distributed mode). FFmpeg comes inside the imageio-ffmpeg wheel, so the image
# needs no system packages beyond the slim Python base.
#
#   docker build -t clipservice .
#   docker run -p 8080:8080 -v clipdata:/data --stop-timeout 40 clipservice

# ---- build: a wheel of the project and its dependencies in a venv ----------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /venv
COPY pyproject.toml README.md ./
COPY src ./src
RUN /venv/bin/pip install --no-cache-dir .

# ---- run: the venv only, as a non-root user ---------------------------------
FROM python:3.11-slim
ENV PATH=/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CLIPSERVICE_SERVER__HOST=0.0.0.0 \
    CLIPSERVICE_SERVER__PORT=8080 \
    CLIPSERVICE_STORAGE__DATA_DIR=/data
COPY --from=build /venv /venv
RUN groupadd --system --gid 10001 clipservice \
    && useradd --system --uid 10001 --gid 10001 --home-dir /data --no-create-home clipservice \
    && mkdir -p /data \
    && chown 10001:10001 /data
WORKDIR /data
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8080

# Liveness on /healthz, on whatever port the environment configures.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CLIPSERVICE_SERVER__PORT', '8080'), timeout=2)"]

# Exec form: the server is PID 1 itself (no shell in between), so `docker stop`'s
# SIGTERM reaches it and starts the graceful drain (server.shutdown_grace_s, 30 s by
# default: keep `--stop-timeout` above it). It reaps its own FFmpeg children.
STOPSIGNAL SIGTERM
ENTRYPOINT ["clipservice"]
CMD ["serve"]
