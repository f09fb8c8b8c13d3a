#!/usr/bin/env bash
# Builds flock's image where no container registry is reachable, and
# smoke-tests it:
#   1. a Debian root filesystem with bird2, nftables and iproute2, made by
#      debootstrap from Debian's packages and cached outside the clone
#      (like the kube binaries; a second run takes seconds);
#   2. imported into podman as the base image;
#   3. the Dockerfile built on it with binaries compiled on the host
#      (--build-arg PREBUILT; the host's toolchain is newer than Debian's),
#      with --network none: podman's bridge would edit the root namespace's
#      firewall;
#   4. each tool run inside it with `podman run --network none`.
#
# Binaries come from FLOCK_IMAGE_BINARIES (default target/release; the test
# command passes target/debug, which `cargo test --workspace` built).
# FLOCK_IMAGE_SAVE=PATH keeps the image as an OCI archive. As
# root. Podman's state (images, containers, caches, locks) lives in a
# temporary directory inside a private mount namespace and is removed at
# the end: nothing of the machine's podman setup is used or changed.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

binaries=${FLOCK_IMAGE_BINARIES:-target/release}
tag=${FLOCK_IMAGE_TAG:-localhost/flock:dev}
for b in flock flock-agent flock-install flockctl; do
    [[ -x $binaries/$b ]] || {
        echo "image.sh: $binaries/$b is missing: build the workspace first (cargo build --release)" >&2
        exit 1
    }
done
[[ $(id -u) -eq 0 ]] || { echo "image.sh: needs root (debootstrap, podman)" >&2; exit 1; }
for tool in debootstrap podman unshare; do
    command -v "$tool" >/dev/null || { echo "image.sh: $tool is missing (apt-get install debootstrap podman)" >&2; exit 1; }
done

# The host's suite and mirror (deb822 .sources or sources.list).
. /etc/os-release
suite=${VERSION_CODENAME:-bookworm}
# Debian's own entry first (debian.sources), a third-party repository never.
mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null |
    grep -v security | head -n 1 || true)
if [[ -z $mirror ]]; then
    # `deb [options] URL suite …`: the URL is the first field after the options.
    mirror=$(sed -n 's/^deb \(\[[^]]*\] *\)\{0,1\}\([^ ]*\) .*/\2/p' /etc/apt/sources.list 2>/dev/null |
        grep -v security | grep -i debian | head -n 1 || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}
packages=bird2,nftables,iproute2,ca-certificates

