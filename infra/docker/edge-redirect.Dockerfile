# syntax=docker/dockerfile:1
# edge-redirect. Build from the repository root:
#   docker build -f infra/docker/edge-redirect.Dockerfile -t shortener/edge-redirect .

# cargo-chef splits the build so that dependencies are compiled in their own
# layer, rebuilt only when a Cargo.toml or Cargo.lock changes.
FROM rust:1-bookworm AS chef
RUN apt-get update \
    && apt-get install -y --no-install-recommends libpq-dev protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --locked --version 0.1.77
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --recipe-path recipe.json --package edge-redirect
COPY . .
RUN cargo build --release --locked --package edge-redirect --bin edge-redirect

FROM debian:bookworm-slim
# curl: the HEALTHCHECK below.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 shortener \
    && useradd --system --uid 10001 --gid shortener --home-dir /var/lib/shortener \
        --create-home --shell /usr/sbin/nologin shortener \
    && mkdir -p /var/lib/shortener/journal && chown shortener:shortener /var/lib/shortener/journal
COPY --from=builder /src/target/release/edge-redirect /usr/local/bin/edge-redirect
USER 10001:10001
WORKDIR /var/lib/shortener
# Containers listen on every interface; the local stack keeps 127.0.0.1.
ENV EDGE_HTTP_ADDR=0.0.0.0:8081 \
    EDGE_ADMIN_ADDR=0.0.0.0:9081 \
    EDGE_CLICK_JOURNAL_DIR=/var/lib/shortener/journal \
    LOG_FORMAT=json
# The click journal: mount a volume here so clicks outlive the container.
VOLUME /var/lib/shortener/journal
EXPOSE 8081 9081
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS -o /dev/null http://127.0.0.1:9081/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/edge-redirect"]
