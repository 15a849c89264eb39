// A stand-in for monis.app/mlog, the logging package azure-workload-identity v1.6.0 imports:
// the Go module proxy this project can reach refuses that module, so bench/peer/go.mod
// replaces it with this one. It implements only the API surface the peer's proxy and
// webhook call, on top of logr's funcr JSON logger; see bench/peer/README.md.
module monis.app/mlog

go 1.26

require github.com/go-logr/logr v1.4.3
