// cert-manager's controller for the imds-broker cluster tests, built from the release module
// on the Go module proxy: the release's pkg/controller.ContextFactory, and the control loops
// registered in pkg/controller.Known() by the packages imported below, each run with the
// release's default worker count.
//
// Only the control loops the tests need run (`loops` below): Issuers with the SelfSigned and CA
// issuer types, the Certificate loops (trigger, key manager, request manager, issuing,
// readiness, revision manager), and the CertificateRequest approver and SelfSigned/CA signers.
// Left out: ClusterIssuers, ACME, Vault, Venafi, the ingress/Gateway shims,
// CertificateSigningRequests and the certificate metrics loop: no test uses them.
//
// Other differences from cert-manager's controller binary:
//   - only the flags the chart and the fixture pass; any other flag is an error. The ACME
//     flags the chart passes (--acme-http01-solver-image, --max-concurrent-challenges) are
//     accepted and handed to the context, which no loop run here reads;
//   - no leader election (--leader-elect=true is refused: the fixture runs one replica), so
//     --leader-election-namespace is accepted and unused;
//   - metrics over plain HTTP only and without cert-manager's resource collectors, no pprof;
//   - PEM size limits, QPS/burst and workers are the release's defaults (no flags for them).
package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"

	"github.com/cert-manager/cert-manager/imdsbrokertest/internal/run"
	config "github.com/cert-manager/cert-manager/internal/apis/config/controller"
	configscheme "github.com/cert-manager/cert-manager/internal/apis/config/controller/scheme"
	configv1alpha1 "github.com/cert-manager/cert-manager/pkg/apis/config/controller/v1alpha1"
	"github.com/cert-manager/cert-manager/pkg/controller"
	"github.com/cert-manager/cert-manager/pkg/healthz"
	logf "github.com/cert-manager/cert-manager/pkg/logs"
	"github.com/spf13/pflag"
	"golang.org/x/sync/errgroup"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"

	"github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/approver"
	crca "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/ca"
	crselfsigned "github.com/cert-manager/cert-manager/pkg/controller/certificaterequests/selfsigned"
	"github.com/cert-manager/cert-manager/pkg/controller/certificates/issuing"
	"github.com/cert-manager/cert-manager/pkg/controller/certificates/keymanager"
	"github.com/cert-manager/cert-manager/pkg/controller/certificates/readiness"
	"github.com/cert-manager/cert-manager/pkg/controller/certificates/requestmanager"
	"github.com/cert-manager/cert-manager/pkg/controller/certificates/revisionmanager"
	"github.com/cert-manager/cert-manager/pkg/controller/certificates/trigger"
	"github.com/cert-manager/cert-manager/pkg/controller/issuers"
	_ "github.com/cert-manager/cert-manager/pkg/issuer/ca"         // the CA issuer type
	_ "github.com/cert-manager/cert-manager/pkg/issuer/selfsigned" // the SelfSigned issuer type
)

// The control loops run, by the names they register in controller.Known(). Importing a loop's
// package registers it, and these packages import others (ACME, Vault, Venafi, the shims,
// CertificateSigningRequests...), so Known() holds more than these: the rest are not
// constructed, as cert-manager's --controllers leaves loops out.
var loops = []string{
	issuers.ControllerName,
	trigger.ControllerName, keymanager.ControllerName, requestmanager.ControllerName,
	issuing.ControllerName, readiness.ControllerName, revisionmanager.ControllerName,
	approver.ControllerName, crselfsigned.CRControllerName, crca.CRControllerName,
}

func defaults() *config.ControllerConfiguration {
	scheme, _, err := configscheme.NewSchemeAndCodecs()
	utilruntime.Must(err)
	versioned := &configv1alpha1.ControllerConfiguration{}
	scheme.Default(versioned)
	cfg := &config.ControllerConfiguration{}
	utilruntime.Must(scheme.Convert(versioned, cfg, nil))
	return cfg
}

