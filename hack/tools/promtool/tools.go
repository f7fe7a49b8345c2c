//go:build tools

// Package tools pins the promtool CLI (Prometheus rule checks and rule unit tests)
// built by hack/tools/build.sh.
package tools

import _ "github.com/prometheus/prometheus/cmd/promtool"
