//go:build tools

// Package peer pins the nearest peer's binaries (azure-workload-identity's proxy sidecar and
// mutating webhook) to one exact release, so bench/peer/build.sh builds them from the Go
// module proxy, verified against the committed go.sum. Nothing here is compiled into the broker.
package peer

import (
	_ "github.com/Azure/azure-workload-identity/cmd/proxy"
	_ "github.com/Azure/azure-workload-identity/cmd/webhook"
)
