//! `imds-broker`: parse flags, start logging, run the subcommand.

use clap::Parser;
use imds_broker::cli::{Cli, Command};
use imds_broker::{doctor, inject, logging, netns, node, serve, velero_env, webhook};
use std::process::ExitCode;

fn main() -> ExitCode {
    // With RUST_BACKTRACE set (common when debugging), the Azure SDK's error values capture a
    // backtrace even for an absent optional header, which its pipeline looks up on every Entra
    // call: CPU on the cold path and ~0.4 MiB of unwind tables paged in (bench/RESULTS.md).
    // Library backtraces are off unless RUST_LIB_BACKTRACE asks; panics still honour
    // RUST_BACKTRACE. Set before any thread exists.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = cli.workers() {
        runtime.worker_threads(n);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(*args).await,
            Command::Node(args) => node::run(*args).await,
            Command::Webhook(args) => webhook::run(*args).await,
            Command::InitNetwork(args) => netns::run(args).await,
            Command::Inject(args) => inject::run(*args).await,
            Command::Doctor(args) => doctor::run(*args).await,
            Command::VeleroEnv(args) => velero_env::run(&args),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "imds-broker failed");
            ExitCode::FAILURE
        }
    }
}
