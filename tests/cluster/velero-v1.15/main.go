// Velero v1.15 as the cluster tests use it: the real `velero` CLI (for `velero install
// --dry-run`) and a driver that creates pods the way Velero does, by calling Velero's own code
// against the test API server:
//
//	velero-v1.15 velero <args...>            Velero's CLI, unchanged
//	velero-v1.15 expose-restore KUBECONFIG NAME TARGET_NS TARGET_PVC
//	    creates a DataDownload NAME and runs the generic restore exposer's Expose for it
//	    (the restore data-mover pod); prints {"pod": "<name>"}
//	velero-v1.15 maintenance-job KUBECONFIG REPO VOLUME_NS BSL
//	    creates a BackupRepository REPO and runs the repository manager's PruneRepo, which
//	    creates the maintenance Job (the Job controller then creates its pod) and then waits for
//	    it to finish; the driver prints {"job": "<name>"} once the Job exists and exits
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/sirupsen/logrus"
	batchv1api "k8s.io/api/batch/v1"
	corev1api "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"

	velerov1api "github.com/vmware-tanzu/velero/pkg/apis/velero/v1"
	velerov2alpha1api "github.com/vmware-tanzu/velero/pkg/apis/velero/v2alpha1"
	"github.com/vmware-tanzu/velero/pkg/cmd"
	serverconfig "github.com/vmware-tanzu/velero/pkg/cmd/server/config"
	"github.com/vmware-tanzu/velero/pkg/cmd/velero"
	"github.com/vmware-tanzu/velero/pkg/exposer"
	"github.com/vmware-tanzu/velero/pkg/repository"
	repomanager "github.com/vmware-tanzu/velero/pkg/repository/manager"
	"github.com/vmware-tanzu/velero/pkg/util/kube"
	"github.com/vmware-tanzu/velero/pkg/util/logging"
)

const veleroNamespace = "velero"

func main() {
	if len(os.Args) < 2 {
		fail(fmt.Errorf("usage: %s velero|expose-restore|maintenance-job ...", filepath.Base(os.Args[0])))
	}
	switch os.Args[1] {
	case "velero":
		// Exactly what cmd/velero's main does, with the subcommand's arguments.
		os.Args = append([]string{"velero"}, os.Args[2:]...)
		cmd.CheckError(velero.NewCommand("velero").Execute())
	case "expose-restore":
		need(6)
		fail(exposeRestore(os.Args[2], os.Args[3], os.Args[4], os.Args[5]))
	case "maintenance-job":
		need(6)
		fail(maintenanceJob(os.Args[2], os.Args[3], os.Args[4], os.Args[5]))
	default:
		fail(fmt.Errorf("unknown command %q", os.Args[1]))
	}
}

func need(n int) {
	if len(os.Args) != n {
		fail(fmt.Errorf("%s: want %d arguments, got %d", os.Args[1], n-2, len(os.Args)-2))
	}
}

func fail(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

func clients(kubeconfig string) (kubernetes.Interface, client.Client, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, nil, err
	}
	kubeClient, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, nil, err
	}
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{clientgoscheme.AddToScheme, velerov1api.AddToScheme, velerov2alpha1api.AddToScheme} {
		if err := add(scheme); err != nil {
			return nil, nil, err
		}
	}
	crClient, err := client.New(cfg, client.Options{Scheme: scheme})
	return kubeClient, crClient, err
}

func logger() logrus.FieldLogger {
	l := logrus.New()
	l.SetOutput(os.Stderr)
	return l
}

func printJSON(v any) error {
	return json.NewEncoder(os.Stdout).Encode(v)
}

