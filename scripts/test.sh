#!/usr/bin/env bash
# flock's one test command: installs the Debian packages the tests need when
# they are missing, then checks formatting and lints, fuzzes the parsers
# (installing cargo-fuzz when missing), builds the Go-built test components
# (scripts/kube-bin.sh), runs every test, and builds and smoke-tests the
# image with podman (scripts/image.sh).
# Tests that need root (network namespaces, nft, bird) expect to run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(iproute2 iptables nftables bird2 frr containernetworking-plugins iperf3
    containerd docker-registry skopeo busybox-static debootstrap podman)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "== installing ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        echo "test.sh: installing packages needs root" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# One build from a clean clone: incremental state would only take disk.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
echo "== disk: $(df -Ph . | awk 'NR == 2 {print $4}') free for the build, $(df -Ph "${TMPDIR:-/tmp}" | awk 'NR == 2 {print $4}') for temporary files"

echo "== cargo fmt --check"
cargo fmt --all --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

# Fuzzing always runs: cargo-fuzz (pinned) is installed when missing, the
# nightly toolchain is used when there is one, else the stable one with
# RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Z flags). A target that cannot be
# built or run fails the test command; it never passes quietly.
fuzz_seconds=${FUZZ_SECONDS:-15}
if ((fuzz_seconds < 15)); then
    fuzz_seconds=15
fi
cargo_fuzz_version=0.13.1
if ! cargo fuzz --version 2>/dev/null | grep -q "$cargo_fuzz_version"; then
    echo "== installing cargo-fuzz $cargo_fuzz_version"
    cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked --quiet
fi
if cargo +nightly --version >/dev/null 2>&1; then
    fuzz=(cargo +nightly fuzz)
    echo "== fuzzing each target for ${fuzz_seconds}s (nightly toolchain)"
else
    fuzz=(env RUSTC_BOOTSTRAP=1 cargo fuzz)
    echo "== fuzzing each target for ${fuzz_seconds}s (stable toolchain, RUSTC_BOOTSTRAP=1)"
fi
targets=$(cargo fuzz list)
if [ -z "$targets" ]; then
    echo "no fuzz targets found" >&2
    exit 1
fi
golden=crates/flock-proto/tests/golden
# Inputs that crashed a target once (fixed since) are replayed first.
regressions=fuzz/regressions
for target in $targets; do
    corpus=$(mktemp -d)
    flog=$(mktemp)
    if ! "${fuzz[@]}" run "$target" "$corpus" "$golden" "$regressions" -- \
        -max_total_time="$fuzz_seconds" >"$flog" 2>&1; then
        tail -n 60 "$flog"
        echo "fuzz target $target failed; the crashing input is under fuzz/artifacts/$target" >&2
        exit 1
    fi
    done_line=$(grep -E '^Done [0-9]+ runs in [0-9]+ second' "$flog" | tail -n 1 || true)
    if [ -z "$done_line" ]; then
        tail -n 30 "$flog"
        echo "fuzz target $target did not report a run" >&2
        exit 1
    fi
    echo "$target: $done_line"
    rm -rf "$corpus" "$flog"
done

# The real control plane for the kubernetes-datastore tests: etcd and
# kube-apiserver (and critest) built from their Go modules once, cached
# outside the clone (minutes on a fresh machine, seconds after).
echo "== Go: go vet of the wrapper modules, scripts/kube-bin.sh"
if ! command -v go >/dev/null; then
    echo "test.sh: no Go toolchain; the kubernetes-datastore tests need it (scripts/kube-bin.sh)" >&2
    exit 1
fi
for module in scripts/kube-bin/*/; do
    go -C "$module" vet ./...
done
bash scripts/kube-bin.sh

echo "== cargo test --workspace"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
passed=$(grep -E '^test result:' "$log" | grep -oE '[0-9]+ passed' | awk '{s += $1} END {print s + 0}')
failed=$(grep -E '^test result:' "$log" | grep -oE '[0-9]+ failed' | awk '{s += $1} END {print s + 0}')
echo
echo "all tests: ${passed} passed, ${failed} failed"

# The image, built without a registry from a debootstrapped base and the
# binaries the tests just ran, then each tool run inside it.
echo "== scripts/image.sh"
FLOCK_IMAGE_BINARIES=target/debug bash scripts/image.sh
