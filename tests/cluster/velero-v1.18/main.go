// Velero v1.18 as the cluster tests use it: the real `velero` CLI (for `velero install
// --dry-run`) and a driver that creates pods the way Velero does, by calling Velero's own code
// against the test API server:
//
//	velero-v1.18 velero <args...>            Velero's CLI, unchanged
//	velero-v1.18 expose-restore KUBECONFIG NAME TARGET_NS TARGET_PVC
//	    creates a DataDownload NAME and runs the generic restore exposer's Expose for it
//	    (the restore data-mover pod); prints {"pod": "<name>"}
//	velero-v1.18 maintenance-job KUBECONFIG REPO VOLUME_NS BSL
//	    creates a BackupRepository REPO and runs maintenance.StartNewJob (the repository
//	    maintenance Job; the Job controller then creates its pod); prints {"job": "<name>"}
//	velero-v1.18 expose-pvb KUBECONFIG NAME CLIENT_NS CLIENT_POD VOLUME
//	    creates a PodVolumeBackup NAME for VOLUME of the (node-bound) pod CLIENT_NS/CLIENT_POD
//	    and runs the pod-volume exposer's Expose for it (the file-system backup pod, 1.17+);
//	    prints {"pod": "<name>"}. Expose finds the volume under /host_pods/<pod UID>/volumes/
//	    on the machine it runs on, as the node-agent does through its host-pods mount.
//	velero-v1.18 expose-backup KUBECONFIG NAME SOURCE_NS SOURCE_PVC VOLUME_SNAPSHOT
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

	snapshotterClientSet "github.com/kubernetes-csi/external-snapshotter/client/v8/clientset/versioned"
	"github.com/sirupsen/logrus"
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
	"github.com/vmware-tanzu/velero/pkg/cmd/velero"
	"github.com/vmware-tanzu/velero/pkg/exposer"
	"github.com/vmware-tanzu/velero/pkg/nodeagent"
	"github.com/vmware-tanzu/velero/pkg/repository/maintenance"
	"github.com/vmware-tanzu/velero/pkg/util"
	"github.com/vmware-tanzu/velero/pkg/util/kube"
	"github.com/vmware-tanzu/velero/pkg/util/logging"
)

const veleroNamespace = "velero"

