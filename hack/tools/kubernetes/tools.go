//go:build tools

// Package tools pins the Kubernetes commands built by hack/tools/build.sh: the control
// plane, kubectl, and the node (kubelet) for the real-node cluster of hack/cluster.sh.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
