// Shared by the per-version modules (../velero-X.Y.Z), which replace it with this directory.
// Not built on its own: it compiles against the Velero (and kopia fork) the including module pins.
module imds-broker.test/velero-roundtrip

go 1.22.8

require (
	github.com/kopia/kopia v0.16.0
	github.com/sirupsen/logrus v1.9.3
	github.com/vmware-tanzu/velero v1.15.0
)
