# syntax=docker/dockerfile:1.7
#
# The Tether image: a release build of `tether` on distroless (glibc, no shell), run as
# the non-root user 65532. Read-only root filesystem friendly: the one writable path is
# /var/lib/tether (--data-dir), which the Helm chart mounts as an emptyDir.
#
#   docker build -t tether:0.1.0 .                         # PostgreSQL / embedded store
#   docker build --target runtime-fdb -t tether:0.1.0-fdb \
#     --build-arg FDB_CLIENTS_SHA256=<sha256 of the .deb> .  # + FoundationDB (--features fdb)
#
# Without a container daemon, scripts/image assembles the same image (OCI layout) from a
# built binary and checks it; see the README ("Container image").

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

# ---- build: the workspace, release profile --------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tether-node --bin tether \
 && cp target/release/tether /tether

# ---- build-fdb: the same with the FoundationDB store ------------------------------------
# The foundationdb crate generates bindings with libclang and links libfdb_c from the
# FoundationDB client package (the version must match the fdb-7_3 API the node selects).
FROM rust:${RUST_VERSION}-${DEBIAN} AS build-fdb
ARG FDB_VERSION=7.3.63
ARG FDB_CLIENTS_SHA256
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev \
 && rm -rf /var/lib/apt/lists/*
ADD https://github.com/apple/foundationdb/releases/download/${FDB_VERSION}/foundationdb-clients_${FDB_VERSION}-1_amd64.deb /tmp/fdb-clients.deb
RUN test -n "${FDB_CLIENTS_SHA256}" || { echo "pass --build-arg FDB_CLIENTS_SHA256 (from the release's .sha256 file)"; exit 1; } \
 && echo "${FDB_CLIENTS_SHA256}  /tmp/fdb-clients.deb" | sha256sum -c - \
 && dpkg -i /tmp/fdb-clients.deb
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=target-fdb \
    cargo build --release --locked -p tether-node --bin tether --features fdb \
 && cp target/release/tether /tether

# ---- runtime-fdb ------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime-fdb
COPY --from=build-fdb /usr/lib/libfdb_c.so /usr/lib/libfdb_c.so
COPY --from=build-fdb /tether /usr/local/bin/tether
USER 65532:65532
EXPOSE 8443 7000
ENTRYPOINT ["/usr/local/bin/tether"]
CMD ["serve"]

# ---- runtime (default) -----------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=build /tether /usr/local/bin/tether
USER 65532:65532
EXPOSE 8443 7000
ENTRYPOINT ["/usr/local/bin/tether"]
CMD ["serve"]
