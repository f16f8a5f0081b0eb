# syntax=docker/dockerfile:1
# The Agora host with the shop's components and plugins.production.toml:
# `docker compose up --build` (compose.yaml) runs it beside PostgreSQL,
# Redis and Kafka. Reference: README.md, "Running with compose".

FROM rust:1-bookworm AS build
RUN rustup target add wasm32-wasip2
WORKDIR /src
COPY . .
# target/ is a cache mount (kept between builds, so a rebuild is incremental)
# and is not part of the image: what the runtime needs is copied out to /out
# in the same step. The release profile's line tables would make the binary
# five times larger; without them backtraces still name functions. Each
# component goes to the path plugins.production.toml names, so the two
# cannot disagree.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    set -eu; \
    scripts/build-components; \
    cargo build --release --locked -p agora-host; \
    mkdir -p /out/app; \
    strip --strip-debug -o /out/agora target/release/agora; \
    wasm=$(sed -n 's/^wasm = "\(.*\)"$/\1/p' plugins.production.toml); \
    test -n "$wasm" || { echo "plugins.production.toml names no component (wasm = ...)" >&2; exit 1; }; \
    cp --parents $wasm /out/app/

FROM debian:bookworm-slim
# curl: for the health check, and for an operator's calls to /readyz and the
# admin API from inside the container.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --home-dir /var/lib/agora --shell /usr/sbin/nologin agora \
    && mkdir -p /var/lib/agora \
    && chown agora:agora /var/lib/agora
WORKDIR /opt/agora
COPY --from=build /out/agora /usr/local/bin/agora
COPY --from=build /out/app/ ./
COPY plugins.production.toml ./
COPY docs/openapi.json docs/
# Listeners on every interface: inside a container, loopback is reachable
# from nowhere else. AGORA_CONFIG lets the CLI find the host's admin API and
# token under `docker compose exec agora agora ...` without flags.
ENV AGORA_LISTEN=0.0.0.0:8080 \
    AGORA_ADMIN_LISTEN=0.0.0.0:8081 \
    AGORA_DATA_DIR=/var/lib/agora \
    AGORA_CONFIG=/opt/agora/plugins.production.toml
USER agora
# Fails the build if a component the production file names is missing or
# does not load (on the embedded backends: no server is contacted).
RUN agora check --config plugins.production.toml
# Compiled code, the token signing key and the admin token.
VOLUME /var/lib/agora
EXPOSE 8080 8081
# Alive: the host answers once its components are loaded. Not /readyz: a
# backend outage is ridden out by the host (the outbox keeps events while
# the broker is down), and restarting it would not end the outage.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD curl -fsS -o /dev/null http://127.0.0.1:8080/healthz || exit 1
CMD ["agora", "up", "--config", "plugins.production.toml"]
