# syntax=docker/dockerfile:1
# The `marathon` binary (HTTP API, workers, timer sweeper) in a small runtime image.
#
#   docker build -t marathon:0.1.0 .
#   docker build --build-arg FEATURES=redis,sqs -t marathon:0.1.0 .   # without OpenTelemetry export
#
# Runs as the numeric non-root user 65532 and writes nothing but /tmp, so it works
# with a read-only root filesystem (mount an emptyDir or tmpfs on /tmp).

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# Cargo features of marathon-server compiled in: the backends the binary can pick at run time.
ARG FEATURES=redis,sqs,otel
# aws-lc-sys (TLS of the AWS SDK) builds C code; cmake covers its fallback build.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p marathon-server --features "${FEATURES}" \
    && install -D -m 0755 target/release/marathon /out/marathon

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# CA certificates for rediss:// and the AWS endpoints; nothing else.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 65532 marathon \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin marathon
COPY --from=build /out/marathon /usr/local/bin/marathon
USER 65532:65532
WORKDIR /tmp
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/marathon"]
CMD ["serve", "--listen", "0.0.0.0:8080"]
