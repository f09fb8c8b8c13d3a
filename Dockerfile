# flock's image: the plugin, the installer, the agent, flockctl, and the tools the
# agent and its BIRD sidecar run (ip, bird/birdc, nft).
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p flock-cni -p flock-agent -p flock-installer -p flockctl

FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 bird2 nftables ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/flock /usr/local/bin/flock
COPY --from=build /src/target/release/flock-agent /usr/local/bin/flock-agent
COPY --from=build /src/target/release/flock-install /usr/local/bin/flock-install
COPY --from=build /src/target/release/flockctl /usr/local/bin/flockctl
ENTRYPOINT ["/usr/local/bin/flock-agent"]
