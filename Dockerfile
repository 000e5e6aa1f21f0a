# clipservice: API + in-process job runner (or `worker` for the distributed mode).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    CLIPSERVICE_SERVER__HOST=0.0.0.0 \
    CLIPSERVICE_SERVER__PORT=8080 \
    CLIPSERVICE_STORAGE__DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /app clipservice \
    && mkdir -p /data \
    && chown clipservice /data

USER clipservice
VOLUME ["/data"]
EXPOSE 8080

HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2); sys.exit(0)"]

# Exec form: the server is PID 1's direct child-free process and receives SIGTERM itself.
ENTRYPOINT ["clipservice"]
CMD ["serve"]
