// Package critest is a wrapper module and nothing else: its go.mod pins the
// version of critest that scripts/kube-bin.sh builds, from sigs.k8s.io/cri-tools/cmd/critest.
package critest

// Builds is the package scripts/kube-bin.sh builds with this module.
const Builds = "sigs.k8s.io/cri-tools/cmd/critest"