// exposeRestore does what the v1.15 DataDownload controller does when it accepts a
// DataDownload: hostingPodLabels = {velero.io/data-download: name}, then Expose.
func exposeRestore(kubeconfig, name, targetNS, targetPVC string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	kubeClient, crClient, err := clients(kubeconfig)
	if err != nil {
		return err
	}
	dd := &velerov2alpha1api.DataDownload{
		ObjectMeta: metav1.ObjectMeta{Namespace: veleroNamespace, Name: name},
		Spec: velerov2alpha1api.DataDownloadSpec{
			TargetVolume:          velerov2alpha1api.TargetVolumeSpec{PVC: targetPVC, PV: "", Namespace: targetNS},
			BackupStorageLocation: "default",
			DataMover:             "velero",
			SnapshotID:            "cluster-test-snapshot",
			SourceNamespace:       targetNS,
			OperationTimeout:      metav1.Duration{Duration: 10 * time.Minute},
		},
	}
	if err := crClient.Create(ctx, dd); err != nil {
		return fmt.Errorf("create DataDownload: %w", err)
	}
	if err := crClient.Get(ctx, client.ObjectKeyFromObject(dd), dd); err != nil {
		return err
	}
	// getDataDownloadOwnerObject
	owner := corev1api.ObjectReference{
		Kind: "DataDownload", Namespace: dd.Namespace, Name: dd.Name, UID: dd.UID,
		APIVersion: velerov2alpha1api.SchemeGroupVersion.String(),
	}
	labels := map[string]string{velerov1api.DataDownloadLabel: dd.Name}
	err = exposer.NewGenericRestoreExposer(kubeClient, logger()).Expose(
		ctx, owner, dd.Spec.TargetVolume.PVC, dd.Spec.TargetVolume.Namespace, labels,
		corev1api.ResourceRequirements{}, dd.Spec.OperationTimeout.Duration)
	if err != nil {
		return fmt.Errorf("Expose: %w", err)
	}
	return printJSON(map[string]string{"pod": dd.Name})
}

// maintenanceJob does what the v1.15 BackupRepository controller does when maintenance is due:
// PruneRepo on the repository manager the server builds.
func maintenanceJob(kubeconfig, repoName, volumeNS, bsl string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, crClient, err := clients(kubeconfig)
	if err != nil {
		return err
	}
	repo := &velerov1api.BackupRepository{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: veleroNamespace,
			Name:      repoName,
			Labels: map[string]string{
				velerov1api.StorageLocationLabel: bsl,
				velerov1api.VolumeNamespaceLabel: volumeNS,
				velerov1api.RepositoryTypeLabel:  velerov1api.BackupRepositoryTypeKopia,
			},
		},
		Spec: velerov1api.BackupRepositorySpec{
			VolumeNamespace:       volumeNS,
			BackupStorageLocation: bsl,
			RepositoryType:        velerov1api.BackupRepositoryTypeKopia,
			MaintenanceFrequency:  metav1.Duration{Duration: time.Hour},
		},
	}
	if err := crClient.Create(ctx, repo); err != nil {
		return fmt.Errorf("create BackupRepository: %w", err)
	}
	if err := crClient.Get(ctx, client.ObjectKeyFromObject(repo), repo); err != nil {
		return err
	}
	log := logger()
	mgr := repomanager.NewManager(veleroNamespace, crClient, repository.NewRepoLocker(),
		repository.NewEnsurer(crClient, log, time.Minute), nil, nil, "",
		// The velero server's flag defaults (server/config).
		kube.PodResources{
			CPURequest:    serverconfig.DefaultMaintenanceJobCPURequest,
			MemoryRequest: serverconfig.DefaultMaintenanceJobMemRequest,
			CPULimit:      serverconfig.DefaultMaintenanceJobCPULimit,
			MemoryLimit:   serverconfig.DefaultMaintenanceJobMemLimit,
		}, 3,
		log, logrus.InfoLevel, logging.NewFormatFlag())
	// PruneRepo blocks until the Job completes, which never happens without a kubelet.
	pruned := make(chan error, 1)
	go func() { pruned <- mgr.PruneRepo(repo) }()
	for {
		jobs := &batchv1api.JobList{}
		if err := crClient.List(ctx, jobs, client.InNamespace(veleroNamespace),
			client.MatchingLabels{repository.RepositoryNameLabel: repoName}); err != nil {
			return err
		}
		if len(jobs.Items) > 0 {
			return printJSON(map[string]string{"job": jobs.Items[0].Name})
		}
		select {
		case err := <-pruned:
			return fmt.Errorf("PruneRepo returned before a Job existed: %v", err)
		case <-ctx.Done():
			return fmt.Errorf("no maintenance Job within the deadline")
		case <-time.After(100 * time.Millisecond):
		}
	}
}
