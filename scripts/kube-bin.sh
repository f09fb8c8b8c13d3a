#!/usr/bin/env bash
# Builds the Go-built test components once and caches them outside the clone:
# etcd, kube-apiserver and critest, at the versions the wrapper modules under
# scripts/kube-bin/ pin (each a go.mod + go.sum, no source: the Go module
# cache and build cache live outside the clone too).
#
# Prints one line per binary, `NAME ABSOLUTE-PATH`, on stdout; progress goes
# to stderr. A second run finds the cache and takes seconds. A build that is
# interrupted leaves nothing behind that a later run would take as done.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/kube-bin
command -v go >/dev/null || { echo "kube-bin.sh: no Go toolchain (go) on PATH" >&2; exit 1; }

version() { go -C "$here/$1" list -m -f '{{.Version}}' "$2"; }
etcd_v=$(version etcd go.etcd.io/etcd/server/v3)
kube_v=$(version kube-apiserver k8s.io/kubernetes)
cri_v=$(version critest sigs.k8s.io/cri-tools)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/flock/kube/etcd-${etcd_v}_kubernetes-${kube_v}_cri-tools-${cri_v}
mkdir -p "$cache"

# build NAME COMMAND...: runs COMMAND with $out set to a temporary path in
# the cache, then renames it to NAME.
build() {
  local name=$1; shift
  [[ -x $cache/$name ]] && return
  echo "kube-bin.sh: building $name into $cache (first run only; minutes)" >&2
  out=$cache/.$name.tmp.$$
  local started=$SECONDS
  "$@"
  mv -f "$out" "$cache/$name"
  echo "kube-bin.sh: built $name in $((SECONDS - started)) s" >&2
}

build_etcd() {
  go -C "$here/etcd" build -buildvcs=false -trimpath -ldflags "-s -w" -o "$out" go.etcd.io/etcd/server/v3
}
build_apiserver() {
  local minor=${kube_v#v1.}; minor=${minor%%.*}
  local pkg=k8s.io/component-base/version
  go -C "$here/kube-apiserver" build -buildvcs=false -trimpath -o "$out" \
    -ldflags "-s -w -X $pkg.gitVersion=$kube_v -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor" \
    k8s.io/kubernetes/cmd/kube-apiserver
}
build_critest() {
  # critest is cri-tools' test binary of cmd/critest.
  go -C "$here/critest" test -c -buildvcs=false -trimpath -ldflags "-s -w" -o "$out" sigs.k8s.io/cri-tools/cmd/critest
}

build etcd build_etcd
build kube-apiserver build_apiserver
build critest build_critest

for name in etcd kube-apiserver critest; do
  echo "$name $cache/$name"
done
