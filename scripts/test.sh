#!/usr/bin/env bash
# flock's one test command: installs the Debian packages the tests need when
# they are missing, then checks formatting and lints, fuzzes the parsers
# (when a nightly toolchain and cargo-fuzz are present), and runs every test.
# Tests that need root (network namespaces, nft, bird) expect to run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(iproute2 iptables nftables bird2 containernetworking-plugins iperf3)
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

echo "== cargo fmt --check"
cargo fmt --all --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

fuzz_seconds=${FUZZ_SECONDS:-15}
if cargo +nightly --version >/dev/null 2>&1 && cargo fuzz --version >/dev/null 2>&1; then
    echo "== fuzzing each target for ${fuzz_seconds}s"
    golden=crates/flock-proto/tests/golden
    for target in $(cargo fuzz list); do
        corpus=$(mktemp -d)
        flog=$(mktemp)
        if ! cargo +nightly fuzz run "$target" "$corpus" "$golden" -- \
            -max_total_time="$fuzz_seconds" >"$flog" 2>&1; then
            tail -n 60 "$flog"
            echo "fuzz target $target failed; the crashing input is under fuzz/artifacts/$target" >&2
            exit 1
        fi
        echo "$target: $(grep -E '^Done' "$flog" | tail -n 1)"
        rm -rf "$corpus" "$flog"
    done
else
    echo "== fuzzing skipped: needs a nightly toolchain and cargo-fuzz (cargo install cargo-fuzz)"
fi

echo "== cargo test --workspace"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
passed=$(grep -E '^test result:' "$log" | grep -oE '[0-9]+ passed' | awk '{s += $1} END {print s + 0}')
failed=$(grep -E '^test result:' "$log" | grep -oE '[0-9]+ failed' | awk '{s += $1} END {print s + 0}')
echo
echo "all tests: ${passed} passed, ${failed} failed"
