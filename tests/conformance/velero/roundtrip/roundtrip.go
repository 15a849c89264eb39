// Package roundtrip drives Velero's own data-mover storage path against an Azure Blob endpoint
// (Azurite in the tests): it prepares the kopia repository as the Velero server does, connects
// to it as a data-mover pod does, snapshots a directory tree with Velero's kopia uploader,
// restores it into a fresh directory and compares the two trees byte for byte.
//
// Everything version-specific (the repo service's Init vs Create/Connect, how a Progress is made)
// comes in through Hooks from each per-version main module (../velero-X.Y.Z), which pins Velero
// and copies its kopia replace; this package compiles against whichever Velero that module pins.
//
// The only Azure credential is the managed identity that azidentity finds in the environment
// (IDENTITY_ENDPOINT + IDENTITY_HEADER, served by imds-broker): the credentials file holds
// AZURE_CLIENT_ID alone, as on a cluster whose BSL has no secret (Velero 1.17+ needs the ID).
package roundtrip

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"math/rand"
	"os"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/kopia/kopia/repo"
	"github.com/sirupsen/logrus"
	"github.com/vmware-tanzu/velero/pkg/repository/udmrepo"
	"github.com/vmware-tanzu/velero/pkg/uploader"
	"github.com/vmware-tanzu/velero/pkg/uploader/kopia"
)

// Hooks are the calls whose shape differs between Velero versions.
type Hooks struct {
	// Prepare creates the repository in the BSL the way the server's PrepareRepo does
	// (1.15/1.17: Init(createNew=false) answers ErrRepositoryNotInitialized, then
	// Init(createNew=true); 1.18: IsReady is false, then Create).
	Prepare func(ctx context.Context, opt udmrepo.RepoOptions) error
	// Connect writes a fresh config file for the existing repository, as a data-mover pod's
	// BoostRepoConnect does (1.15/1.17: Init(createNew=false); 1.18: Connect).
	Connect func(ctx context.Context, opt udmrepo.RepoOptions) error
	// Open opens the repository from its config file (the repo service's Open).
	Open func(ctx context.Context, opt udmrepo.RepoOptions) (udmrepo.BackupRepo, error)
	// NewProgress builds the uploader's progress reporter (a struct literal before 1.17,
	// kopia.NewProgress after).
	NewProgress func(updater uploader.ProgressUpdater, interval time.Duration, log logrus.FieldLogger) *kopia.Progress
	// NewUploader builds kopia's uploader as the data mover's RunBackup does (Progress set,
	// FailFast on): snapshotfs.NewUploader before 1.17, upload.NewUploader after.
	NewUploader func(w repo.RepositoryWriter, p *kopia.Progress) kopia.SnapshotUploader
}

// Velero's default repository password (pkg/repository/keys: the velero-repo-credentials
// secret holds it unless the user changed it).
const repoPassword = "static-passw0rd"

type result struct {
	OK          bool               `json:"ok"`
	Velero      string             `json:"velero"`
	Error       string             `json:"error,omitempty"`
	Steps       []step             `json:"steps"`
	SnapshotID  string             `json:"snapshot_id,omitempty"`
	Files       int                `json:"files"`
	Bytes       int64              `json:"bytes"`
	DurationsMs map[string]float64 `json:"durations_ms"`
	RepoPrefix  string             `json:"repo_prefix"`
}

type step struct {
	Name string `json:"name"`
	OK   bool   `json:"ok"`
	Info string `json:"info,omitempty"`
}

type nopUpdater struct{}

func (nopUpdater) UpdateProgress(*uploader.Progress) {}

// Main runs the round trip and prints one JSON line (the result) on stdout; exit 1 on failure.
func Main(veleroVersion string, hooks Hooks) {
	var (
		account   = flag.String("account", "devstoreaccount1", "BSL config storageAccount")
		uri       = flag.String("uri", "", "BSL config storageAccountURI (Azurite's path-style URL)")
		container = flag.String("container", "", "BSL objectStorage.bucket (must exist)")
		prefix    = flag.String("prefix", "velero", "BSL objectStorage.prefix")
		caFile    = flag.String("ca-file", "", "PEM CA of the Storage endpoint (BSL objectStorage.caCert)")
		clientID  = flag.String("client-id", "", "AZURE_CLIENT_ID in the BSL credentials file")
		work      = flag.String("work", "", "scratch directory (source tree, restore target, kopia config)")
		timeout   = flag.Duration("timeout", 3*time.Minute, "overall deadline")
	)
	flag.Parse()

	res := &result{Velero: veleroVersion, DurationsMs: map[string]float64{}}
	err := run(res, hooks, *account, *uri, *container, *prefix, *caFile, *clientID, *work, *timeout)
	if err != nil {
		res.Error = err.Error()
	}
	res.OK = err == nil
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
	if err != nil {
		os.Exit(1)
	}
}

