//! Mutating admission webhook (issue 4). Placeholder until implemented.

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct WebhookArgs {}

pub async fn run(_args: WebhookArgs) -> anyhow::Result<()> {
    anyhow::bail!("the webhook is not implemented yet")
}
