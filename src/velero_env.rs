//! `imds-broker velero-env`: prints what Velero's side of node mode needs — the env that
//! points Velero's pods at the broker on their node — in the form the user installs Velero
//! with: Helm values (chart ≥ 9.1.3 takes full env entries, older charts only plain values)
//! or `kubectl patch` commands for `velero install` clusters. The chart's NOTES.txt prints
//! the `helm` form too (tests/packaging checks both agree).
//!
//! Velero puts the env on the `velero` Deployment's and the `node-agent` DaemonSet's first
//! container, and every pod Velero creates copies it from there (data movers, file-system
//! backup pods, maintenance Jobs), so setting it on those two reaches them all.

use crate::broker::policy::is_guid;
use crate::webhook::identity::is_dns_name;
use anyhow::Context;
use clap::{Args, ValueEnum};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The node broker's token port (the chart's `--listen $(HOST_IP):8400`).
const PORT: u16 = 8400;
/// The key of the identity header in the broker's Secret.
const SECRET_KEY: &str = "identity-header";
/// Longest identity header accepted from `--identity-header-file`.
const MAX_HEADER: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Values for Velero's Helm chart 9.1.3 or later (`configuration.extraEnvVars` list).
    Helm,
    /// Values for Velero's Helm chart before 9.1.3 (`configuration.extraEnvVars` map).
    HelmLegacy,
    /// `kubectl patch` commands for the velero Deployment and node-agent DaemonSet.
    Kubectl,
}

#[derive(Debug, Clone, Args)]
pub struct VeleroEnvArgs {
    /// Velero's namespace, where `imds-broker node` runs with its Secret and Service.
    #[arg(long, env = "IMDS_BROKER_VELERO_NAMESPACE", default_value = "velero")]
    pub namespace: String,

    /// Client ID of the managed identity the broker serves; Velero's credentials file must
    /// name the same one (`AZURE_CLIENT_ID=`, required by Velero 1.17+).
    #[arg(long, env = "AZURE_CLIENT_ID")]
    pub client_id: String,

    /// `helm` (Velero chart ≥ 9.1.3), `helm-legacy` (older charts) or `kubectl` (`velero
    /// install`).
    #[arg(
        long,
        env = "IMDS_BROKER_VELERO_FORMAT",
        value_enum,
        default_value = "helm"
    )]
    pub format: Format,

    /// Name of the broker's Secret and Service: the chart's `<release>-node` objects
    /// (`imds-broker-node` for the release name `imds-broker`).
    #[arg(
        long,
        env = "IMDS_BROKER_NODE_OBJECT_NAME",
        default_value = "imds-broker-node"
    )]
    pub name: String,

    /// `helm-legacy` only: file holding the identity header (`-` = stdin), which older charts
    /// can only take as a plain value. The other formats reference the Secret instead.
    #[arg(long, env = "IMDS_BROKER_IDENTITY_HEADER_FILE")]
    pub identity_header_file: Option<PathBuf>,
}

pub fn run(args: &VeleroEnvArgs) -> anyhow::Result<()> {
    let header = match (&args.identity_header_file, args.format) {
        (Some(path), Format::HelmLegacy) => Some(read_header(path)?),
        (None, Format::HelmLegacy) => anyhow::bail!(
            "--format helm-legacy needs --identity-header-file: charts before 9.1.3 cannot \
             reference a Secret, so the header goes into the values. Pipe it in:\n  kubectl -n \
             {ns} get secret {name} -o jsonpath='{{.data.{SECRET_KEY}}}' | base64 -d | \
             imds-broker velero-env --format helm-legacy --identity-header-file - ...",
            ns = args.namespace,
            name = args.name
        ),
        (Some(_), _) => anyhow::bail!(
            "--identity-header-file is for --format helm-legacy only: the other formats \
             reference the Secret {} instead of copying the header",
            args.name
        ),
        (None, _) => None,
    };
    print!("{}", render(args, header.as_deref())?);
    Ok(())
}

/// The snippet for `args`; `header` is the identity header for `helm-legacy`.
pub fn render(args: &VeleroEnvArgs, header: Option<&str>) -> anyhow::Result<String> {
    check_label("--namespace", &args.namespace)?;
    check_label("--name", &args.name)?;
    anyhow::ensure!(
        is_guid(&args.client_id),
        "--client-id {:?} is not a client ID (a GUID such as \
         00000000-0000-0000-0000-000000000000): copy the managed identity's Client ID \
         (az identity show --query clientId)",
        args.client_id.chars().take(80).collect::<String>()
    );
    Ok(match args.format {
        Format::Helm => helm(args),
        Format::HelmLegacy => helm_legacy(args, header.context("helm-legacy needs the header")?),
        Format::Kubectl => kubectl(args),
    })
}