func run(res *result, hooks Hooks, account, uri, container, prefix, caFile, clientID, work string, timeout time.Duration) error {
	if uri == "" || container == "" || caFile == "" || work == "" {
		return errors.New("-uri, -container, -ca-file and -work are required")
	}
	for _, k := range []string{"AZURE_CLIENT_SECRET", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_CLIENT_CERTIFICATE_PATH", "AZURE_STORAGE_KEY"} {
		if os.Getenv(k) != "" {
			return fmt.Errorf("%s is set: this program must get its only credential from the broker", k)
		}
	}
	if os.Getenv("IDENTITY_ENDPOINT") == "" || os.Getenv("IDENTITY_HEADER") == "" {
		return errors.New("IDENTITY_ENDPOINT and IDENTITY_HEADER (the broker's App Service endpoint) must be set")
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()

	log := logrus.New()
	log.SetOutput(os.Stderr)
	log.SetLevel(logrus.InfoLevel)

	ca, err := os.ReadFile(caFile)
	if err != nil {
		return err
	}
	// The BSL's credential secret, as Velero's FileStore writes it to disk for the server and
	// the data mover: here it names the identity only; no secret.
	credFile := filepath.Join(work, "bsl-credentials")
	if err := os.WriteFile(credFile, []byte("AZURE_CLIENT_ID="+clientID+"\n"), 0o600); err != nil {
		return err
	}
	repoName := "default-default-kopia-" + fmt.Sprint(time.Now().UnixNano()%1e6)
	// getStorageVariables + getStorageCredentials (pkg/repository/provider/unified_repo.go) for
	// an azure BSL: the BSL config copied as is, then bucket, prefix <prefix>/kopia/<repo>/,
	// caCert base64 of objectStorage.caCert, region, fspath, and the credentials file path.
	bslConfig := map[string]string{
		"storageAccount":    account,
		"storageAccountURI": uri,
		"useAAD":            "true",
	}
	storeOpts := map[string]string{}
	for k, v := range bslConfig {
		storeOpts[k] = v
	}
	storeOpts[udmrepo.StoreOptionOssBucket] = container
	storeOpts[udmrepo.StoreOptionPrefix] = path.Join(prefix, "kopia", repoName) + "/"
	storeOpts[udmrepo.StoreOptionCACert] = base64.StdEncoding.EncodeToString(ca)
	storeOpts[udmrepo.StoreOptionOssRegion] = ""
	storeOpts[udmrepo.StoreOptionFsPath] = ""
	storeOpts["credentialsFile"] = credFile
	res.RepoPrefix = storeOpts[udmrepo.StoreOptionPrefix]

	options := func(configDir, desc string, withStore bool) udmrepo.RepoOptions {
		o := udmrepo.RepoOptions{
			StorageType:    udmrepo.StorageTypeAzure,
			RepoPassword:   repoPassword,
			ConfigFilePath: filepath.Join(work, configDir, "repo.conf"),
			GeneralOptions: map[string]string{},
			StorageOptions: map[string]string{},
			Description:    desc,
		}
		if withStore {
			o.GeneralOptions[udmrepo.GenOptionOwnerName] = udmrepo.GetRepoUser()
			o.GeneralOptions[udmrepo.GenOptionOwnerDomain] = udmrepo.GetRepoDomain()
			for k, v := range storeOpts {
				o.StorageOptions[k] = v
			}
		}
		return o
	}
	timed := func(name string, f func() (string, error)) error {
		start := time.Now()
		info, err := f()
		res.DurationsMs[name] = float64(time.Since(start).Microseconds()) / 1000
		s := step{Name: name, OK: err == nil, Info: info}
		if err != nil {
			s.Info = err.Error()
		}
		res.Steps = append(res.Steps, s)
		fmt.Fprintf(os.Stderr, "step %-10s ok=%v %s (%.0f ms)\n", name, err == nil, s.Info, res.DurationsMs[name])
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		return nil
	}

	src := filepath.Join(work, "source")
	if err := timed("tree", func() (string, error) {
		n, size, err := makeTree(src)
		res.Files, res.Bytes = n, size
		return fmt.Sprintf("%d files, %d bytes", n, size), err
	}); err != nil {
		return err
	}

	// 1. The server (backup repository controller) prepares the repository.
	server := options("server", "repo prepare", true)
	if err := timed("prepare", func() (string, error) {
		return "", hooks.Prepare(ctx, server)
	}); err != nil {
		return err
	}

	// 2. A data-mover pod (backup) connects with its own config file, opens, uploads.
	backupOpt := options("backup-pod", "data mover backup", true)
	if err := timed("connect", func() (string, error) { return "", hooks.Connect(ctx, backupOpt) }); err != nil {
		return err
	}
	if err := timed("backup", func() (string, error) {
		repo, err := hooks.Open(ctx, options("backup-pod", "data mover backup", false))
		if err != nil {
			return "", err
		}
		defer repo.Close(ctx)
		writer := kopia.NewShimRepo(repo)
		up := hooks.NewUploader(writer, hooks.NewProgress(nopUpdater{}, time.Second, log))
		tags := map[string]string{
			uploader.SnapshotRequesterTag: "snapshot-data-upload",
			uploader.SnapshotUploaderTag:  uploader.KopiaType,
		}
		cfg := map[string]string{}
		if repo.GetAdvancedFeatures().MultiPartBackup {
			cfg[kopia.UploaderConfigMultipartKey] = "true"
		}
		info, _, err := kopia.Backup(ctx, up, writer, src, "", false, "", uploader.PersistentVolumeFilesystem, cfg, tags, log)
		if err != nil {
			return "", err
		}
		res.SnapshotID = info.ID
		return fmt.Sprintf("snapshot %s, %d bytes", info.ID, info.Size), nil
	}); err != nil {
		return err
	}

	// 3. A data-mover pod (restore) with yet another config file restores into a fresh directory.
	restoreOpt := options("restore-pod", "data mover restore", true)
	dst := filepath.Join(work, "restored")
	if err := timed("restore", func() (string, error) {
		if err := hooks.Connect(ctx, restoreOpt); err != nil {
			return "", fmt.Errorf("connect: %w", err)
		}
		repo, err := hooks.Open(ctx, options("restore-pod", "data mover restore", false))
		if err != nil {
			return "", err
		}
		defer repo.Close(ctx)
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return "", err
		}
		progress := hooks.NewProgress(nopUpdater{}, time.Second, log)
		size, count, err := kopia.Restore(context.Background(), kopia.NewShimRepo(repo), progress, res.SnapshotID, dst,
			uploader.PersistentVolumeFilesystem, map[string]string{}, log, make(chan struct{}))
		return fmt.Sprintf("%d bytes, %d files", size, count), err
	}); err != nil {
		return err
	}

	return timed("compare", func() (string, error) {
		a, err := digestTree(src)
		if err != nil {
			return "", err
		}
		b, err := digestTree(dst)
		if err != nil {
			return "", err
		}
		if diff := compare(a, b); diff != "" {
			return "", errors.New(diff)
		}
		return fmt.Sprintf("%d entries identical", len(a)), nil
	})
}

