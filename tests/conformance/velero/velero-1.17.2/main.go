// Velero v1.17.2's data-mover storage path against Azure Blob, with the broker as the only
// credential. See ../roundtrip and docs/storage-e2e.md.
package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/snapshot/upload"
	"github.com/sirupsen/logrus"
	"github.com/vmware-tanzu/velero/pkg/repository/udmrepo"
	"github.com/vmware-tanzu/velero/pkg/repository/udmrepo/kopialib"
	"github.com/vmware-tanzu/velero/pkg/uploader/kopia"

	"imds-broker.test/velero-roundtrip"
)

func main() {
	svc := kopialib.NewKopiaRepoService(logrus.StandardLogger())
	roundtrip.Main("v1.17.2", roundtrip.Hooks{
		// unifiedRepoProvider.PrepareRepo: connect first; only "not initialized" leads to create.
		Prepare: func(ctx context.Context, opt udmrepo.RepoOptions) error {
			err := svc.Init(ctx, opt, false)
			if err == nil {
				return errors.New("a fresh prefix connected without being created")
			}
			if !errors.Is(err, repo.ErrRepositoryNotInitialized) {
				return fmt.Errorf("connect before create: want ErrRepositoryNotInitialized, got %w", err)
			}
			return svc.Init(ctx, opt, true)
		},
		// unifiedRepoProvider.ConnectToRepo (a data-mover pod's BoostRepoConnect).
		Connect: func(ctx context.Context, opt udmrepo.RepoOptions) error { return svc.Init(ctx, opt, false) },
		NewUploader: func(w repo.RepositoryWriter, p *kopia.Progress) kopia.SnapshotUploader {
			u := upload.NewUploader(w)
			u.Progress = p
			u.FailFast = true
			return u
		},
		Open:        svc.Open,
		NewProgress: kopia.NewProgress,
	})
}
