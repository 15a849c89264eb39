// cert-manager's webhook for the imds-broker cluster tests, built from the release module on
// the Go module proxy. Flags are the release's own webhook flag set (pkg/webhook/options), so
// the chart's args work unchanged; the server is the release's
// internal/webhook.NewCertManagerWebhookServer.
//
// Differences from cert-manager's webhook binary: no --config file (the chart passes none) and
// no cobra command around it.
package main

import (
	"context"
	"fmt"

	"github.com/cert-manager/cert-manager/imdsbrokertest/internal/run"
	"github.com/cert-manager/cert-manager/internal/apis/config/webhook/validation"
	cmwebhook "github.com/cert-manager/cert-manager/internal/webhook"
	logf "github.com/cert-manager/cert-manager/pkg/logs"
	utilfeature "github.com/cert-manager/cert-manager/pkg/util/feature"
	"github.com/cert-manager/cert-manager/pkg/webhook/options"
	"github.com/spf13/pflag"
)

func main() {
	cfg, err := options.NewWebhookConfiguration()
	if err != nil {
		panic(fmt.Errorf("cert-manager's default webhook configuration: %w", err))
	}
	fs := pflag.NewFlagSet("webhook", pflag.ContinueOnError)
	// AddConfigFlags registers the logging flags too (into cfg.Logging).
	options.AddConfigFlags(fs, cfg)
	run.Main("webhook", fs, nil, func(ctx context.Context) error {
		if err := logf.ValidateAndApply(&cfg.Logging); err != nil {
			return fmt.Errorf("logging flags: %w", err)
		}
		if err := utilfeature.DefaultMutableFeatureGate.SetFromMap(cfg.FeatureGates); err != nil {
			return fmt.Errorf("--feature-gates: %w", err)
		}
		if errs := validation.ValidateWebhookConfiguration(cfg, nil); len(errs) > 0 {
			return fmt.Errorf("invalid flags: %w", errs.ToAggregate())
		}
		srv, err := cmwebhook.NewCertManagerWebhookServer(logf.FromContext(ctx), *cfg)
		if err != nil {
			return fmt.Errorf("creating the webhook server: %w", err)
		}
		return srv.Run(ctx)
	})
}