// makeTree writes a small tree: nested directories, an empty file and an empty directory,
// text files, and random binary files up to 3 MiB (several kopia chunks), with mixed modes.
func makeTree(root string) (int, int64, error) {
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	files := map[string]int{
		"README.txt":                0,
		"empty":                     0,
		"etc/app.conf":              0,
		"data/small.bin":            1000,
		"data/one-mib.bin":          1 << 20,
		"data/nested/deep/3mib.bin": 3 << 20,
		"data/nested/deep/odd.bin":  65537,
		"logs/2026/01/app.log":      0,
	}
	texts := map[string]string{
		"README.txt":           "written by the imds-broker Velero storage test\n",
		"etc/app.conf":         "key = value\n",
		"logs/2026/01/app.log": strings.Repeat("a log line\n", 500),
	}
	var total int64
	for name, size := range files {
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return 0, 0, err
		}
		var data []byte
		if t, ok := texts[name]; ok {
			data = []byte(t)
		} else {
			data = make([]byte, size)
			rng.Read(data)
		}
		mode := os.FileMode(0o644)
		if name == "etc/app.conf" {
			mode = 0o600
		}
		if err := os.WriteFile(p, data, mode); err != nil {
			return 0, 0, err
		}
		if err := os.Chmod(p, mode); err != nil {
			return 0, 0, err
		}
		total += int64(len(data))
	}
	if err := os.MkdirAll(filepath.Join(root, "empty-dir"), 0o755); err != nil {
		return 0, 0, err
	}
	return len(files), total, nil
}

type entry struct {
	kind   string
	mode   fs.FileMode
	size   int64
	sha256 string
}

func digestTree(root string) (map[string]entry, error) {
	out := map[string]entry{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		e := entry{mode: info.Mode().Perm()}
		switch {
		case d.IsDir():
			e.kind = "dir"
		case info.Mode().IsRegular():
			e.kind = "file"
			e.size = info.Size()
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			h := sha256.New()
			_, err = io.Copy(h, f)
			f.Close()
			if err != nil {
				return err
			}
			e.sha256 = hex.EncodeToString(h.Sum(nil))
		default:
			e.kind = info.Mode().Type().String()
		}
		out[rel] = e
		return nil
	})
	return out, err
}

func compare(a, b map[string]entry) string {
	var diffs []string
	for k, ea := range a {
		eb, ok := b[k]
		switch {
		case !ok:
			diffs = append(diffs, "missing after restore: "+k)
		case ea != eb:
			diffs = append(diffs, fmt.Sprintf("differs: %s: %+v vs %+v", k, ea, eb))
		}
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			diffs = append(diffs, "extra after restore: "+k)
		}
	}
	sort.Strings(diffs)
	return strings.Join(diffs, "; ")
}
