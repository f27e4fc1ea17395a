# syntax=docker/dockerfile:1.7
# One image recipe for every shop binary: `--build-arg SERVICE=gateway|product|order|user`.
#
#   docker build --build-arg SERVICE=product -t shop-product .
#
# Stage 1 compiles only the dependencies (from the manifests and lock file, with empty
# crate sources), so that layer is reused until Cargo.toml/Cargo.lock change. Stage 2
# compiles the workspace's own code. The runtime is distroless: no shell, no package
# manager, UID 65532; the binary's own `healthcheck` subcommand is the HEALTHCHECK.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0

# Dependencies only: real manifests, stub sources. Built for the whole workspace and
# before SERVICE is declared, so the four images share this one layer.
COPY Cargo.toml Cargo.lock ./
COPY services/platform/Cargo.toml services/platform/build.rs services/platform/
COPY services/product/Cargo.toml services/product/
COPY services/order/Cargo.toml services/order/
COPY services/user/Cargo.toml services/user/
COPY gateway/Cargo.toml gateway/
# The test harness is a workspace member too (never built into an image: stub only).
COPY testing/load/Cargo.toml testing/load/
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    for crate in services/platform services/product services/order services/user gateway; do \
      mkdir -p "$crate/src" && touch "$crate/src/lib.rs"; done \
 && for bin in services/product services/order services/user gateway testing/load .; do \
      mkdir -p "$bin/src" && echo 'fn main() {}' > "$bin/src/main.rs"; done \
 && cargo build --release --locked --workspace

# The workspace's own code. Touch it so cargo never mistakes it for the older stubs.
# All four binaries are built in this one layer, before SERVICE is declared, so the four
# images share it: building every image costs one compilation, not four.
# `--workspace --bin` keeps the dependency features identical to the layer above.
COPY . .
ARG REVISION=unknown
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    find services gateway testing src -name '*.rs' -exec touch {} + \
 && SHOP_REVISION="$REVISION" cargo build --release --locked --workspace \
      --bin gateway --bin product --bin order --bin user \
 && mkdir -p /out/data \
 && cp target/release/gateway target/release/product target/release/order target/release/user /out/ \
 && strip --strip-all /out/gateway /out/product /out/order /out/user \
 && rm -rf target/release/build target/release/deps target/release/.fingerprint

ARG SERVICE=gateway
RUN case "$SERVICE" in gateway|product|order|user) ;; \
      *) echo "SERVICE must be gateway, product, order or user (got '$SERVICE')" >&2; exit 1 ;; esac \
 && mv "/out/$SERVICE" /out/service \
 && /out/service describe | grep -q "\"name\":\"$SERVICE\""

FROM gcr.io/distroless/cc-debian12:nonroot
ARG SERVICE=gateway
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="shop-${SERVICE}" \
      org.opencontainers.image.description="shop ${SERVICE}: part of a Kubernetes-native e-commerce service set in Rust" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=build /out/service /usr/local/bin/service
# The SQLite data directory when no DATABASE_URL is given; owned by the runtime user so a
# fresh named volume mounted here is writable.
COPY --from=build --chown=65532:65532 /out/data /data
ENV DATA_DIR=/data \
    HOST=0.0.0.0
USER 65532:65532
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/service", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/service"]
