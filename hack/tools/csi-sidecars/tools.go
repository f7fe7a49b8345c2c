//go:build tools

// Package tools pins the CSI attacher and resizer sidecars built by hack/tools/build.sh.
package tools

import (
	_ "github.com/kubernetes-csi/external-attacher/v4/cmd/csi-attacher"
	_ "github.com/kubernetes-csi/external-resizer/v2/cmd/csi-resizer"
)
