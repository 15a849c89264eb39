//! The flags of `imds-broker node`: serve's (identity, Entra, limits) plus who may ask.

use crate::attest::policy::{is_namespace, AllowedAccount, Policy};
use crate::serve::ServeArgs;
use crate::values::non_empty;
use clap::Args;

/// The environment variable the default namespace comes from (a fieldRef to
/// `metadata.namespace` in the DaemonSet).
pub const POD_NAMESPACE: &str = "POD_NAMESPACE";

#[derive(Debug, Clone, Args)]
/// Flags of `imds-broker node`.
#[command(mut_arg("listen", |a| a
    .help(
        "Token listener(s): the node's address, e.g. `$(HOST_IP):8400` (HOST_IP from the \
         fieldRef status.hostIP), with SO_REUSEPORT so that the old and the new broker of a \
         rolling update share it. Every caller is attested: only pods of this node that the \
         --allow-* flags admit get tokens. Repeat (or comma-separate) for several addresses."
    )
    .default_value(None::<&str>)
    .required(true)))]
#[command(mut_arg("identity_header", |a| a
    .help(
        "Shared secret callers must send as X-IDENTITY-HEADER (the IDENTITY_HEADER of \
         Velero's pods): a second wall behind attestation, so a process that shares an \
         attested address still needs it. Required: node mode serves only the App Service \
         endpoint (/msi/token)."
    )
    .required(true)))]
pub struct NodeArgs {
    /// This node's name (the fieldRef spec.nodeName): only pods scheduled here are watched
    /// and served.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Namespaces whose pods may ask (repeatable; env comma-separated). The broker watches the
    /// pods of this node in each, and needs a Role granting list and watch on pods there.
    /// Default: the broker's own namespace, from POD_NAMESPACE.
    #[arg(
        long = "allow-namespace",
        env = "IMDS_BROKER_ALLOW_NAMESPACES",
        value_delimiter = ','
    )]
    pub allow_namespaces: Vec<String>,

    /// ServiceAccounts whose pods may ask: `name` (in every allowed namespace) or
    /// `namespace/name` (repeatable; env comma-separated).
    #[arg(
        long = "allow-service-account",
        env = "IMDS_BROKER_ALLOW_SERVICE_ACCOUNTS",
        value_delimiter = ',',
        default_value = "velero-server"
    )]
    pub allow_service_accounts: Vec<String>,

    /// Also serve host-network pods of an allowed ServiceAccount. Their address is the
    /// node's, so every process on the node (and every other host-network pod) shares it and
    /// gets tokens too while such a pod runs here.
    #[arg(long, env = "IMDS_BROKER_ALLOW_HOST_NETWORK")]
    pub allow_host_network: bool,

    #[command(flatten)]
    pub serve: ServeArgs,
}

impl NodeArgs {
    /// The caller policy from the flags (and POD_NAMESPACE), or an error naming the flag and
    /// what to set.
    pub fn policy(&self) -> anyhow::Result<Policy> {
        self.policy_with(std::env::var(POD_NAMESPACE).ok())
    }

    fn policy_with(&self, pod_namespace: Option<String>) -> anyhow::Result<Policy> {
        anyhow::ensure!(
            !self.node_name.trim().is_empty(),
            "--node-name / NODE_NAME is empty: set it from the fieldRef spec.nodeName"
        );
        let mut namespaces = non_empty(&self.allow_namespaces);
        if namespaces.is_empty() {
            let own = pod_namespace.map(|s| s.trim().to_owned());
            namespaces.push(own.filter(|s| !s.is_empty()).ok_or_else(|| {
                anyhow::anyhow!(
                    "no namespace to serve: set --allow-namespace / \
                     IMDS_BROKER_ALLOW_NAMESPACES, or POD_NAMESPACE (the fieldRef \
                     metadata.namespace) for the broker's own"
                )
            })?);
        }
        if let Some(bad) = namespaces.iter().find(|ns| !is_namespace(ns)) {
            anyhow::bail!(
                "--allow-namespace {bad:?} is not a namespace name (lower-case letters, digits \
                 and '-', at most 63)"
            );
        }
        namespaces.sort();
        namespaces.dedup();
        let mut accounts = Vec::new();
        for entry in non_empty(&self.allow_service_accounts) {
            let account = AllowedAccount::parse(&entry)
                .map_err(|e| anyhow::anyhow!("--allow-service-account: {e}"))?;
            if let Some(ns) = account
                .namespace
                .as_ref()
                .filter(|ns| !namespaces.contains(ns))
            {
                anyhow::bail!(
                    "--allow-service-account {account} names namespace {ns}, which is not \
                     watched (--allow-namespace {}): add {ns} there, or drop the entry",
                    namespaces.join(",")
                );
            }
            accounts.push(account);
        }
        anyhow::ensure!(
            !accounts.is_empty(),
            "--allow-service-account / IMDS_BROKER_ALLOW_SERVICE_ACCOUNTS is empty: no pod \
             could ever get a token; name the ServiceAccount of Velero's pods (velero-server)"
        );
        Ok(Policy {
            namespaces,
            accounts,
            host_network: self.allow_host_network,
        })
    }

