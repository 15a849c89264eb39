//! `imds-broker`: parse flags, start logging, run the subcommand.

use clap::Parser;
use imds_broker::cli::{Cli, Command};
use imds_broker::{logging, netns, serve, webhook};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(*args).await,
            Command::Webhook(args) => webhook::run(*args).await,
            Command::InitNetwork(args) => netns::run(args).await,
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
