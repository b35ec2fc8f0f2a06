# syntax=docker/dockerfile:1
# The onesignal-bridge image: the Helm chart's default image (helm/onesignal-bridge/values.yaml).
#
#   docker build -t ghcr.io/onesignal-bridge/onesignal-bridge:0.1.0 .
#   docker run --rm ghcr.io/onesignal-bridge/onesignal-bridge:0.1.0 run --config /etc/onesignal-bridge/config.yaml
#
# Stage 1 installs the package and its dependencies (all prebuilt wheels: psycopg[binary] with
# libpq, confluent-kafka with librdkafka) into a virtualenv; stage 2 copies only that virtualenv
# onto the slim base and runs as an unprivileged user with a read-only root filesystem in mind
# (bytecode precompiled, nothing written at run time).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bridge ./bridge
RUN pip install . \
 && python -m compileall -q /opt/venv/lib \
 && onesignal-bridge --version

FROM python:3.11-slim AS runtime
LABEL org.opencontainers.image.title="onesignal-bridge" \
      org.opencontainers.image.description="Stream Postgres and Debezium/Kafka changes into OneSignal users" \
      org.opencontainers.image.source="https://github.com/onesignal-bridge/onesignal-bridge" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 bridge \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin bridge
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
# /metrics, /healthz, /readyz (metrics.port)
EXPOSE 9464
ENTRYPOINT ["onesignal-bridge"]
CMD ["--help"]
