//go:build tools

// Package tools pins the Go-built command-line tools of the packaging tests (helm, kustomize):
// their versions and every dependency's checksum are in go.mod and go.sum, fetched from the Go
// module proxy. scripts/test-packaging.sh builds them with `go build` into a cache directory.
package tools

import (
	_ "helm.sh/helm/v3/cmd/helm"
	_ "sigs.k8s.io/kustomize/kustomize/v5"
)