/// Namespaces and Service names are DNS-1123 labels; checked so the output stays well-formed
/// (no quoting needed in YAML, URLs or the shell's single quotes).
fn check_label(flag: &str, value: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        value.len() <= 63 && !value.contains('.') && is_dns_name(value),
        "{flag} {:?} is not a Kubernetes object name (lower-case letters, digits and '-', at \
         most 63, starting and ending with a letter or digit)",
        value.chars().take(80).collect::<String>()
    );
    Ok(())
}

fn read_header(path: &Path) -> anyhow::Result<String> {
    let shown = path.display().to_string();
    let mut text = String::new();
    let limit = u64::try_from(MAX_HEADER).unwrap_or(u64::MAX) + 2;
    let read = if shown == "-" {
        std::io::stdin().take(limit).read_to_string(&mut text)
    } else {
        std::fs::File::open(path)
            .with_context(|| format!("cannot open --identity-header-file {shown}"))?
            .take(limit)
            .read_to_string(&mut text)
    };
    read.with_context(|| format!("cannot read --identity-header-file {shown} as text"))?;
    let header = text.trim();
    anyhow::ensure!(
        !header.is_empty(),
        "--identity-header-file {shown} is empty: the Secret's key {SECRET_KEY} decoded \
         (base64 -d) is expected"
    );
    anyhow::ensure!(
        header.len() <= MAX_HEADER,
        "--identity-header-file {shown} holds more than {MAX_HEADER} characters: not an \
         identity header"
    );
    // Velero's old chart passes these values through `tpl` and `quote`: a plain token is
    // copied as it is, anything else could be rewritten on the way.
    let plain = |c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c);
    anyhow::ensure!(
        header.chars().all(plain),
        "--identity-header-file {shown} holds characters other than letters, digits and \
         -._~+/= (the chart generates letters and digits): it would not survive Velero's \
         chart templating; set a plain value (node.identityHeader.value)"
    );
    Ok(header.to_owned())
}

fn credentials_note(args: &VeleroEnvArgs, secret: &str) -> String {
    format!(
        "# Velero's credentials file ({secret}) needs this line, naming the\n\
         # broker's identity (Velero 1.17+ refuses a managed identity without it; keep the\n\
         # file's other lines as they are):\n\
         #   AZURE_CLIENT_ID={client}\n\
         # No AZURE_CLIENT_SECRET in that file and no azure.workload.identity/use label on\n\
         # Velero's pods: either one takes precedence over this endpoint.\n",
        client = args.client_id
    )
}

fn helm(args: &VeleroEnvArgs) -> String {
    let name = &args.name;
    format!(
        "# Velero Helm chart (vmware-tanzu/velero) 9.1.3 or later: add to your values, then\n\
         # upgrade, e.g.\n\
         #   helm upgrade velero vmware-tanzu/velero --reuse-values -f <this file> -n {ns}\n\
         # configuration.extraEnvVars goes to the velero Deployment and the node-agent\n\
         # DaemonSet, and from them to every pod Velero creates. It is a list: if your values\n\
         # set it already, add these entries to yours.\n\
         configuration:\n\
         \x20 extraEnvVars:\n\
         \x20   # First: Kubernetes expands $(HOST_IP) only from entries declared before it.\n\
         \x20   - name: HOST_IP\n\
         \x20     valueFrom:\n\
         \x20       fieldRef:\n\
         \x20         fieldPath: status.hostIP\n\
         \x20   - name: IDENTITY_ENDPOINT\n\
         \x20     value: http://$(HOST_IP):{PORT}/msi/token\n\
         \x20   - name: IDENTITY_HEADER\n\
         \x20     valueFrom:\n\
         \x20       secretKeyRef:\n\
         \x20         name: {name}\n\
         \x20         key: {SECRET_KEY}\n\
         {note}",
        ns = args.namespace,
        note = credentials_note(args, "credentials.secretContents.cloud")
    )
}

