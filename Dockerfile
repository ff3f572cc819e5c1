# Multi-stage: the dependencies are compiled in a layer of their own (from the manifests
# and placeholder sources), so a change to the code rebuilds only this crate; the runtime
# image holds only the three binaries, running as a non-root user.
#
# The binaries speak amqps:// (rustls, the default `tls` feature). They verify the broker
# against the system CA bundle, which the runtime base image lacks: it is copied from the
# builder (whose image carries Debian's ca-certificates), so no package is installed at
# runtime. A private CA is mounted and named by AMQP_CA_FILE (README, "Production").
#
# Builds natively on any architecture Debian and Rust support (x86-64, arm64): the build
# uses no CPU features beyond the architecture's baseline (README, "Build and CPU support").
# Works with the classic builder and with BuildKit; needs no image but the two below.

FROM rust:1.95-slim-bookworm AS builder
WORKDIR /build
COPY Cargo.toml Cargo.lock ./
COPY .cargo .cargo
RUN mkdir -p src/bin benches \
    && touch src/lib.rs \
    && for bin in report-service producer datagen; do echo 'fn main() {}' > "src/bin/$bin.rs"; done \
    && echo 'fn main() {}' > benches/engine.rs \
    && cargo build --release --locked --bins \
    && rm -rf src benches target/release/.fingerprint/report-service-*
COPY . .
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim AS runtime
RUN useradd --system --uid 10001 --user-group --no-create-home report \
    && mkdir -p /data /snapshot \
    && chown report:report /data /snapshot
COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=builder /build/target/release/report-service /build/target/release/producer /build/target/release/datagen /usr/local/bin/
USER report
WORKDIR /data
ENV DATA_PATH=/data/data.json \
    SNAPSHOT_PATH=/snapshot/cache.snapshot \
    HTTP_ADDR=0.0.0.0:9090
EXPOSE 9090
CMD ["report-service"]
