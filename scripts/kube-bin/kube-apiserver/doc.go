// Package kubeapiserver is a wrapper module and nothing else: its go.mod pins the
// version of kube-apiserver that scripts/kube-bin.sh builds, from k8s.io/kubernetes/cmd/kube-apiserver.
package kubeapiserver

// Builds is the package scripts/kube-bin.sh builds with this module.
const Builds = "k8s.io/kubernetes/cmd/kube-apiserver"