cache=${XDG_CACHE_HOME:-$HOME/.cache}/flock/image
mkdir -p "$cache"
rootfs_tar=$cache/rootfs-$suite-$(echo "$packages" | sha256sum | cut -c1-12).tar
if [[ ! -s $rootfs_tar ]]; then
    echo "image.sh: debootstrap $suite (minbase + $packages) from $mirror (first run only)" >&2
    started=$SECONDS
    tree=$(mktemp -d "$cache/.rootfs.XXXXXX")
    trap 'rm -rf --one-file-system "$tree"' EXIT
    debootstrap --variant=minbase --include="$packages" "$suite" "$tree" "$mirror" >"$cache/debootstrap.log" 2>&1 || {
        tail -n 30 "$cache/debootstrap.log" >&2
        echo "image.sh: debootstrap failed (log: $cache/debootstrap.log)" >&2
        exit 1
    }
    # What a runtime base does not need: apt's caches and lists.
    rm -rf "$tree"/var/cache/apt/* "$tree"/var/lib/apt/lists/*
    tar -C "$tree" -cf "$rootfs_tar.tmp.$$" .
    mv -f "$rootfs_tar.tmp.$$" "$rootfs_tar"
    rm -rf --one-file-system "$tree"
    trap - EXIT
    echo "image.sh: root filesystem cached as $rootfs_tar in $((SECONDS - started)) s" >&2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/flock-image.XXXXXX")
# Podman's default directories, bound over in the private mount namespace
# below; the ones that do not exist are made for that and removed after.
made=()
for d in /var/lib/containers /run/containers /run/libpod; do
    [[ -e $d ]] || { mkdir -p "$d"; made+=("$d"); }
done
cleanup() {
    rm -rf --one-file-system "$work"
    for d in "${made[@]}"; do rmdir "$d" 2>/dev/null || true; done
}
trap cleanup EXIT

# The build context: the Dockerfile and the binaries, nothing else. Their
# debug sections are left out (a debug build's agent is 330 MB, 70 MB
# without them): the image holds each binary up to four times while it is
# built (context, build stage, its /out, final layer), on the disk the
# tests have just filled with their target directory.
mkdir -p "$work/context/prebuilt"
cp "$repo/Dockerfile" "$work/context/Dockerfile"
for b in flock flock-agent flock-install flockctl; do
    if command -v strip >/dev/null; then
        strip --strip-debug -o "$work/context/prebuilt/$b" "$binaries/$b"
    else
        cp "$binaries/$b" "$work/context/prebuilt/$b"
    fi
done
# Room for those copies and the base image, asked before podman fills the
# disk and fails halfway with ENOSPC.
need_kb=$(($(du -sk "$work/context" | cut -f1) * 4 + $(du -sk "$rootfs_tar" | cut -f1) * 2))
free_kb=$(df -Pk "$work" | awk 'NR == 2 {print $4}')
if ((free_kb < need_kb)); then
    echo "image.sh: $((free_kb / 1024)) MiB free under $work, the image build needs about $((need_kb / 1024)) MiB" >&2
    exit 1
fi

# Podman's configuration for this run. The host may allow fewer open files
# and processes than podman asks for by default (runc then fails with
# "error setting rlimits"): ask for what this shell has.
nofile=$(ulimit -Hn)
[[ $nofile == unlimited ]] && nofile=1048576
nproc=$(ulimit -u)
[[ $nproc == unlimited ]] && nproc=32768
((nproc > 32768)) && nproc=32768
mkdir -p "$work"/{state,run-containers,run-libpod,networks,tmp}
# Storage of our own, whatever the host's storage.conf says.
cat >"$work/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$work/state/storage"
runroot = "$work/run-containers/storage"
CONF
: >"$work/registries.conf"
cat >"$work/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[network]
network_config_dir = "$work/networks"
[engine]
tmp_dir = "$work/tmp"
image_copy_tmp_dir = "$work/tmp"
events_logger = "none"
CONF

# Inside a private mount namespace, podman's default directories are the
# work directory's: storage, caches, run state.
cat >"$work/inside.sh" <<'INSIDE'
set -euo pipefail
work=$1 rootfs_tar=$2 tag=$3
mount --bind "$work/state" /var/lib/containers
mount --bind "$work/run-containers" /run/containers
mount --bind "$work/run-libpod" /run/libpod
export CONTAINERS_CONF=$work/containers.conf CONTAINERS_STORAGE_CONF=$work/storage.conf \
    CONTAINERS_REGISTRIES_CONF=$work/registries.conf TMPDIR=$work/tmp
podman=(podman --events-backend none --root "$work/state/storage" --runroot "$work/run-containers/storage")
base=localhost/flock-base:image-sh
"${podman[@]}" import -q "$rootfs_tar" "$base" >/dev/null
"${podman[@]}" build -q --network none --pull=never \
    --build-arg BUILDER="$base" --build-arg BASE="$base" \
    --build-arg PREBUILT=prebuilt --build-arg PACKAGES=in-base \
    -t "$tag" -f "$work/context/Dockerfile" "$work/context" >/dev/null
run() { "${podman[@]}" run --rm --network none "$@" 2>&1; }
check() {
    local what=$1 want=$2; shift 2
    local out
    out=$(run "$@") || { echo "image.sh: $what failed in the image: $out" >&2; exit 1; }
    grep -q -- "$want" <<<"$out" || { echo "image.sh: $what printed no '$want': $out" >&2; exit 1; }
    echo "  $what: $(head -n 1 <<<"$out")"
}
echo "image.sh: built $tag; inside it (podman run --network none):"
check "flock-agent --version" "flock-agent" "$tag" --version
check "flock-install --help" "Usage" --entrypoint /usr/local/bin/flock-install "$tag" --help
check "flockctl --help" "EXIT STATUS" --entrypoint /usr/local/bin/flockctl "$tag" --help
check "bird --version" "BIRD version 2" --entrypoint bird "$tag" --version
check "nft --version" "nftables" --entrypoint nft "$tag" --version
check "flock (CNI VERSION)" "supportedVersions" --entrypoint /usr/local/bin/flock -e CNI_COMMAND=VERSION "$tag"
size=$("${podman[@]}" image inspect --format '{{.Size}}' "$tag")
echo "image.sh: $tag is $((size / 1000000)) MB"
if [[ -n ${FLOCK_IMAGE_SAVE:-} ]]; then
    "${podman[@]}" save -q --format oci-archive -o "$FLOCK_IMAGE_SAVE" "$tag"
    echo "image.sh: saved as $FLOCK_IMAGE_SAVE (podman load -i, or skopeo copy oci-archive:… to a registry)"
fi
"${podman[@]}" rmi -f "$tag" "$base" >/dev/null
INSIDE
started=$SECONDS
FLOCK_IMAGE_SAVE=${FLOCK_IMAGE_SAVE:+$(realpath -m "$FLOCK_IMAGE_SAVE")} \
    unshare -m --propagation private bash "$work/inside.sh" "$work" "$rootfs_tar" "$tag"
echo "image.sh: done in $((SECONDS - started)) s (image and podman state removed with $work)"
