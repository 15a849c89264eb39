// Package run is what the three test mains share: a context ended by SIGTERM/SIGINT (how the
// cluster fixture stops a process) and cert-manager's logging set up from the -v style flags
// the chart passes.
package run

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	logf "github.com/cert-manager/cert-manager/pkg/logs"
	"github.com/spf13/pflag"
	logsapi "k8s.io/component-base/logs/api/v1"
)

// Main parses args with fs (positional arguments are an error: the chart passes none), applies
// the logging flags, and runs fn until it returns or a signal ends the context. It exits 1 with
// the error on failure.
func Main(component string, fs *pflag.FlagSet, logging *logsapi.LoggingConfiguration, fn func(context.Context) error) {
	logf.InitLogs()
	defer logf.FlushLogs()
	if err := parse(component, fs, logging); errors.Is(err, pflag.ErrHelp) {
		os.Exit(0)
	} else if err != nil {
		fmt.Fprintf(os.Stderr, "cert-manager %s (imds-broker cluster-test build): %v\n", component, err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	ctx = logf.NewContext(ctx, logf.Log, component)
	if err := fn(ctx); err != nil {
		logf.Log.Error(err, "exiting", "component", component)
		logf.FlushLogs()
		os.Exit(1)
	}
}

func parse(component string, fs *pflag.FlagSet, logging *logsapi.LoggingConfiguration) error {
	if logging != nil {
		logf.AddFlags(logging, fs)
	}
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if logging != nil {
		if err := logf.ValidateAndApply(logging); err != nil {
			return fmt.Errorf("logging flags: %w", err)
		}
	}
	return nil
}
