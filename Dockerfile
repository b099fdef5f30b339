# pollguard: slim image, non-root, dependencies pinned by hash.
#
#   docker build -t pollguard:0.2.0 .
#   docker run --rm -p 8080:8080 -e POLLGUARD_UPSTREAM=http://backend:5000 pollguard:0.2.0
#
# requirements.lock pins every runtime dependency with its hashes; after changing the
# dependencies in pyproject.toml, regenerate it with (pip-tools ≥ 7, on Python 3.11):
#   pip-compile --generate-hashes --allow-unsafe --strip-extras --no-header \
#     --no-emit-index-url --no-emit-find-links --build-deps-for=wheel \
#     --output-file=requirements.lock pyproject.toml
# (the build backend, setuptools, is pinned too: the package is built without build isolation).
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies first, in a layer of their own: a change to pollguard's source does not
# reinstall them.
COPY requirements.lock /tmp/requirements.lock
RUN pip install --require-hashes --no-deps -r /tmp/requirements.lock && rm /tmp/requirements.lock

WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY proxy ./proxy
# The build backend (setuptools) is in the lock too: no unpinned download here.
RUN pip install --no-deps --no-build-isolation . && rm -rf /src

RUN useradd --system --uid 10001 --user-group --no-create-home pollguard
COPY config.yaml /etc/pollguard/config.yaml
ENV POLLGUARD_CONFIG=/etc/pollguard/config.yaml
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /

EXPOSE 8080
# Port, admin prefix and scheme come from the same config `serve` reads (POLLGUARD_CONFIG).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["pollguard", "healthcheck"]

# pollguard is PID 1 and receives SIGTERM itself: uvicorn stops accepting, lets in-flight
# requests finish (server.shutdown_timeout, 30 s by default), closes open WebSockets with 1001,
# then closes the upstream pool. Give it longer than that before SIGKILL: `docker stop --time
# 35`, `stop_grace_period: 35s` in Compose, terminationGracePeriodSeconds ≥ 35 in Kubernetes.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pollguard"]
# Inside a container the port must be reachable from outside it; the port itself is
# server.port (8080 unless the config says otherwise).
CMD ["serve", "--host", "0.0.0.0"]
