// Velero v1.18.3's data-mover storage path against Azure Blob, with the broker as the only
// credential. See ../roundtrip and docs/storage-e2e.md.
package main

import (
	"context"
	"errors"

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
	roundtrip.Main("v1.18.3", roundtrip.Hooks{
		// unifiedRepoProvider.PrepareRepo (1.18): IsReady, and Create when it is not.
		Prepare: func(ctx context.Context, opt udmrepo.RepoOptions) error {
			ready, err := svc.IsReady(ctx, opt, false)
			if err != nil {
				return err
			}
			if ready {
				return errors.New("a fresh prefix reported ready before it was created")
			}
			return svc.Create(ctx, opt)
		},
		// unifiedRepoProvider.ConnectToRepo (a data-mover pod's BoostRepoConnect).
		Connect: svc.Connect,
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