func main() {
	if len(os.Args) < 2 {
		fail(fmt.Errorf("usage: %s velero|expose-restore|maintenance-job|expose-pvb|expose-backup ...", filepath.Base(os.Args[0])))
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
	case "expose-pvb":
		need(7)
		fail(exposePodVolumeBackup(os.Args[2], os.Args[3], os.Args[4], os.Args[5], os.Args[6]))
	case "expose-backup":
		need(7)
		fail(exposeBackup(os.Args[2], os.Args[3], os.Args[4], os.Args[5], os.Args[6]))
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

// exposeRestore does what the DataDownload controller does when it accepts a DataDownload:
// the labels, annotations and tolerations as setupExposeParam builds them (default node-agent
// config: the third-party whitelist copied from the node-agent DaemonSet), then Expose.
func exposeRestore(kubeconfig, name, targetNS, targetPVC string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	kubeClient, crClient, err := clients(kubeconfig)
	if err != nil {
		return err
	}
	log := logger()

	dd := &velerov2alpha1api.DataDownload{
		TypeMeta:   metav1.TypeMeta{APIVersion: velerov2alpha1api.SchemeGroupVersion.String(), Kind: "DataDownload"},
		ObjectMeta: metav1.ObjectMeta{Namespace: veleroNamespace, Name: name},
		Spec: velerov2alpha1api.DataDownloadSpec{
			TargetVolume:          velerov2alpha1api.TargetVolumeSpec{PVC: targetPVC, PV: "", Namespace: targetNS},
			BackupStorageLocation: "default",
			DataMover:             "velero",
			SnapshotID:            "cluster-test-snapshot",
			SourceNamespace:       targetNS,
			OperationTimeout:      metav1.Duration{Duration: 10 * time.Minute},
			NodeOS:                velerov2alpha1api.NodeOSLinux,
		},
	}
	if err := crClient.Create(ctx, dd); err != nil {
		return fmt.Errorf("create DataDownload: %w", err)
	}
	// The controller reads the stored object (it has the UID the pod's owner reference needs).
	if err := crClient.Get(ctx, client.ObjectKeyFromObject(dd), dd); err != nil {
		return err
	}
	dd.TypeMeta = metav1.TypeMeta{APIVersion: velerov2alpha1api.SchemeGroupVersion.String(), Kind: "DataDownload"}

	nodeOS := kube.NodeOSLinux
	labels, annotations, tolerations := thirdPartyPodMeta(ctx, kubeClient, dd.Namespace, nodeOS,
		velerov1api.DataDownloadLabel, dd.Name)
	param := exposer.GenericRestoreExposeParam{
		TargetPVCName:         dd.Spec.TargetVolume.PVC,
		TargetNamespace:       dd.Spec.TargetVolume.Namespace,
		HostingPodLabels:      labels,
		HostingPodAnnotations: annotations,
		HostingPodTolerations: tolerations,
		OperationTimeout:      dd.Spec.OperationTimeout.Duration,
		ExposeTimeout:         30 * time.Second,
		NodeOS:                nodeOS,
	}
	owner := corev1api.ObjectReference{
		Kind: dd.Kind, Namespace: dd.Namespace, Name: dd.Name, UID: dd.UID, APIVersion: dd.APIVersion,
	}
	if err := exposer.NewGenericRestoreExposer(kubeClient, log).Expose(ctx, owner, param); err != nil {
		return fmt.Errorf("Expose: %w", err)
	}
	// The restore pod is named after its owner (generic_restore.go createRestorePod).
	return printJSON(map[string]string{"pod": dd.Name})
}

// thirdPartyPodMeta builds a hosting pod's labels, annotations and tolerations as the data-mover
// and pod-volume controllers' setupExposeParam do with the default node-agent config (no
// podLabels/podAnnotations): the pod's own label plus the third-party whitelist copied from the
// node-agent DaemonSet.
func thirdPartyPodMeta(ctx context.Context, kubeClient kubernetes.Interface, ns, nodeOS, ownLabel, owner string) (
	map[string]string, map[string]string, []corev1api.Toleration) {
	labels := map[string]string{ownLabel: owner}
	for _, k := range util.ThirdPartyLabels {
		if v, err := nodeagent.GetLabelValue(ctx, kubeClient, ns, k, nodeOS); err == nil {
			labels[k] = v
		}
	}
	annotations := map[string]string{}
	for _, k := range util.ThirdPartyAnnotations {
		if v, err := nodeagent.GetAnnotationValue(ctx, kubeClient, ns, k, nodeOS); err == nil {
			annotations[k] = v
		}
	}
	tolerations := []corev1api.Toleration{}
	for _, k := range util.ThirdPartyTolerations {
		if v, err := nodeagent.GetToleration(ctx, kubeClient, ns, k, nodeOS); err == nil {
			tolerations = append(tolerations, *v)
		}
	}
	return labels, annotations, tolerations
}

// exposePodVolumeBackup does what the node-agent's PodVolumeBackup controller does when it
// accepts a PodVolumeBackup (1.17+: file-system backup in its own pod): setupExposeParam with
// the default node-agent config (not privileged, the server's default resource timeout), then
// the pod-volume exposer's Expose, which finds the volume on the host and creates the pod.
func exposePodVolumeBackup(kubeconfig, name, clientNS, clientPod, volume string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	kubeClient, crClient, err := clients(kubeconfig)
	if err != nil {
		return err
	}
	pod, err := kubeClient.CoreV1().Pods(clientNS).Get(ctx, clientPod, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("get client pod %s/%s: %w", clientNS, clientPod, err)
	}
	pvb := &velerov1api.PodVolumeBackup{
		ObjectMeta: metav1.ObjectMeta{Namespace: veleroNamespace, Name: name},
		Spec: velerov1api.PodVolumeBackupSpec{
			Node: pod.Spec.NodeName,
			Pod: corev1api.ObjectReference{
				Kind: "Pod", Namespace: clientNS, Name: clientPod, UID: pod.UID,
			},
			Volume:                volume,
			BackupStorageLocation: "default",
			RepoIdentifier:        "azure:velero/restic/" + clientNS,
			UploaderType:          "kopia",
		},
	}
	if err := crClient.Create(ctx, pvb); err != nil {
		return fmt.Errorf("create PodVolumeBackup: %w", err)
	}
	if err := crClient.Get(ctx, client.ObjectKeyFromObject(pvb), pvb); err != nil {
		return err
	}
	nodeOS, err := kube.GetNodeOS(ctx, pvb.Spec.Node, kubeClient.CoreV1())
	if err != nil {
		return fmt.Errorf("node OS of %s: %w", pvb.Spec.Node, err)
	}
	labels, annotations, tolerations := thirdPartyPodMeta(ctx, kubeClient, pvb.Namespace, nodeOS,
		velerov1api.PVBLabel, pvb.Name)
	param := exposer.PodVolumeExposeParam{
		Type:                  exposer.PodVolumeExposeTypeBackup,
		ClientNamespace:       pvb.Spec.Pod.Namespace,
		ClientPodName:         pvb.Spec.Pod.Name,
		ClientPodVolume:       pvb.Spec.Volume,
		HostingPodLabels:      labels,
		HostingPodAnnotations: annotations,
		HostingPodTolerations: tolerations,
		OperationTimeout:      10 * time.Minute,
	}
	// getPVBOwnerObject
	owner := corev1api.ObjectReference{
		Kind: "PodVolumeBackup", Namespace: pvb.Namespace, Name: pvb.Name, UID: pvb.UID,
		APIVersion: velerov1api.SchemeGroupVersion.String(),
	}
	if err := exposer.NewPodVolumeExposer(kubeClient, logger()).Expose(ctx, owner, param); err != nil {
		return fmt.Errorf("Expose: %w", err)
	}
	// The hosting pod is named after its owner (pod_volume.go createHostingPod).
	return printJSON(map[string]string{"pod": pvb.Name})
}

// exposeBackup does what the node-agent's DataUpload controller does when it accepts a CSI
// DataUpload (the backup data mover, the pod this project exists for): setupExposeParam with
// the default node-agent config, then the CSI snapshot exposer's Expose.
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
	log := logger()

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

	// setupExposeParam (data_upload_controller.go) with the server's defaults.
	nodeOS := kube.GetPVCAttachingNodeOS(pvc, kubeClient.CoreV1(), kubeClient.StorageV1(), log)
	if err := kube.HasNodeWithOS(ctx, nodeOS, kubeClient.CoreV1()); err != nil {
		return fmt.Errorf("no node for the data upload: %w", err)
	}
	accessMode := exposer.AccessModeFileSystem
	if pvc.Spec.VolumeMode != nil && *pvc.Spec.VolumeMode == corev1api.PersistentVolumeBlock {
		accessMode = exposer.AccessModeBlock
	}
	labels, annotations, tolerations := thirdPartyPodMeta(ctx, kubeClient, du.Namespace, nodeOS,
		velerov1api.DataUploadLabel, du.Name)
	param := &exposer.CSISnapshotExposeParam{
		SnapshotName:          du.Spec.CSISnapshot.VolumeSnapshot,
		SourceNamespace:       du.Spec.SourceNamespace,
		SourcePVCName:         pvc.Name,
		SourcePVName:          pvc.Spec.VolumeName,
		StorageClass:          du.Spec.CSISnapshot.StorageClass,
		HostingPodLabels:      labels,
		HostingPodAnnotations: annotations,
		HostingPodTolerations: tolerations,
		AccessMode:            accessMode,
		OperationTimeout:      du.Spec.OperationTimeout.Duration,
		ExposeTimeout:         time.Minute,
		VolumeSize:            pvc.Spec.Resources.Requests[corev1api.ResourceStorage],
		NodeOS:                nodeOS,
	}
	// getOwnerObject
	owner := corev1api.ObjectReference{
		Kind: "DataUpload", Namespace: du.Namespace, Name: du.Name, UID: du.UID,
		APIVersion: velerov2alpha1api.SchemeGroupVersion.String(),
	}
	if err := exposer.NewCSISnapshotExposer(kubeClient, snapshotClient.SnapshotV1(), log).Expose(ctx, owner, param); err != nil {
		return fmt.Errorf("Expose: %w", err)
	}
	// The backup pod is named after its owner (csi_snapshot.go createBackupPod).
	return printJSON(map[string]string{"pod": du.Name})
}

// maintenanceJob does what the BackupRepository controller does when maintenance is due.
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
	job, err := maintenance.StartNewJob(crClient, ctx, repo, "", logrus.InfoLevel, logging.NewFormatFlag(), logger())
	if err != nil {
		return fmt.Errorf("StartNewJob: %w", err)
	}
	return printJSON(map[string]string{"job": job})
}
