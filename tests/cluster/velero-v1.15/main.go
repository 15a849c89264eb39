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
//	velero-v1.15 expose-backup KUBECONFIG NAME SOURCE_NS SOURCE_PVC VOLUME_SNAPSHOT
//	    creates a DataUpload NAME for the CSI VolumeSnapshot SOURCE_NS/VOLUME_SNAPSHOT of
//	    SOURCE_PVC and runs the CSI snapshot exposer's Expose for it (the backup data-mover
//	    pod, after the backup VolumeSnapshot, VolumeSnapshotContent and PVC); prints
//	    {"pod": "<name>"}. Expose waits for the snapshot to be ready: whoever plays the
//	    snapshot controller must make it so.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"

	snapshotterClientSet "github.com/kubernetes-csi/external-snapshotter/client/v7/clientset/versioned"
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
		fail(fmt.Errorf("usage: %s velero|expose-restore|maintenance-job|expose-backup ...", filepath.Base(os.Args[0])))
	}
	switch os.Args[1] {
	case "velero":
		// Exactly what cmd/velero's main does, with the subcommand's arguments.
		os.Args = append([]string{"velero"}, os.Args[2:]...)
		cmd.CheckError(velero.NewCommand("velero").Execute())
	case "expose-restore":
		need(6)
		fail(exposeRestore(os.Args[2], os.Args[3], os.Args[4], os.Args[5]))
	case "expose-backup":
		need(7)
		fail(exposeBackup(os.Args[2], os.Args[3], os.Args[4], os.Args[5], os.Args[6]))
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

// exposeBackup does what the v1.15 node-agent's DataUpload controller does when it accepts a
// CSI DataUpload (the backup data mover): setupExposeParam with the server's defaults, then the
// CSI snapshot exposer's Expose.
func exposeBackup(kubeconfig, name, sourceNS, sourcePVC, volumeSnapshot string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	kubeClient, crClient, err := clients(kubeconfig)
	if err != nil {
		return err
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	snapshotClient, err := snapshotterClientSet.NewForConfig(cfg)
	if err != nil {
		return err
	}
	pvc, err := kubeClient.CoreV1().PersistentVolumeClaims(sourceNS).Get(ctx, sourcePVC, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("get source PVC %s/%s: %w", sourceNS, sourcePVC, err)
	}
	storageClass := ""
	if pvc.Spec.StorageClassName != nil {
		storageClass = *pvc.Spec.StorageClassName
	}
	du := &velerov2alpha1api.DataUpload{
		ObjectMeta: metav1.ObjectMeta{Namespace: veleroNamespace, Name: name},
		Spec: velerov2alpha1api.DataUploadSpec{
			SnapshotType: velerov2alpha1api.SnapshotTypeCSI,
			CSISnapshot: &velerov2alpha1api.CSISnapshotSpec{
				VolumeSnapshot: volumeSnapshot,
				StorageClass:   storageClass,
			},
			SourcePVC:             sourcePVC,
			DataMover:             "velero",
			BackupStorageLocation: "default",
			SourceNamespace:       sourceNS,
			OperationTimeout:      metav1.Duration{Duration: 10 * time.Minute},
		},
	}
	if err := crClient.Create(ctx, du); err != nil {
		return fmt.Errorf("create DataUpload: %w", err)
	}
	if err := crClient.Get(ctx, client.ObjectKeyFromObject(du), du); err != nil {
		return err
	}
	accessMode := exposer.AccessModeFileSystem
	if pvc.Spec.VolumeMode != nil && *pvc.Spec.VolumeMode == corev1api.PersistentVolumeBlock {
		accessMode = exposer.AccessModeBlock
	}
	param := &exposer.CSISnapshotExposeParam{
		SnapshotName:     du.Spec.CSISnapshot.VolumeSnapshot,
		SourceNamespace:  du.Spec.SourceNamespace,
		StorageClass:     du.Spec.CSISnapshot.StorageClass,
		HostingPodLabels: map[string]string{velerov1api.DataUploadLabel: du.Name},
		AccessMode:       accessMode,
		OperationTimeout: du.Spec.OperationTimeout.Duration,
		ExposeTimeout:    time.Minute,
		VolumeSize:       pvc.Spec.Resources.Requests[corev1api.ResourceStorage],
	}
	// getOwnerObject
	owner := corev1api.ObjectReference{
		Kind: "DataUpload", Namespace: du.Namespace, Name: du.Name, UID: du.UID,
		APIVersion: velerov2alpha1api.SchemeGroupVersion.String(),
	}
	if err := exposer.NewCSISnapshotExposer(kubeClient, snapshotClient.SnapshotV1(), logger()).Expose(ctx, owner, param); err != nil {
		return fmt.Errorf("Expose: %w", err)
	}
	// The backup pod is named after its owner (csi_snapshot.go createBackupPod).
	return printJSON(map[string]string{"pod": du.Name})
}
