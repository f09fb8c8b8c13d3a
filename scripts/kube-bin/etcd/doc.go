// Package etcd is a wrapper module and nothing else: its go.mod pins the
// version of etcd that scripts/kube-bin.sh builds, from go.etcd.io/etcd/server/v3.
package etcd

// Builds is the package scripts/kube-bin.sh builds with this module.
const Builds = "go.etcd.io/etcd/server/v3"
