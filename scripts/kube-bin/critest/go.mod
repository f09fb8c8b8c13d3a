// Builds critest for the tests (scripts/kube-bin.sh). critest is a test binary
// (go test -c of cmd/critest), so its test dependencies are required here too.
module flock.test/kube-bin/critest

go 1.26.6

require sigs.k8s.io/cri-tools v1.37.0 // indirect
