//! The command line: global flags and the subcommands, each of which owns its own flags
//! ([`crate::serve`], [`crate::node`], [`crate::webhook`], [`crate::netns`],
//! [`crate::velero_env`]).
//!
//! Every flag can also be set through the environment variable named in its help, so the same
//! image can be configured from a pod spec (env) or a shell (flags). Durations take humantime
//! syntax: `500ms`, `30s`, `5m`.

pub use crate::logging::LogFormat;
use clap::{Parser, Subcommand};

/// Sidecar that serves Entra workload-identity tokens on the Azure IMDS and App Service
/// managed-identity endpoints, so unmodified Azure SDK clients authenticate without the
/// Azure Workload Identity label.
#[derive(Debug, Parser)]
#[command(name = "imds-broker", version, about, long_about = None)]
pub struct Cli {
    /// Log format: `json` (one object per line, for log pipelines) or `text` (for humans).
    /// The level is set with RUST_LOG (default `info`).
    #[arg(
        long,
        global = true,
        env = "IMDS_BROKER_LOG_FORMAT",
        default_value = "json"
    )]
    pub log_format: LogFormat,

    /// Worker threads of the async runtime. Default: 1 for `serve` (one pod's token traffic;
    /// a second worker only adds cross-CPU wake-ups on the hot path), 2 for the other commands
    /// (1 on a single CPU), or Tokio's TOKIO_WORKER_THREADS when that is set. Tokio's own
    /// default, one worker per CPU of the node, cost every pod on a 64-CPU node 64 threads
    /// and +0.9 MiB of memory.
    #[arg(
        long,
        global = true,
        env = "IMDS_BROKER_WORKER_THREADS",
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    pub worker_threads: Option<u16>,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The worker count to configure, or `None` to leave it to TOKIO_WORKER_THREADS.
    pub fn workers(&self) -> Option<usize> {
        if let Some(n) = self.worker_threads {
            return Some(n.into());
        }
        if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
            return None;
        }
        if matches!(self.command, Command::Serve(_)) {
            // At one connection a second worker made the broker slower than nginx, every
            // request waking the idle worker on the other CPU (bench/RESULTS.md).
            return Some(1);
        }
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Some(cpus.min(2))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the token broker (the sidecar).
    Serve(Box<crate::serve::ServeArgs>),
    /// Run the token broker for the pods of this node (a DaemonSet), attesting each caller.
    Node(Box<crate::node::NodeArgs>),
    /// Run the mutating admission webhook that injects the broker into matching pods.
    Webhook(Box<crate::webhook::WebhookArgs>),
    /// Check every link from the token file to a served token, one verdict line each.
    Doctor(Box<crate::doctor::DoctorArgs>),
    /// Print manifests (-f FILE, or - for stdin) as the webhook would admit them.
    Inject(Box<crate::inject::InjectArgs>),
    /// Route 169.254.169.254 to this pod's loopback interface (init container, needs NET_ADMIN).
    InitNetwork(crate::netns::InitNetworkArgs),
    /// Print the env Velero needs for node mode (Helm values or kubectl patch commands).
    VeleroEnv(crate::velero_env::VeleroEnvArgs),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_default_to_one_for_serve_and_can_be_set() {
        let cli = Cli::try_parse_from(["imds-broker", "serve", "--emulate"]).unwrap();
        if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
            assert_eq!(cli.workers(), Some(1));
            let hook = Cli::try_parse_from(["imds-broker", "webhook", "--sidecar-image", "i"]);
            let n = hook.unwrap().workers().unwrap();
            assert!((1..=2).contains(&n), "{n}");
        }
        let cli =
            Cli::try_parse_from(["imds-broker", "serve", "--emulate", "--worker-threads", "3"])
                .unwrap();
        assert_eq!(cli.workers(), Some(3));
        let zero =
            Cli::try_parse_from(["imds-broker", "--worker-threads", "0", "serve", "--emulate"]);
        assert!(zero.is_err(), "0 workers is refused");
    }
}