fn helm_legacy(args: &VeleroEnvArgs, header: &str) -> String {
    format!(
        "# Velero Helm chart before 9.1.3: configuration.extraEnvVars is a map rendered as\n\
         # plain values (no valueFrom), so pods reach the broker on their own node through\n\
         # its Service (internalTrafficPolicy Local) and carry the identity header itself:\n\
         # this file holds that secret, keep it out of version control. Then upgrade, e.g.\n\
         #   helm upgrade velero vmware-tanzu/velero --reuse-values -f <this file> -n {ns}\n\
         configuration:\n\
         \x20 extraEnvVars:\n\
         \x20   IDENTITY_ENDPOINT: http://{name}.{ns}.svc:{PORT}/msi/token\n\
         \x20   IDENTITY_HEADER: \"{header}\"\n\
         {note}",
        name = args.name,
        ns = args.namespace,
        note = credentials_note(args, "credentials.secretContents.cloud")
    )
}

fn kubectl(args: &VeleroEnvArgs) -> String {
    let env = serde_json::json!([
        {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
        {"name": "IDENTITY_ENDPOINT", "value": format!("http://$(HOST_IP):{PORT}/msi/token")},
        {"name": "IDENTITY_HEADER",
         "valueFrom": {"secretKeyRef": {"name": args.name, "key": SECRET_KEY}}},
    ]);
    // A strategic merge patch merges env by name (a second run changes nothing) and keeps the
    // patch's order among its own entries, so HOST_IP stays ahead of IDENTITY_ENDPOINT.
    let patch = |container: &str| {
        serde_json::json!({"spec": {"template": {"spec": {"containers": [
            {"name": container, "env": env}
        ]}}}})
        .to_string()
    };
    let ns = &args.namespace;
    format!(
        "# `velero install` (no Helm): the env goes to the velero Deployment and the node-agent\n\
         # DaemonSet, and from them to every pod Velero creates. Merged by name: running this\n\
         # again changes nothing. Both roll out new pods. The broker must allow their\n\
         # ServiceAccount, `velero` here (chart: --set 'node.allowServiceAccounts={{velero}}').\n\
         kubectl -n {ns} patch deployment/velero --type strategic -p '{deployment}'\n\
         kubectl -n {ns} patch daemonset/node-agent --type strategic -p '{daemonset}'\n\
         kubectl -n {ns} rollout status deployment/velero --timeout=300s\n\
         kubectl -n {ns} rollout status daemonset/node-agent --timeout=300s\n\
         {note}",
        deployment = patch("velero"),
        daemonset = patch("node-agent"),
        note = credentials_note(args, "Secret cloud-credentials, key cloud")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: VeleroEnvArgs,
    }

    const CLIENT: &str = "11111111-2222-3333-4444-555555555555";

    fn args(extra: &[&str]) -> VeleroEnvArgs {
        let mut argv = vec!["x", "--client-id", CLIENT];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().args
    }

    fn golden(file: &str, actual: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/velero-env")
            .join(file);
        let expected =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            actual,
            expected,
            "the output differs from {} (update it if the change is intended)",
            path.display()
        );
    }

    #[test]
    fn each_format_prints_its_golden_snippet() {
        golden("helm.yaml", &render(&args(&[]), None).unwrap());
        let legacy = args(&["--format", "helm-legacy", "--namespace", "backup"]);
        golden(
            "helm-legacy.yaml",
            &render(&legacy, Some("s3cr3t")).unwrap(),
        );
        golden(
            "kubectl.sh",
            &render(&args(&["--format", "kubectl"]), None).unwrap(),
        );
    }

    /// Every `$(VAR)` in a value names an entry declared before it: Kubernetes expands only
    /// those, and leaves the text as it is otherwise (the SDK would then call a URL with
    /// `$(HOST_IP)` in it).
    fn assert_expandable(env: &serde_json::Value) {
        let env = env.as_array().expect("env is a list");
        let names: Vec<&str> = env.iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["HOST_IP", "IDENTITY_ENDPOINT", "IDENTITY_HEADER"]);
        for (i, entry) in env.iter().enumerate() {
            let value = entry["value"].as_str().unwrap_or_default();
            for var in value.split("$(").skip(1) {
                let var = var.split(')').next().unwrap();
                assert!(
                    names[..i].contains(&var),
                    "{var} used before it is declared"
                );
            }
        }
        assert_eq!(
            env[0]["valueFrom"]["fieldRef"]["fieldPath"],
            "status.hostIP"
        );
        let secret = &env[2]["valueFrom"]["secretKeyRef"];
        assert_eq!(
            (secret["name"].as_str(), secret["key"].as_str()),
            (Some("imds-broker-node"), Some(SECRET_KEY))
        );
    }

    #[test]
    fn helm_values_parse_and_declare_host_ip_before_the_endpoint() {
        let out = render(&args(&[]), None).unwrap();
        let values: serde_json::Value = serde_yaml_ng::from_str(&out).unwrap();
        assert_eq!(
            values.as_object().unwrap().len(),
            1,
            "only `configuration`: {values}"
        );
        assert_expandable(&values["configuration"]["extraEnvVars"]);
    }

    #[test]
    fn kubectl_patches_parse_and_declare_host_ip_before_the_endpoint() {
        let out = render(&args(&["--format", "kubectl"]), None).unwrap();
        let mut containers = Vec::new();
        for line in out.lines().filter(|l| l.contains(" patch ")) {
            let json = line
                .split_once(" -p '")
                .unwrap()
                .1
                .strip_suffix('\'')
                .unwrap();
            let patch: serde_json::Value = serde_json::from_str(json).unwrap();
            let container = &patch["spec"]["template"]["spec"]["containers"][0];
            assert_expandable(&container["env"]);
            containers.push(container["name"].as_str().unwrap().to_owned());
        }
        // velero install's container names (pkg/install: deployment.go, daemonset.go).
        assert_eq!(containers, ["velero", "node-agent"]);
    }

    #[test]
    fn legacy_values_parse_to_plain_strings() {
        let legacy = args(&["--format", "helm-legacy"]);
        let out = render(&legacy, Some("0123456789")).unwrap();
        let values: serde_json::Value = serde_yaml_ng::from_str(&out).unwrap();
        let env = &values["configuration"]["extraEnvVars"];
        // Quoted: a header of digits stays a string, as the old chart's `quote` expects.
        assert_eq!(env["IDENTITY_HEADER"], "0123456789");
        assert_eq!(
            env["IDENTITY_ENDPOINT"],
            "http://imds-broker-node.velero.svc:8400/msi/token"
        );
    }

    #[test]
    fn names_and_namespace_reach_every_reference() {
        let a = args(&["--namespace", "backup", "--name", "broker-node"]);
        let out = render(&a, None).unwrap();
        assert!(out.contains("name: broker-node\n"), "{out}");
        assert!(out.contains("<this file> -n backup\n"), "{out}");
        let legacy = VeleroEnvArgs {
            format: Format::HelmLegacy,
            ..a.clone()
        };
        let out = render(&legacy, Some("h")).unwrap();
        assert!(
            out.contains("http://broker-node.backup.svc:8400/msi/token"),
            "{out}"
        );
        let kubectl = VeleroEnvArgs {
            format: Format::Kubectl,
            ..a
        };
        let out = render(&kubectl, None).unwrap();
        assert_eq!(out.matches("kubectl -n backup patch").count(), 2, "{out}");
        assert_eq!(out.matches(r#""name":"broker-node""#).count(), 2, "{out}");
    }

    #[test]
    fn malformed_inputs_are_refused_with_the_flag_named() {
        let err = render(&args(&["--namespace", "Velero NS"]), None).unwrap_err();
        assert!(
            err.to_string().contains("--namespace \"Velero NS\""),
            "{err}"
        );
        let err = render(&args(&["--name", "a.b"]), None).unwrap_err();
        assert!(err.to_string().contains("--name \"a.b\""), "{err}");
        let mut bad = args(&[]);
        bad.client_id = "velero-identity".into();
        let err = render(&bad, None).unwrap_err();
        assert!(err.to_string().contains("not a client ID"), "{err}");
    }

    #[test]
    fn the_header_file_is_read_trimmed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("header");
        std::fs::write(&file, "abcDEF123\n").unwrap();
        assert_eq!(read_header(&file).unwrap(), "abcDEF123");
        std::fs::write(&file, "\n").unwrap();
        assert!(read_header(&file)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        std::fs::write(&file, "{{ .Values.x }}").unwrap();
        let err = read_header(&file).unwrap_err().to_string();
        assert!(err.contains("templating"), "{err}");
        std::fs::write(&file, "a".repeat(10_000)).unwrap();
        let err = read_header(&file).unwrap_err().to_string();
        assert!(err.contains("more than 512"), "{err}");
        let err = read_header(&dir.path().join("missing")).unwrap_err();
        assert!(format!("{err:#}").contains("cannot open"), "{err:#}");
    }

    #[test]
    fn the_header_file_belongs_to_helm_legacy_only() {
        let err = run(&args(&["--format", "helm-legacy"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs --identity-header-file"), "{err}");
        assert!(err.contains("base64 -d"), "{err}");
        let err = run(&args(&["--identity-header-file", "/dev/null"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("helm-legacy only"), "{err}");
    }
}
