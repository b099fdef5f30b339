# pollguard: slim image, non-root, package installed from this source tree.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install . && rm -rf /src

RUN useradd --system --uid 10001 --no-create-home pollguard
COPY config.yaml /etc/pollguard/config.yaml
USER pollguard
WORKDIR /

EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/-/health', timeout=2).status == 200 else 1)"]

# Exec form: pollguard is PID 1 and receives SIGTERM itself; uvicorn stops accepting, lets
# in-flight requests finish (server.shutdown_timeout, 30 s by default), then closes the upstream
# pool. Give it longer than that before SIGKILL: `docker stop --time 35`, or
# terminationGracePeriodSeconds: 35 in Kubernetes.
STOPSIGNAL SIGTERM
CMD ["pollguard", "serve", "--config", "/etc/pollguard/config.yaml", "--host", "0.0.0.0", "--port", "8080"]
