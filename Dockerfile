# syntax=docker/dockerfile:1
# Multi-stage: cargo-chef caches the dependency build in its own layer, the runtime image
# holds only the three binaries, running as a non-root user.
#
# CPU: .cargo/config.toml builds with AVX2 and PCLMULQDQ (for sonic-rs's SIMD paths), so
# this image runs on x86-64 CPUs from 2013 on (Intel Haswell, AMD Excavator/Zen); the
# binaries check at startup and exit with a clear message elsewhere. For older CPUs build
# with: docker build --build-arg RUSTFLAGS_OVERRIDE="-C target-cpu=x86-64" .
# (RUSTFLAGS, even empty, replaces the config's flags, so it is only set when given.)

FROM rust:1.95-slim-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /build

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
ARG RUSTFLAGS_OVERRIDE=""
COPY .cargo .cargo
COPY --from=planner /build/recipe.json recipe.json
RUN if [ -n "$RUSTFLAGS_OVERRIDE" ]; then export RUSTFLAGS="$RUSTFLAGS_OVERRIDE"; fi \
    && cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN if [ -n "$RUSTFLAGS_OVERRIDE" ]; then export RUSTFLAGS="$RUSTFLAGS_OVERRIDE"; fi \
    && cargo build --release --locked --bins

FROM debian:bookworm-slim AS runtime
RUN useradd --system --uid 10001 --user-group --no-create-home report \
    && mkdir -p /data /snapshot \
    && chown report:report /data /snapshot
COPY --from=builder /build/target/release/report-service /build/target/release/producer /build/target/release/datagen /usr/local/bin/
USER report
WORKDIR /data
ENV DATA_PATH=/data/data.json \
    SNAPSHOT_PATH=/snapshot/cache.snapshot \
    HTTP_ADDR=0.0.0.0:9090
EXPOSE 9090
CMD ["report-service"]
