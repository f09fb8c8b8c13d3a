# flock's image: the plugin, the installer, the agent, flockctl, and the
# tools the agent and its BIRD sidecar run (ip, bird/birdc, nft).
#
# With a registry (the defaults):
#   docker build -t REGISTRY/flock:TAG .
# compiles inside the Rust image and installs the packages on Debian's
# slim image. Without one, scripts/image.sh builds it from a base root
# filesystem made by debootstrap (bird2, nftables, iproute2 already in it)
# and binaries compiled on the host:
#   --build-arg BUILDER=BASE --build-arg BASE=BASE
#   --build-arg PREBUILT=prebuilt --build-arg PACKAGES=in-base
# with the binaries in prebuilt/ of the build context.
ARG BUILDER=docker.io/library/rust:1.95-bookworm
ARG BASE=docker.io/library/debian:bookworm-slim

FROM ${BUILDER} AS build
# A directory of the context holding flock, flock-agent, flock-install and
# flockctl already built; empty: compile them here.
ARG PREBUILT=
WORKDIR /src
COPY . .
RUN set -e; mkdir -p /out; \
    if [ -n "$PREBUILT" ]; then \
      src="$PREBUILT"; \
    else \
      cargo build --release --locked -p flock-cni -p flock-agent -p flock-installer -p flockctl; \
      src=target/release; \
    fi; \
    for b in flock flock-agent flock-install flockctl; do cp "$src/$b" /out/; done

FROM ${BASE}
# `install`: apt-get installs the tools; `in-base`: the base has them.
ARG PACKAGES=install
RUN if [ "$PACKAGES" = install ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends iproute2 bird2 nftables ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /out/flock /usr/local/bin/flock
COPY --from=build /out/flock-agent /usr/local/bin/flock-agent
COPY --from=build /out/flock-install /usr/local/bin/flock-install
COPY --from=build /out/flockctl /usr/local/bin/flockctl
ENTRYPOINT ["/usr/local/bin/flock-agent"]
