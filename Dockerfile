# syntax=docker/dockerfile:1
# marketd: the daemon image. Two stages: `build` installs marketd and its runtime dependencies into
# a virtualenv (every dependency ships manylinux wheels, librdkafka included, so no compiler);
# the final stage copies only that virtualenv onto a slim Python base and runs as a non-root user.
#
#   docker build -t marketd .
#   docker run --rm -p 127.0.0.1:8000:8000 --stop-timeout 40 \
#     -e KAFKA_BOOTSTRAP_SERVERS=kafka.example:9092 -e REDIS_URL=redis://redis.example:6379/0 marketd
#
# Configuration: environment variables alone (they override the image's /etc/marketd/marketd.toml,
# which only sets container defaults), or mount your own file over /etc/marketd/marketd.toml.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/marketd
WORKDIR /src
# Only what the package needs: pyproject.toml, the README it names, and the code.
COPY pyproject.toml README.md ./
COPY marketd ./marketd
RUN /opt/marketd/bin/pip install --no-cache-dir . \
    && /opt/marketd/bin/marketd --help >/dev/null

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="marketd" \
      org.opencontainers.image.description="Binance market data: WebSocket -> Kafka -> Redis -> HTTP" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed uid/gid so mounted volumes and Kubernetes securityContext can name it.
RUN groupadd --system --gid 10001 marketd \
    && useradd --system --uid 10001 --gid marketd --no-create-home \
       --home-dir /var/lib/marketd --shell /usr/sbin/nologin marketd \
    && install -d -o marketd -g marketd -m 0750 /var/lib/marketd /var/lib/marketd/spool
COPY --from=build /opt/marketd /opt/marketd
COPY deploy/docker/marketd.toml /etc/marketd/marketd.toml
ENV PATH=/opt/marketd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The working directory holds the Kafka-outage spool (spool.dir) and an optional .env; mount a
# volume on /var/lib/marketd/spool so spooled records survive a container replacement.
WORKDIR /var/lib/marketd
USER 10001:10001
EXPOSE 8000
# marketd is PID 1 (exec form, no shell): SIGTERM starts the graceful drain (stop reading, flush
# Kafka, exit 0). Give it more than shutdown.drain_timeout_s (15 s) before the runtime's SIGKILL:
# `docker run --stop-timeout 40`, compose stop_grace_period.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["marketd", "health", "--config", "/etc/marketd/marketd.toml", "--timeout", "2"]
ENTRYPOINT ["marketd"]
CMD ["run", "--config", "/etc/marketd/marketd.toml"]
