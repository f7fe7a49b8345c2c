//go:build tools

// Package tools pins the CSI conformance checker built by hack/tools/build.sh.
package tools

import _ "github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity"