func main() {
	cfg := defaults()
	fs := pflag.NewFlagSet("controller", pflag.ContinueOnError)
	fs.StringVar(&cfg.KubeConfig, "kubeconfig", "", "kubeconfig of the controller's identity (required)")
	fs.StringVar(&cfg.ClusterResourceNamespace, "cluster-resource-namespace", cfg.ClusterResourceNamespace, "namespace of cluster-scoped issuers' resources")
	fs.BoolVar(&cfg.LeaderElectionConfig.Enabled, "leader-elect", false, "must be false: this build does no leader election")
	fs.StringVar(&cfg.LeaderElectionConfig.Namespace, "leader-election-namespace", "", "accepted for the chart's args; unused")
	fs.StringVar(&cfg.ACMEHTTP01Config.SolverImage, "acme-http01-solver-image", cfg.ACMEHTTP01Config.SolverImage, "accepted for the chart's args; no ACME loop runs")
	fs.IntVar(&cfg.MaxConcurrentChallenges, "max-concurrent-challenges", cfg.MaxConcurrentChallenges, "accepted for the chart's args; no ACME loop runs")
	fs.StringVar(&cfg.MetricsListenAddress, "metrics-listen-address", cfg.MetricsListenAddress, "host:port of the plain-HTTP metrics endpoint")
	fs.StringVar(&cfg.HealthzListenAddress, "internal-healthz-listen-address", cfg.HealthzListenAddress, "host:port of the /livez endpoint")
	run.Main("controller", fs, &cfg.Logging, func(ctx context.Context) error { return runController(ctx, cfg) })
}

func runController(ctx context.Context, cfg *config.ControllerConfiguration) error {
	if cfg.LeaderElectionConfig.Enabled {
		return errors.New("--leader-elect=true: this test build does no leader election; pass --leader-elect=false")
	}
	if cfg.KubeConfig == "" {
		return errors.New("--kubeconfig is required")
	}
	log := logf.FromContext(ctx)
	factory, err := controller.NewContextFactory(ctx, controller.ContextOptions{
		Kubeconfig:         cfg.KubeConfig,
		KubernetesAPIQPS:   cfg.KubernetesAPIQPS,
		KubernetesAPIBurst: cfg.KubernetesAPIBurst,
		IssuerOptions:      controller.IssuerOptions{ClusterResourceNamespace: cfg.ClusterResourceNamespace},
		ACMEOptions:        controller.ACMEOptions{HTTP01SolverImage: cfg.ACMEHTTP01Config.SolverImage},
		SchedulerOptions:   controller.SchedulerOptions{MaxConcurrentChallenges: cfg.MaxConcurrentChallenges},
		CertificateOptions: controller.CertificateOptions{
			EnableOwnerRef:                           cfg.EnableCertificateOwnerRef,
			CopiedAnnotationPrefixes:                 cfg.CopiedAnnotationPrefixes,
			CertificateRequestMinimumBackoffDuration: cfg.CertificateRequestMinimumBackoffDuration,
			CertificateRequestMaximumBackoffDuration: cfg.CertificateRequestMaximumBackoffDuration,
		},
	})
	if err != nil {
		return fmt.Errorf("building cert-manager's controller context: %w", err)
	}
	shared, err := factory.Build()
	if err != nil {
		return fmt.Errorf("building cert-manager's controller context: %w", err)
	}

	g, ctx := errgroup.WithContext(ctx)
	var lc net.ListenConfig
	healthLn, err := lc.Listen(ctx, "tcp", cfg.HealthzListenAddress)
	if err != nil {
		return fmt.Errorf("listening on --internal-healthz-listen-address %s: %w", cfg.HealthzListenAddress, err)
	}
	g.Go(func() error { return healthz.NewServer(cfg.LeaderElectionConfig.HealthzTimeout).Start(ctx, healthLn) })
	metricsLn, err := lc.Listen(ctx, "tcp", cfg.MetricsListenAddress)
	if err != nil {
		return fmt.Errorf("listening on --metrics-listen-address %s: %w", cfg.MetricsListenAddress, err)
	}
	metrics := shared.Metrics.NewServer(metricsLn)
	g.Go(func() error { <-ctx.Done(); return metrics.Close() })
	g.Go(func() error {
		if err := metrics.Serve(metricsLn); !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("metrics server: %w", err)
		}
		return nil
	})

	// Constructing a loop registers its informers on the shared factories, so every loop is
	// constructed before the factories start.
	for _, name := range loops {
		construct, ok := controller.Known()[name]
		if !ok {
			return fmt.Errorf("control loop %s is not registered in this cert-manager release", name)
		}
		loop, err := construct(factory)
		if err != nil {
			return fmt.Errorf("constructing control loop %s: %w", name, err)
		}
		log.Info("starting control loop", "controller", name)
		g.Go(func() error { return loop.Run(cfg.NumberOfConcurrentWorkers, ctx) })
	}
	shared.SharedInformerFactory.Start(ctx.Done())
	shared.KubeSharedInformerFactory.Start(ctx.Done())
	shared.HTTP01ResourceMetadataInformersFactory.Start(ctx.Done())
	return g.Wait()
}
