// cert-manager's cainjector for the imds-broker cluster tests, built from the release module on
// the Go module proxy: a controller-runtime manager with the release's
// pkg/controller/cainjector.RegisterAllInjectors, configured from the release's defaults
// (internal/apis/config/cainjector, v1alpha1 defaulting).
//
// Differences from cert-manager's cainjector binary, none of which the tests exercise:
//   - only the flags the chart and the fixture pass (--v, --kubeconfig, --leader-elect,
//     --leader-election-namespace, --metrics-listen-address); any other flag is an error;
//   - no leader election (--leader-elect=true is refused: the fixture runs one replica), so
//     --leader-election-namespace is accepted and unused;
//   - metrics over plain HTTP only (no metrics TLS), no pprof;
//   - the client config comes from --kubeconfig only (no in-cluster fallback, no KUBECONFIG);
//   - no wait for the Certificate CRD before starting: the fixture installs the CRDs first.
package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/cert-manager/cert-manager/imdsbrokertest/internal/run"
	config "github.com/cert-manager/cert-manager/internal/apis/config/cainjector"
	configscheme "github.com/cert-manager/cert-manager/internal/apis/config/cainjector/scheme"
	configv1alpha1 "github.com/cert-manager/cert-manager/pkg/apis/config/cainjector/v1alpha1"
	cmscheme "github.com/cert-manager/cert-manager/pkg/client/clientset/versioned/scheme"
	"github.com/cert-manager/cert-manager/pkg/controller/cainjector"
	"github.com/cert-manager/cert-manager/pkg/util"
	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	apiext "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	kscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/clientcmd"
	apireg "k8s.io/kube-aggregator/pkg/apis/apiregistration/v1"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
)

func defaults() *config.CAInjectorConfiguration {
	scheme, _, err := configscheme.NewSchemeAndCodecs()
	utilruntime.Must(err)
	versioned := &configv1alpha1.CAInjectorConfiguration{}
	scheme.Default(versioned)
	cfg := &config.CAInjectorConfiguration{}
	utilruntime.Must(scheme.Convert(versioned, cfg, nil))
	return cfg
}

func main() {
	cfg := defaults()
	fs := pflag.NewFlagSet("cainjector", pflag.ContinueOnError)
	fs.StringVar(&cfg.KubeConfig, "kubeconfig", "", "kubeconfig of the cainjector's identity (required)")
	fs.BoolVar(&cfg.LeaderElectionConfig.Enabled, "leader-elect", false, "must be false: this build does no leader election")
	fs.StringVar(&cfg.LeaderElectionConfig.Namespace, "leader-election-namespace", "", "accepted for the chart's args; unused")
	fs.StringVar(&cfg.MetricsListenAddress, "metrics-listen-address", cfg.MetricsListenAddress, "host:port of the plain-HTTP metrics endpoint")
	run.Main("cainjector", fs, &cfg.Logging, func(ctx context.Context) error { return runInjector(ctx, cfg) })
}

func runInjector(ctx context.Context, cfg *config.CAInjectorConfiguration) error {
	if cfg.LeaderElectionConfig.Enabled {
		return errors.New("--leader-elect=true: this test build does no leader election; pass --leader-elect=false")
	}
	if cfg.KubeConfig == "" {
		return errors.New("--kubeconfig is required")
	}
	restConfig, err := clientcmd.BuildConfigFromFlags("", cfg.KubeConfig)
	if err != nil {
		return fmt.Errorf("loading --kubeconfig %s: %w", cfg.KubeConfig, err)
	}
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{
		kscheme.AddToScheme, cmscheme.AddToScheme, apiext.AddToScheme, apireg.AddToScheme,
	} {
		utilruntime.Must(add(scheme))
	}
	mgr, err := ctrl.NewManager(util.RestConfigWithUserAgent(restConfig, "cainjector"), ctrl.Options{
		Scheme: scheme,
		// As cert-manager's cainjector: Secrets are read directly, not cached (the injectors
		// watch them metadata-only), and a read of an unwatched kind fails instead of starting
		// an informer behind the injectors' backs.
		Cache:   cache.Options{ReaderFailOnMissingInformer: true},
		Client:  client.Options{Cache: &client.CacheOptions{DisableFor: []client.Object{&corev1.Secret{}}}},
		Metrics: metricsserver.Options{BindAddress: cfg.MetricsListenAddress},
	})
	if err != nil {
		return fmt.Errorf("creating the controller-runtime manager: %w", err)
	}
	// All four injectable kinds and the Certificate data source, as the defaults say.
	err = cainjector.RegisterAllInjectors(ctx, mgr, cainjector.SetupOptions{
		Namespace:                    cfg.Namespace,
		IgnoreNamespaces:             cfg.IgnoreNamespaces,
		EnableCertificatesDataSource: cfg.EnableDataSourceConfig.Certificates,
		EnabledReconcilersFor: map[string]bool{
			cainjector.MutatingWebhookConfigurationName:   cfg.EnableInjectableConfig.MutatingWebhookConfigurations,
			cainjector.ValidatingWebhookConfigurationName: cfg.EnableInjectableConfig.ValidatingWebhookConfigurations,
			cainjector.APIServiceName:                     cfg.EnableInjectableConfig.APIServices,
			cainjector.CustomResourceDefinitionName:       cfg.EnableInjectableConfig.CustomResourceDefinitions,
		},
	})
	if err != nil {
		return fmt.Errorf("registering the CA injectors: %w", err)
	}
	return mgr.Start(ctx)
}