    /// `--node-name` as given, trimmed.
    pub fn node(&self) -> &str {
        self.node_name.trim()
    }

    /// Settings that are allowed but worth a warning line at start-up.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = self.serve.broker_warnings();
        if self.allow_host_network {
            out.push(
                "--allow-host-network: while an allowed host-network pod runs on this node, \
                 every process of the node can get its tokens (they share the node's address)"
                    .to_owned(),
            );
        }
        if self.serve.listen.iter().any(|a| a.ip().is_unspecified()) {
            out.push(
                "--listen on a wildcard address: the token port is open on every interface of \
                 the node; callers are attested, but give the node's own address \
                 ($(HOST_IP)) unless you need more"
                    .to_owned(),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: NodeArgs,
    }

    fn parse(extra: &[&str]) -> Result<NodeArgs, clap::Error> {
        let mut argv = vec!["x", "--emulate", "--listen", "10.0.0.4:8400"];
        argv.extend_from_slice(&["--identity-header", "s3cret"]);
        if !extra.contains(&"--node-name") {
            argv.extend_from_slice(&["--node-name", "n1"]);
        }
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).map(|c| c.args)
    }

    #[test]
    fn the_namespace_defaults_to_the_brokers_own_and_accounts_to_velero_server() {
        let args = parse(&[]).unwrap();
        let policy = args.policy_with(Some("velero".into())).unwrap();
        assert_eq!(policy.namespaces, ["velero"]);
        assert_eq!(policy.accounts[0].to_string(), "velero-server");
        assert!(!policy.host_network);
        let err = args.policy_with(None).unwrap_err().to_string();
        assert!(err.contains("POD_NAMESPACE"), "{err}");
        let listed = parse(&["--allow-namespace", "b,a", "--allow-namespace", "a"]).unwrap();
        let policy = listed.policy_with(Some("own".into())).unwrap();
        assert_eq!(
            policy.namespaces,
            ["a", "b"],
            "given ones replace the default"
        );
    }

    #[test]
    fn listen_is_required_and_accounts_must_name_watched_namespaces() {
        let no_listen = Cli::try_parse_from(["x", "--emulate", "--node-name", "n1"]);
        assert!(no_listen.unwrap_err().to_string().contains("--listen"));
        let no_header = Cli::try_parse_from([
            "x",
            "--emulate",
            "--node-name",
            "n",
            "--listen",
            "10.0.0.4:1",
        ]);
        assert!(no_header
            .unwrap_err()
            .to_string()
            .contains("--identity-header"));
        let stray = parse(&["--allow-service-account", "kube-system/x"]).unwrap();
        let err = stray
            .policy_with(Some("velero".into()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("names namespace kube-system, which is not watched"),
            "{err}"
        );
        let bad = parse(&["--allow-service-account", "a/b/c"]).unwrap();
        let err = bad
            .policy_with(Some("velero".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--allow-service-account"), "{err}");
        let empty = parse(&["--allow-service-account", ""]).unwrap();
        let err = empty
            .policy_with(Some("velero".into()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is empty"), "{err}");
        let typo = parse(&["--allow-namespace", "Velero"]).unwrap();
        let err = typo.policy_with(None).unwrap_err().to_string();
        assert!(err.contains("\"Velero\" is not a namespace name"), "{err}");
        let blank_node = parse(&["--node-name", " "]).unwrap();
        assert!(blank_node.policy_with(Some("v".into())).is_err());
    }
}
