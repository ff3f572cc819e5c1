# Multi-stage: the dependencies are compiled in a layer of their own (from the manifests
# and placeholder sources), so a change to the code rebuilds only the workspace's three
# crates (the worker, amqp-raw, report-tools); the runtime image holds only the three
# binaries, running as a non-root user.
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
# The builder stage is left as an untagged image; this label lets the README's clean-up
# remove exactly it (`docker image prune --filter label=org.report-service.stage=builder`).
LABEL org.report-service.stage=builder
WORKDIR /build
# The workspace's manifests first: the dependency layer below is rebuilt only when they
# change. Placeholder sources carry a crate doc, so the workspace's `missing_docs` lint
# has nothing to say about them.
COPY Cargo.toml Cargo.lock ./
COPY crates/amqp-raw/Cargo.toml crates/amqp-raw/
COPY tools/Cargo.toml tools/
COPY .cargo .cargo
RUN mkdir -p src/bin benches crates/amqp-raw/src tools/src/bin \
    && for lib in src/lib.rs crates/amqp-raw/src/lib.rs tools/src/lib.rs; do \
           echo '//! Placeholder: the dependency layer is built before the sources are copied.' > "$lib"; \
       done \
    && for main in src/bin/report-service.rs tools/src/bin/producer.rs tools/src/bin/datagen.rs benches/engine.rs; do \
           printf '//! Placeholder for the dependency layer.\nfn main() {}\n' > "$main"; \
       done \
    && cargo build --release --locked --workspace --bins \
    && rm -rf src benches crates tools \
        target/release/.fingerprint/report-service-* target/release/.fingerprint/amqp-raw-* \
        target/release/.fingerprint/report-tools-*
COPY . .
RUN cargo build --release --locked --workspace --bins

FROM debian:bookworm-slim AS runtime
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin report \
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
