# syntax=docker/dockerfile:1
# control-plane. Build from the repository root:
#   docker build -f infra/docker/control-plane.Dockerfile -t shortener/control-plane .

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
RUN cargo chef cook --release --recipe-path recipe.json --package control-plane
COPY . .
RUN cargo build --release --locked --package control-plane --bin control-plane

FROM debian:bookworm-slim
# libpq5: diesel links libpq. curl: the HEALTHCHECK below.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libpq5 ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 shortener \
    && useradd --system --uid 10001 --gid shortener --home-dir /var/lib/shortener \
        --create-home --shell /usr/sbin/nologin shortener
COPY --from=builder /src/target/release/control-plane /usr/local/bin/control-plane
USER 10001:10001
WORKDIR /var/lib/shortener
# Containers listen on every interface; the local stack keeps 127.0.0.1.
ENV CONTROL_PLANE_ADDR=0.0.0.0:8082 \
    LOG_FORMAT=json
EXPOSE 8082
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS -o /dev/null http://127.0.0.1:8082/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/control-plane"]
