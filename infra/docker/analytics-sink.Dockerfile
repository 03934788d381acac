# syntax=docker/dockerfile:1
# analytics-sink. Build from the repository root:
#   docker build -f infra/docker/analytics-sink.Dockerfile -t shortener/analytics-sink .

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
RUN cargo chef cook --release --recipe-path recipe.json --package analytics-sink
COPY . .
RUN cargo build --release --locked --package analytics-sink --bin analytics-sink

# The country database (GEOIP_DB), by the same script and pinned version as
# the local stack.
FROM node:22-bookworm-slim AS geoip
COPY scripts/lib.sh scripts/fetch-geoip.sh /src/scripts/
RUN bash /src/scripts/fetch-geoip.sh /geoip

FROM debian:bookworm-slim
# curl: the HEALTHCHECK below.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 shortener \
    && useradd --system --uid 10001 --gid shortener --home-dir /var/lib/shortener \
        --create-home --shell /usr/sbin/nologin shortener
COPY --from=builder /src/target/release/analytics-sink /usr/local/bin/analytics-sink
COPY --from=geoip /geoip/ /usr/share/shortener/geoip/
USER 10001:10001
WORKDIR /var/lib/shortener
# Containers listen on every interface; the local stack keeps 127.0.0.1.
ENV ANALYTICS_ADDR=0.0.0.0:8084 \
    GEOIP_DB=/usr/share/shortener/geoip/geo-whois-asn-country.mmdb \
    LOG_FORMAT=json
EXPOSE 8084
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS -o /dev/null http://127.0.0.1:8084/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/analytics-sink"]
