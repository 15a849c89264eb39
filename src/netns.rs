//! `init-network`: put 169.254.169.254 on the pod's loopback (issue 3). Placeholder.

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct InitNetworkArgs {}

pub async fn run(_args: InitNetworkArgs) -> anyhow::Result<()> {
    anyhow::bail!("init-network is not implemented yet")
}
