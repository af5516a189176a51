# The beseda image: one binary, every role (`beseda serve`; roles chosen by BESEDA_ROLES).
# Build:  docker build -t registry.example.com/beseda:0.1.0 .
# Run:    docker run -p 8087:8087 -v beseda-data:/var/lib/beseda registry.example.com/beseda:0.1.0
# docs/deploy.md ("Building the image") has the details; the Helm chart is in helm/beseda.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts (BuildKit, the default builder) keep crates.io downloads and compiled
# dependencies between builds; the binary is copied out because target/ is a cache mount.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p beseda \
    && install -m 0755 target/release/beseda /usr/local/bin/beseda

FROM debian:bookworm-slim
# ca-certificates: outbound HTTPS (event subscriptions, SMTP over TLS, `beseda ctl`).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 beseda \
    && useradd --system --uid 10001 --gid beseda --home-dir /var/lib/beseda --no-create-home \
        --shell /usr/sbin/nologin beseda \
    && install -d -o beseda -g beseda -m 0750 /var/lib/beseda
COPY --from=build /usr/local/bin/beseda /usr/local/bin/beseda

# A container is reached from outside it, so listen on every interface; the data directory
# (embedded database, mail outbox, registry Raft log) is the one writable path.
ENV BESEDA_LISTEN=0.0.0.0:8087 \
    BESEDA_GRPC_LISTEN=0.0.0.0:9087 \
    BESEDA_DATA_DIR=/var/lib/beseda
WORKDIR /var/lib/beseda
USER 10001:10001
# 8087: HTTP (REST, WebSocket, /rs/health, /metrics). 9087: gRPC between roles; never expose it publicly.
EXPOSE 8087 9087
ENTRYPOINT ["beseda"]
CMD ["serve"]
