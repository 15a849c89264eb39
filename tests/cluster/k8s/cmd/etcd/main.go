// etcd for the cluster tests, built from etcd's own server module at the version
// k8s.io/kubernetes itself requires (so the API server talks to the etcd it is tested with).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
